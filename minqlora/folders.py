"""The folders Transformers writes and opens: which files hold the weights, and config.json
(lesson 10; checkpoint.py reads and writes the tensors in them).

    model.safetensors                     every tensor, one file
    model.safetensors.index.json          or sharded: {"weight_map": {key: shard file}}
    model-00001-of-00002.safetensors      ... beside the shards the index names
    config.json                           the model's config, with, for a 4-bit model,
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
            "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": ["lm_head"], ...}

AutoModelForCausalLM.from_pretrained(folder) reads quantization_config and builds each linear
as a bitsandbytes Linear4bit, except the modules llm_int8_skip_modules names (the output head
here), then loads model.safetensors: the 4-bit states are bitsandbytes' layout (bnb_layout.py).

Worked example: ToyLM-sized LLaMA with its head kept in float32 -> skip_modules ["lm_head"];
a folder holding model-00001-of-00002.safetensors and -00002-of-00002 with their index is
read as the two files the index names, and only those.
"""
import json
import os

import torch

MODEL_WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODEL_CONFIG = "config.json"


def is_folder(path) -> bool:
    """A path means a folder unless it names a .safetensors file.

    >>> is_folder("out/model.safetensors"), is_folder("out/smol-4bit")
    (False, True)
    """
    return os.path.isdir(path) or not str(path).endswith(".safetensors")


def weight_files(folder) -> list:
    """The safetensors files of a Transformers folder: [model.safetensors], or the shards its
    index names (each a plain file name inside the folder); a ValueError saying what is there
    otherwise."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder (a file must end in .safetensors)")
    if os.path.isfile(os.path.join(folder, MODEL_WEIGHTS)):
        return [os.path.join(folder, MODEL_WEIGHTS)]
    index = os.path.join(folder, INDEX)
    if not os.path.isfile(index):
        raise ValueError(f"{folder}: neither {MODEL_WEIGHTS} nor {INDEX} is there (found "
                         f"{sorted(os.listdir(folder))[:10]}); minqlora reads safetensors only")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: expected a non-empty \"weight_map\": {{key: file}}")
    shards = sorted(set(weight_map.values()), key=str)
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard \
                or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise ValueError(f"{index}: {shard!r} is not a .safetensors file name in the folder")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise ValueError(f"{index}: the shard {shard} is missing from {folder}")
    return [os.path.join(folder, shard) for shard in shards]


def index_keys(folder) -> dict:
    """{key: shard file} of a sharded folder's index, {} without one."""
    path = os.path.join(folder, INDEX)
    if os.path.isfile(path) and not os.path.isfile(os.path.join(folder, MODEL_WEIGHTS)):
        return read_json(path)["weight_map"]
    return {}


def read_json(path) -> dict:
    """A JSON object from a file, or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(folder) -> dict:
    """config.json of a folder, {} when there is none."""
    path = os.path.join(folder, MODEL_CONFIG)
    return read_json(path) if os.path.isfile(path) else {}


def folder_compute_dtype(config: dict):
    """The torch dtype quantization_config's bnb_4bit_compute_dtype names, None if none does.

    >>> folder_compute_dtype({"quantization_config": {"bnb_4bit_compute_dtype": "bfloat16"}})
    torch.bfloat16
    """
    name = (config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def quantization_config(layers: list, skip: list) -> dict:
    """Transformers' quantization_config of a model whose 4-bit layers are `layers` (they must
    share one format: the config has one) and whose unquantized linears are named in `skip`."""
    formats = {(m.quant_type, m.double_quant, m.compute_dtype) for m in layers}
    if len(formats) != 1 or not {"nf4", "fp4"} >= {f[0] for f in formats}:
        raise ValueError(f"save_4bit: a Transformers folder has one quantization_config for all "
                         f"layers, nf4 or fp4; the model's 4-bit layers have {sorted(formats)} "
                         "(quant_type, double_quant, compute_dtype): write a .safetensors file")
    quant_type, double_quant, dtype = formats.pop()
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
            "llm_int8_skip_modules": sorted(skip), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def folder_config(model, quantization: dict) -> dict:
    """The model's Transformers config as its save_pretrained writes it (to_diff_dict), with
    `quantization` as quantization_config (replacing e.g. a GGUF one); a ValueError for a model
    without one."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_diff_dict", None)):
        raise ValueError(f"save_4bit: {type(model).__name__} has no Transformers config "
                         "(model.config), which a folder's config.json needs; give a path "
                         "ending in .safetensors to write the tensors alone")
    values = {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_")}
    return {**values, "architectures": [type(model).__name__],
            "quantization_config": quantization}


def json_text(value: dict) -> str:
    """config.json's text: the object indented and sorted, as Transformers writes it."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def check_target(folder) -> None:
    """Refuse to write model.safetensors into a folder holding a sharded checkpoint (a reader
    would see two sets of weights) or into something that is not a folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"save_4bit: {folder} exists and is not a folder")
    if os.path.isfile(os.path.join(folder, INDEX)):
        raise ValueError(f"save_4bit: {folder} holds a sharded checkpoint ({INDEX}); "
                         "write into an empty folder")
