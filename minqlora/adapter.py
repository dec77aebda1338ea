"""LoRA adapters as PEFT stores them: a folder of two files (lesson 10).

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   A: (r, in)
                                base_model.model.<module path>.lora_B.weight   B: (out, r)
    adapter_config.json         {"peft_type": "LORA", "r": 64, "lora_alpha": 16,
                                 "lora_dropout": 0.1, "target_modules": ["down_proj", ...],
                                 "bias": "none", "fan_in_fan_out": false,
                                 "task_type": "CAUSAL_LM", "base_model_name_or_path": ...}

PEFT's LoRA computes h = W x + b + (lora_alpha / r) * B A dropout(x): lesson 06's LoRALinear,
scaling = alpha / r, with the same names (lora_A, lora_B). "base_model.model." is where PEFT's
PeftModel keeps the model it wraps; the module path is the plain model's (q_proj, never
q_proj.base, as in checkpoint.py). PEFT matches a list of target_modules against the end of
each module's name (prepare_qlora's rule), a string as a regular expression on the whole name.

Worked example: ToyLM prepared at r=4 has 14 adapted linears, so the safetensors file holds 28
tensors; layers.0.q_proj's are base_model.model.layers.0.q_proj.lora_A.weight (4, 64) and
...lora_B.weight (64, 4), and the config says target_modules ["down_proj", ..., "v_proj"].

task_type and base_model_name_or_path let PEFT pick its class (PeftModelForCausalLM) and
AutoPeftModelForCausalLM.from_pretrained(folder) find the base model: save_adapter takes
them, or reads them off a Transformers model (its class name, its config's _name_or_path).

Settings that change PEFT's formula (use_rslora: alpha / sqrt(r), use_dora, biases, ranks
per module) have no counterpart in LoRALinear: load_adapter refuses them by name.
"""
import json
import os
import re

import torch
from torch import nn

from .checkpoint import read_safetensors
from .files import JSON_CAP, read_regular, replace_together, text_writer
from .lora import LoRALinear
from .qlora import name_matches

PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PLAIN = {"use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False,
         "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
         "modules_to_save": None, "layer_replication": None, "target_parameters": None,
         "trainable_token_indices": None, "use_qalora": False}   # PEFT's defaults, all ours
PEFT_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
                   "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                   "ForQuestionAnswering": "QUESTION_ANS"}


def lora_layers(model: nn.Module) -> dict:
    """{module path: LoRALinear} of a prepared model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _one(layers: dict, what: str, value) -> object:
    """The value every LoRALinear shares, or a ValueError naming the first that differs."""
    first = value(next(iter(layers.values())))
    for name, layer in layers.items():
        if value(layer) != first:
            raise ValueError(f"save_adapter: PEFT's config has one {what} for all layers; "
                             f"{name} has {value(layer)!r}, others {first!r}")
    return first


def target_modules(model: nn.Module, names) -> list:
    """The shortest list PEFT would expand to exactly `names`: their last dotted parts if those
    pick no other module, else the full names."""
    names = sorted(names)
    others = [n for n, _ in model.named_modules() if n and n not in names
              and not any(n.startswith(p + ".") for p in names)]
    leaves = sorted({n.rpartition(".")[2] for n in names})
    return leaves if not any(name_matches(n, leaves) for n in others) else names


def peft_fields(model: nn.Module, task_type=None, base_model_name_or_path=None) -> dict:
    """PEFT's task_type and base_model_name_or_path: as given, else from a Transformers model's
    class name and config (config._name_or_path: the folder or Hub id it came from), else None.

    >>> class LlamaForCausalLM(nn.Module): pass
    >>> peft_fields(LlamaForCausalLM(), base_model_name_or_path="out/base")
    {'task_type': 'CAUSAL_LM', 'base_model_name_or_path': 'out/base'}
    """
    name = type(model).__name__
    task_type = task_type or next((t for end, t in PEFT_TASK_TYPES.items()
                                   if name.endswith(end)), None)
    if task_type not in (None, "FEATURE_EXTRACTION", *PEFT_TASK_TYPES.values()):
        raise ValueError(f"save_adapter: task_type {task_type!r} is none of PEFT's "
                         f"{sorted(PEFT_TASK_TYPES.values()) + ['FEATURE_EXTRACTION']}")
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not isinstance(base, (str, os.PathLike)):
        raise ValueError(f"save_adapter: base_model_name_or_path must be a path or a Hub id, "
                         f"got {base!r}")
    return {"task_type": task_type, "base_model_name_or_path": os.fspath(base) or None}


def save_adapter(model: nn.Module, directory, task_type=None,
                 base_model_name_or_path=None) -> None:
    """Write the LoRA adapters of a prepared model as a PEFT adapter folder; task_type and
    base_model_name_or_path as peft_fields gives them."""
    from safetensors.torch import save_file
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layers (prepare_qlora first)")
    config = {"peft_type": "LORA", **peft_fields(model, task_type, base_model_name_or_path),
              "revision": None, "inference_mode": True,
              "r": _one(layers, "r", lambda m: m.r),
              "lora_alpha": _one(layers, "lora_alpha", lambda m: m.alpha),
              "lora_dropout": _one(layers, "lora_dropout",
                                   lambda m: getattr(m.dropout, "p", 0.0)),
              "target_modules": target_modules(model, layers), "exclude_modules": None,
              "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
              **PLAIN}
    tensors = {f"{PREFIX}{name}.{ab}.weight": getattr(m, ab).weight.detach().contiguous().cpu()
               for name, m in layers.items() for ab in ("lora_A", "lora_B")}
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    replace_together({os.path.join(directory, ADAPTER_WEIGHTS):    # both or neither (files.py)
                      lambda p: save_file(tensors, p, metadata={"format": "pt"}),
                      os.path.join(directory, ADAPTER_CONFIG): text_writer(text)})


def _targets(config: dict, name: str) -> bool:
    """Whether PEFT's target_modules selects module `name` (a list, a regex, "all-linear")."""
    targets = config.get("target_modules")
    if targets == "all-linear":
        return True     # every linear (PEFT skips the head of a Transformers model only)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return isinstance(targets, list) and name_matches(name, targets)


