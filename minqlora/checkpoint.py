"""A whole 4-bit model as Transformers stores one: a safetensors file (lesson 10).

    save_4bit(model, path):  the model's state_dict, each LoRALinear's base named as the plain
                             model names it and its lora_A / lora_B left out -> safetensors
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

Worked example: a 64 -> 64 layer, NF4 + double quantization, is 7 entries: weight (2048, 1),
absmax (64,), quant_map (16,), nested_absmax (1,), nested_quant_map (256,), the JSON, bias.
"""
import torch
from torch import nn

from .files import read_regular, write_atomic
from .linear4bit import Linear4bit
from .lora import LoRALinear


def file_name(model: nn.Module, key: str):
    """The key a file uses for model.state_dict()'s `key`: ".base." of a LoRALinear dropped,
    None for its adapters (they are not part of the base model).

    >>> model = nn.Sequential(LoRALinear(nn.Linear(2, 2), r=1))
    >>> [file_name(model, k) for k in model.state_dict()]
    ['0.weight', '0.bias', None, None]
    """
    parts, module, at = key.split("."), model, None
    for i, part in enumerate(parts):              # the innermost LoRALinear on the key's path
        if isinstance(module, LoRALinear):
            at = i
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    if at is None:
        return key
    rest = parts[at:]
    if rest[0] in ("lora_A", "lora_B"):
        return None
    return ".".join(parts[:at] + (rest[1:] if rest[0] == "base" else rest))


def _layers(model: nn.Module) -> dict:
    """{file prefix: (the model's prefix, Linear4bit)}: "q_proj." for "q_proj.base."."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            own = name + "." if name else ""
            layers[file_name(model, own + "weight").removesuffix("weight")] = (own, module)
    return layers


def _group(tensors, prefix: str, layer) -> set:
    """The keys of one Linear4bit in `tensors`: weight, weight.*, and bias if it has one."""
    return {k for k in tensors if k == prefix + "weight" or k.startswith(prefix + "weight.")
            or (k == prefix + "bias" and layer.bias is not None)}


def base_state_dict(model: nn.Module) -> dict:
    """{file key: tensor} of everything but the adapters (what save_4bit writes)."""
    tensors = {}
    for key, tensor in model.state_dict().items():
        name = file_name(model, key)
        if name is not None:
            tensors[name] = tensor
    return tensors


def save_4bit(model: nn.Module, path) -> None:
    """Write the model's base (4-bit layers in bitsandbytes' layout, the rest as it is) as one
    safetensors file with Transformers' metadata {"format": "pt"}, through a temporary file
    that replaces `path` only once complete. Tied (shared) tensors are written as copies."""
    from safetensors.torch import save_file
    tensors, seen = {}, set()
    for name, tensor in base_state_dict(model).items():
        tensor = tensor.detach().contiguous().cpu()
        place = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[name] = tensor.clone() if place in seen or tensor.numel() == 0 else tensor
        seen.add(place)
    write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata={"format": "pt"}))


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


def check_4bit(model: nn.Module, tensors: dict) -> list:
    """Every problem of loading `tensors` (file keys) into `model`, as messages naming keys:
    missing and unexpected keys, sizes, and each Linear4bit's state (checked as its load does)."""
    layers, grouped, problems = _layers(model), set(), []
    for prefix, (_, layer) in layers.items():
        group = _group(tensors, prefix, layer)
        grouped |= group
        if prefix + "weight" not in group:
            problems.append(f"missing key {prefix + 'weight'!r} (a Linear4bit)")
            continue
        try:
            layer.parse_state_dict({k: tensors[k] for k in group}, prefix)
        except ValueError as error:
            problems.append(str(error))
        if layer.bias is not None and prefix + "bias" not in group:
            problems.append(f"missing key {prefix + 'bias'!r}")
    plain = {k: v for k, v in base_state_dict(model).items()
             if not any(_group([k], prefix, layer) for prefix, (_, layer) in layers.items())}
    problems += [f"missing key {k!r}" for k in plain if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in plain and k not in grouped]
    problems += [f"size mismatch for {k}: {list(tensors[k].shape)} in the file, "
                 f"{list(v.shape)} in the model" for k, v in plain.items()
                 if k in tensors and tensors[k].shape != v.shape]
    biases = {prefix + "bias": layer.bias for prefix, (_, layer) in layers.items()
              if layer.bias is not None and tensors.get(prefix + "bias") is not None}
    return problems + _not_finite(tensors, {**plain, **biases})


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


def load_4bit(model: nn.Module, path) -> nn.Module:
    """Load a file written by save_4bit or by Transformers (a bitsandbytes 4-bit model) into a
    model of Linear4bit layers (e.g. prepare_qlora's), strict about keys; the adapters stay as
    they are. Everything is checked before anything changes: on error the model is unchanged."""
    tensors = read_safetensors(path)
    problems = check_4bit(model, tensors)
    if problems:
        raise ValueError(f"load_4bit: {path} does not fit the model ({len(problems)} "
                         f"problem(s)):\n  " + "\n  ".join(problems[:20]))
    to_model = {name: key for key in model.state_dict()
                if (name := file_name(model, key)) is not None}
    for prefix, (own, layer) in _layers(model).items():    # its nesting may differ from the file
        to_model.update({k: own + k[len(prefix):] for k in _group(tensors, prefix, layer)})
    result = model.load_state_dict({to_model[k]: v for k, v in tensors.items()}, strict=False)
    assert not result.unexpected_keys, result     # checked above; adapters are left out
    return model
