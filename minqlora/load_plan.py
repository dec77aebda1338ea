"""Where each tensor of a 4-bit file goes in a model, checked before anything changes (lesson 10;
checkpoint.py reads and writes the files).

    file_name(model, key)   the model's key -> the file's: "q_proj.base.weight" -> "q_proj.weight"
    ties(model)             {key: the key it is tied to}: one Parameter under two names
                            (lm_head.weight IS model.embed_tokens.weight), and the ties a
                            Transformers model declares ({target: source} all_tied_weights_keys)
    plan(model, tensors)    every problem, and for each nn.Linear the file holds in 4 bits a
                            Linear4bit made of the file's own tensors (no float weight made)
    apply(model, tensors, layers)   the load: those layers swapped in, the rest copied in (a
                            meta-device tensor: replaced by the file's), every tie made again

Worked example: a tied LLaMA skeleton (parameters on the meta device, as accelerate's
init_empty_weights() builds it) and Transformers' 4-bit file of it: each layer's 7 nn.Linear
become Linear4bit; model.embed_tokens.weight becomes the file's tensor itself; lm_head.weight,
which the file leaves out, becomes that same Parameter again.
"""
import itertools

import torch
from torch import nn

from .bnb_layout import QUANT_STATE
from .linear4bit import Linear4bit
from .lora import LoRALinear
from .qlora import replace_module
from .save_guard import guard_save_pretrained

MARK = "weight." + QUANT_STATE          # the key of a 4-bit state's JSON, after the layer's path


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


def ties(model: nn.Module, declared: bool = True) -> dict:
    """{target key: source key} (the model's keys): a tensor under a later name -> its first
    name; with declared, also the ties a Transformers model declares for its config.

    >>> m = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False))
    >>> m[1].weight = m[0].weight
    >>> ties(m)
    {'1.weight': '0.weight'}
    """
    state, first, tied = model.state_dict(keep_vars=True), {}, {}
    for key, tensor in state.items():
        tied.update({key: first[id(tensor)]} if id(tensor) in first else {})
        first.setdefault(id(tensor), key)
    more = getattr(model, "all_tied_weights_keys", None) if declared else None
    tied.update({t: s for t, s in (more if isinstance(more, dict) else {}).items()
                 if t in state and s in state and t != s})
    return tied


def _build(linear: nn.Linear, tensors: dict, prefix: str, compute_dtype) -> Linear4bit:
    """A Linear4bit at `linear`'s place made of the file's tensors (views, no copy), the bias
    frozen; a ValueError naming the key that does not fit."""
    layer = Linear4bit.__new__(Linear4bit)       # not __init__: no float weight to quantize
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.compute_dtype = compute_dtype
    layer.register_parameter("bias", None)
    packed, state, bias = layer.parse_state_dict(tensors, prefix)
    if linear.bias is not None and (bias is None or bias.shape != linear.bias.shape):
        raise ValueError(f"{prefix}bias: expected shape {list(linear.bias.shape)}, got "
                         f"{None if bias is None else list(bias.shape)}")
    layer._set_state(packed, state)
    if linear.bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _group(tensors, prefix: str, layer) -> set:
    """The keys of one 4-bit layer in `tensors`: weight, weight.*, and bias if it has one."""
    return {k for k in tensors if k == prefix + "weight" or k.startswith(prefix + "weight.")
            or (k == prefix + "bias" and layer.bias is not None)}


def _layers(model: nn.Module, tensors: dict) -> dict:
    """{file prefix: (the model's prefix, layer)} of every Linear4bit, and of every nn.Linear
    whose weight the file holds in 4 bits: "q_proj." for the model's "q_proj.base."."""
    quantized = {k[:k.index(MARK)] for k in tensors if MARK in k}
    layers = {}
    for name, module in model.named_modules():
        own = name + "." if name else ""
        prefix = (file_name(model, own + "weight") or "").removesuffix("weight")
        if isinstance(module, Linear4bit) or isinstance(module, nn.Linear) and prefix in quantized:
            layers[prefix] = (own, module)
    return layers


