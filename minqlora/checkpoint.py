"""A whole 4-bit model as Transformers stores one: a safetensors file or folder (lesson 10).

    save_4bit(model, path):  the model's state_dict, each LoRALinear's base named as the plain
                             model names it, its lora_A / lora_B left out, each tied tensor once
                             -> one .safetensors file, or a folder Transformers opens (folders.py)
    load_4bit(model, path):  the inverse, all or nothing: every key and tensor is checked first

The keys are module paths, as in the model.safetensors that Transformers writes for a model
loaded with BitsAndBytesConfig(load_in_4bit=True): each Linear4bit in bitsandbytes' layout
(bnb_layout.py), everything else (embeddings, norms, the head) as it is.

    model.layers.0.self_attn.q_proj.weight            uint8 (2048, 1)   4096 weights, packed
    model.layers.0.self_attn.q_proj.weight.absmax     uint8 (64,)       qabsmax
    ...                                                                 (bnb_layout.py)
    model.embed_tokens.weight                         float32 (vocab, hidden)

prepare_qlora wraps each Linear4bit in a LoRALinear as `.base`, so the model's own key is
q_proj.base.weight; the file says q_proj.weight, as the plain model (and Transformers) does:
it holds the base model, which has no adapters. The adapters go to PEFT's adapter folder
(adapter.py), where PEFT names the same module base_model.model.<path>.lora_A.weight.

Tied weights: lm_head.weight IS model.embed_tokens.weight in a model that ties its embeddings;
the file holds it once, under its first name, as Transformers writes it, and a load ties it
again. Building without the float model: an nn.Linear the file holds in 4 bits, even one on
the meta device, becomes a Linear4bit made of the file's bytes (load_plan.py).

Worked example: a 64 -> 64 layer, NF4 + double quantization, is 7 entries: weight (2048, 1),
absmax (64,), quant_map (16,), nested_absmax (1,), nested_quant_map (256,), the JSON, bias.
"""
import copy
import os

import torch
from torch import nn

from .files import read_regular, replace_together, text_writer, write_atomic
from .folders import (MODEL_CONFIG, MODEL_WEIGHTS, check_target, folder_compute_dtype,
                      folder_config, index_keys, is_folder, quantization_config, json_text,
                      read_config, weight_files)
from .linear4bit import Linear4bit
from .load_plan import apply, file_name, plan, ties
from .merge import merge_qlora


def base_state_dict(model: nn.Module) -> dict:
    """{file key: tensor} of everything but the adapters (tied tensors under each name)."""
    tensors = {}
    for key, tensor in model.state_dict().items():
        name = file_name(model, key)
        if name is not None:
            tensors[name] = tensor
    return tensors


def write_safetensors(tensors: dict, path) -> None:
    """Write `tensors` with Transformers' metadata {"format": "pt"} through a private temporary
    file that replaces `path` only once complete."""
    from safetensors.torch import save_file
    write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata={"format": "pt"}))


def save_4bit(model: nn.Module, path, merge: bool = False) -> None:
    """Write the model's base: 4-bit layers in bitsandbytes' layout, the rest as it is, each
    tied tensor once. `path` ending in .safetensors: that one file. Otherwise a folder that
    AutoModelForCausalLM.from_pretrained(path) opens as a bitsandbytes 4-bit model:
    model.safetensors and config.json (the model's Transformers config + quantization_config).
    The adapters are left out (save_adapter writes them), or with merge=True merged and
    quantized again first (merge_qlora(requantize=True), on a copy: it warns what that keeps)."""
    if merge:
        model = merge_qlora(copy.deepcopy(model), requantize=True)
    tied = {file_name(model, k) for k in ties(model, declared=False)}
    tensors, seen = {}, set()
    for name, tensor in base_state_dict(model).items():
        if name in tied:
            continue                                  # written once, under its first name
        tensor = tensor.detach().contiguous().cpu()
        place = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[name] = tensor.clone() if place in seen or tensor.numel() == 0 else tensor
        seen.add(place)
    if not is_folder(path):
        return write_safetensors(tensors, path)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    skip = [name.removesuffix(".weight") for n, m in model.named_modules()      # not adapters
            if type(m) is nn.Linear and (name := file_name(model, n + ".weight"))]
    config = folder_config(model, quantization_config(layers, skip))
    check_target(path)
    os.makedirs(path, exist_ok=True)
    from safetensors.torch import save_file
    replace_together({os.path.join(path, MODEL_WEIGHTS):   # both files or neither (files.py)
                      lambda p: save_file(tensors, p, metadata={"format": "pt"}),
                      os.path.join(path, MODEL_CONFIG): text_writer(json_text(config))})