def _target_problems(targets) -> list:
    """Why target_modules is not a list of names, "all-linear" or a regular expression."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            return [f"target_modules {targets!r} is not a regular expression ({error})"]
    elif not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return [f"target_modules must be a list of module names or a regular expression, got "
                f"{str(targets)[:80]}"]
    return []


def check_adapter(model: nn.Module, config: dict, tensors: dict) -> list:
    """Every reason the adapter folder does not fit the model, as messages."""
    layers = lora_layers(model)
    problems = [] if layers else ["the model has no LoRALinear layers (prepare_qlora first)"]
    bad_targets = _target_problems(config.get("target_modules"))
    problems += bad_targets
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    problems += [f"{key} = {config[key]!r} has no counterpart in LoRALinear (expected "
                 f"{default!r})" for key, default in PLAIN.items()
                 if key in config and config[key] not in (default, None)]
    for name, layer in layers.items():
        if not bad_targets and not _targets(config, name):
            problems.append(f"{name}: adapted in the model, not in target_modules "
                            f"{config.get('target_modules')!r}")
        for key, ours in (("r", layer.r), ("lora_alpha", layer.alpha)):
            if config.get(key) != ours:
                problems.append(f"{name}: the adapter has {key}={config.get(key)!r}, the "
                                f"model {ours!r}: prepare the model with the adapter's values")
        for ab, shape in (("lora_A", (layer.r, layer.in_features)),
                          ("lora_B", (layer.out_features, layer.r))):
            key = f"{PREFIX}{name}.{ab}.weight"
            if key not in tensors:
                problems.append(f"missing key {key!r}")
            elif tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
                problems.append(f"{key}: expected a float tensor of shape {list(shape)}, got "
                                f"{list(tensors[key].shape)} of {tensors[key].dtype}")
            elif not torch.isfinite(tensors[key].to(getattr(layer, ab).weight.dtype)).all():
                problems.append(f"{key}: non-finite values in {getattr(layer, ab).weight.dtype} "
                                "(the layer's dtype, that the values are cast to)")
    expected = {f"{PREFIX}{n}.{ab}.weight" for n in layers for ab in ("lora_A", "lora_B")}
    problems += [f"unexpected key {k!r}" for k in sorted(tensors.keys() - expected)]
    return problems


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT LoRA adapter folder into a prepared model (same r, alpha and adapted
    modules); everything is checked first, so on error the model is unchanged. Dropout is a
    training setting and stays the model's."""
    try:
        config = json.loads(read_regular(os.path.join(directory, ADAPTER_CONFIG), JSON_CAP))
    except (ValueError, RecursionError) as error:         # RecursionError: deep nesting
        raise ValueError(f"load_adapter: cannot read {ADAPTER_CONFIG} in {directory}: "
                         f"{error}") from None
    tensors = read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS))
    problems = check_adapter(model, config if isinstance(config, dict) else {}, tensors)
    if problems:
        raise ValueError(f"load_adapter: {directory} does not fit the model "
                         f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:20]))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for ab in ("lora_A", "lora_B"):
                getattr(layer, ab).weight.copy_(tensors[f"{PREFIX}{name}.{ab}.weight"])
    return model