def plan(model: nn.Module, tensors: dict, compute_dtype) -> tuple:
    """(problems, {file prefix: (model prefix, new Linear4bit)}): every reason `tensors` (file
    keys) do not fit `model` (missing and unexpected keys, sizes, 4-bit states, tensors that
    would stay on the meta device), and the layers to swap in. Changes nothing."""
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"load_4bit: compute_dtype must be a float torch.dtype, "
                        f"got {compute_dtype!r}")
    problems, built, grouped, layers = [], {}, set(), _layers(model, tensors)
    for prefix, (own, layer) in layers.items():
        group = _group(tensors, prefix, layer)
        grouped |= group
        if prefix + "weight" not in group:
            problems.append(f"missing key {prefix + 'weight'!r} (a 4-bit layer)")
            continue
        mine = {k: tensors[k] for k in group}
        try:
            if isinstance(layer, Linear4bit):
                layer.parse_state_dict(mine, prefix)
            else:
                built[prefix] = (own, _build(layer, mine, prefix, compute_dtype))
        except ValueError as error:
            problems.append(str(error))
        if layer.bias is not None and prefix + "bias" not in group:
            problems.append(f"missing key {prefix + 'bias'!r}")
    state = model.state_dict(keep_vars=True)
    names = {name: key for key in state if (name := file_name(model, key)) is not None}
    plain = {k: state[names[k]] for k in names
             if not any(_group([k], p, m) for p, (_, m) in layers.items())}
    held = _held(model, tensors)
    problems += [f"missing key {k!r}" for k in plain if k not in held]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in plain and k not in grouped]
    problems += [f"size mismatch for {k}: {list(tensors[k].shape)} in the file, "
                 f"{list(v.shape)} in the model" for k, v in plain.items()
                 if k in tensors and tensors[k].shape != v.shape]
    swapped = [own for own, _ in layers.values()]
    problems += [f"{name} is on the meta device and the file does not hold it (a skeleton "
                 "needs real buffers: build it with accelerate's init_empty_weights())"
                 for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                model.named_buffers(remove_duplicate=False))
                 if t.is_meta and not any(name.startswith(own) for own in swapped)
                 and file_name(model, name) not in held]
    return problems, built


def _held(model: nn.Module, tensors: dict) -> set:
    """File keys the load fills: those in the file, and those tied to one in the file."""
    pairs = [(file_name(model, t), file_name(model, s)) for t, s in ties(model).items()]
    return set(tensors).union(*[{t, s} for t, s in pairs if t in tensors or s in tensors])


def _slot(model: nn.Module, key: str) -> tuple:
    """(the dict holding parameter or buffer `key`, its name there)."""
    module, _, attr = key.rpartition(".")
    module = model.get_submodule(module)
    return (module._parameters if attr in module._parameters else module._buffers), attr


def apply(model: nn.Module, tensors: dict, built: dict) -> nn.Module:
    """The load `plan` checked: swap in the built layers, then fill every other key (a copy,
    or the file's tensor itself where the model's is on the meta device); tie what was tied."""
    tied, done = ties(model), set()
    for prefix, (own, layer) in built.items():
        model = replace_module(model, own[:-1], layer)
        done |= _group(tensors, prefix, layer)
    current, copies = model.state_dict(keep_vars=True), {}
    to_model = {name: key for key in current if (name := file_name(model, key)) is not None}
    for prefix, (own, layer) in _layers(model, tensors).items():
        if prefix not in built:                   # its nesting may differ from the file's
            group = _group(tensors, prefix, layer) - done
            copies.update({own + k[len(prefix):]: tensors[k] for k in group})
            done |= group
    for key in tensors.keys() - done:
        if not current[to_model[key]].is_meta:
            copies[to_model[key]] = tensors[key]
            continue
        slots, attr = _slot(model, to_model[key])          # meta: the file's tensor itself
        old = slots[attr]
        slots[attr] = (nn.Parameter(tensors[key], old.requires_grad)
                       if isinstance(old, nn.Parameter) else tensors[key])
    result = model.load_state_dict(copies, strict=False)
    assert not result.unexpected_keys, result     # checked by plan; adapters are left out
    for target, source in tied.items():           # tie again: the one the file held wins
        if file_name(model, target) in tensors and file_name(model, source) in tensors:
            continue                              # both stored: each keeps its own values
        keep, drop = ((target, source) if file_name(model, target) in tensors
                      else (source, target))
        (slots, attr), (kept, name) = _slot(model, drop), _slot(model, keep)
        slots[attr] = kept[name]
    if built:
        guard_save_pretrained(model)              # its save_pretrained would lose the 4 bits
    return model