def read_safetensors(path) -> dict:
    """All tensors of a safetensors file (on the CPU), or a ValueError saying what it is not
    (a folder, FIFO or device is refused before it is read: files.read_regular)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        read_regular(path)                  # a regular file: never a FIFO, device or folder
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as a safetensors file ({error})") from None


def read_4bit(path) -> tuple:
    """(tensors, config) of a .safetensors file ({} config) or of a Transformers folder: its
    model.safetensors, or every shard its index names (each key once, as the index says)."""
    if not is_folder(path):
        return read_safetensors(path), {}
    tensors, where = {}, {}
    for file in weight_files(path):
        for key, tensor in read_safetensors(file).items():
            if key in tensors:
                raise ValueError(f"{path}: {key!r} is in both {where[key]} and {file}")
            tensors[key], where[key] = tensor, os.path.basename(file)
    index = index_keys(path)
    wrong = sorted(k for k in index.keys() | where.keys() if index and index.get(k) != where.get(k))
    if wrong:
        raise ValueError(f"{path}: the index and the shards disagree on {wrong[:5]}")
    return tensors, read_config(path)


def check_4bit(model: nn.Module, tensors: dict) -> list:
    """Every problem of loading `tensors` (file keys) into `model`, as messages naming keys:
    missing and unexpected keys, sizes, each 4-bit layer's state (checked as its load does),
    tensors left on the meta device, and non-finite values in the model's dtypes."""
    return plan(model, tensors, torch.bfloat16)[0] + _not_finite(tensors, base_state_dict(model))


def _not_finite(tensors: dict, model: dict) -> list:
    """Messages for the file's tensors that hold NaN or Inf once cast to the model's dtype (a
    float64 1e300 is inf in float32), or whose dtype the model's cannot take."""
    problems = []
    for k, v in model.items():
        t = tensors.get(k)
        if t is None or t.shape != v.shape:
            continue                                      # reported above
        if t.is_complex() and not v.is_complex():
            problems.append(f"{k}: {t.dtype} in the file, {v.dtype} in the model")
        elif v.is_floating_point() and not torch.isfinite(t.to(v.dtype)).all():
            problems.append(f"{k}: non-finite values in {v.dtype} (the model's dtype)")
    return problems


def load_4bit(model: nn.Module, path, compute_dtype=None) -> nn.Module:
    """Load a file or folder written by save_4bit or by Transformers (a bitsandbytes 4-bit
    model) into a model, strict about keys, and return it; the adapters stay as they are.
    The model's Linear4bit layers take the file's states; its nn.Linear layers that the file
    holds in 4 bits (meta-device ones too: a skeleton, no float weights made) become Linear4bit
    layers computing in compute_dtype (default: the folder's bnb_4bit_compute_dtype, else
    bfloat16); meta-device tensors are replaced by the file's, without a copy. Tied weights
    are tied again. Everything is checked before anything changes: on error the model is
    unchanged."""
    tensors, config = read_4bit(path)
    dtype = compute_dtype or folder_compute_dtype(config) or torch.bfloat16
    problems, layers = plan(model, tensors, dtype)
    problems += _not_finite(tensors, base_state_dict(model))
    if problems:
        raise ValueError(f"load_4bit: {path} does not fit the model ({len(problems)} "
                         f"problem(s)):\n  " + "\n  ".join(problems[:20]))
    return apply(model, tensors, layers)
