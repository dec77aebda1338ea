"""Whole-model QLoRA: convert and count (lesson 07; merging back is merge.py's).

    prepare_qlora:  every targeted nn.Linear  ->  LoRALinear(Linear4bit.from_linear(linear))
                    everything else frozen; only lora_A / lora_B train
    trainable_summary:  parameters (trainable / total) and bytes by kind of storage:
                    4-bit weights with their constants | adapters | everything else

As QLoRA does, all linear layers get adapters by default (the paper finds that adapting only
the attention projections loses quality); the output head stays in 16/32 bits (exclude).

Worked example: one 4096x4096 linear at r=64 becomes 8,388,608 bytes of NF4, 266,244 bytes
of constants and a 64-byte codebook (4.127 bits per weight), plus 64 * (4096 + 4096) =
524,288 trainable adapter parameters (3.1% of the weights), 2 MiB in float32.

prepare_qlora converts a linear only where the swap cannot change what the model computes:
not a subclass with its own forward, not one with forward hooks or a parametrized weight, not
one whose parent reads its .weight instead of calling it (nn.MultiheadAttention's out_proj; the
linears of nn.TransformerEncoderLayer, whose inference fast path does), not one whose weight is
tied to another module's. Those it leaves as they are, frozen, lists in model.qlora_skipped
({name: reason}) and names in one UserWarning. A module registered under two names is replaced
under both by one LoRALinear, so it stays shared.

Bare Linear4bit layers (load_4bit's) get adapters as they are. The result's save_pretrained
raises, naming save_4bit / save_adapter (Transformers would write keys that load as random
weights). Not done here (PEFT's prepare_model_for_kbit_training does): gradient checkpointing,
upcasting layer norms. Elsewhere: the layers (lora.py, linear4bit.py), merging (merge.py).
"""
import warnings
from dataclasses import dataclass

from torch import nn

from .linear4bit import Linear4bit
from .lora import LoRALinear
from .save_guard import guard_save_pretrained


def name_matches(name: str, patterns) -> bool:
    """PEFT's rule for a list of names (prepare_qlora's target_modules and exclude, PEFT's
    target_modules in adapter.py): the full name, or its last dotted part(s).

    >>> name_matches("blocks.0.attn.q", ["q"]), name_matches("blocks.0.attn.q", ["attn.q"])
    (True, True)
    >>> name_matches("lm_head", ["head"])
    False
    """
    return any(name == p or name.endswith("." + p) for p in patterns)


def _inside(name: str, parents) -> bool:
    """Whether module `name` lies inside one of `parents` ("" is the root: holds everything)."""
    return any(p == "" or name.startswith(p + ".") for p in parents)


# parents that read a child linear's .weight / .bias themselves instead of calling it
READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def prepare_qlora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.1,
                  target_modules=None, exclude=("lm_head",), **linear4bit_kwargs) -> nn.Module:
    """Freeze `model` and swap each targeted nn.Linear for LoRA over a 4-bit copy, in place,
    where that is faithful (see the module docstring; the others: model.qlora_skipped).

    target_modules: None (every nn.Linear) or names matched as PEFT does (["q", "v"]).
    linear4bit_kwargs go to Linear4bit.from_linear (blocksize, quant_type, compute_dtype ...).

    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> model = prepare_qlora(model, r=4, exclude=("2",))
    >>> [type(m).__name__ for m in model], trainable_summary(model).trainable, model.qlora_skipped
    (['LoRALinear', 'ReLU', 'Linear'], 512, {})
    """
    target_modules = [target_modules] if isinstance(target_modules, str) else target_modules
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    aliases = {}                                  # id(linear) -> every name it is registered as
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Linear, Linear4bit)) and not _inside(name, adapted):
            aliases.setdefault(id(m), (m, []))[1].append(name)
    targets = [(m, names) for m, names in aliases.values()
               if not any(name_matches(n, exclude) for n in names)
               and (target_modules is None or any(name_matches(n, target_modules) for n in names))]
    skipped = {names[0]: why for m, names in targets
               if (why := _why_not_convert(model, m, names))}
    targets = [(m, names) for m, names in targets if names[0] not in skipped]
    if not targets:
        linears = [n for m, names in aliases.values() for n in names]
        raise ValueError(f"prepare_qlora: no nn.Linear matched target_modules={target_modules!r} "
                         f"(exclude={exclude!r}, layers already adapted are skipped) that can be "
                         f"converted faithfully {skipped or ''}; the model's linears are {linears}")
    layers = [(names, LoRALinear(m if isinstance(m, Linear4bit) else Linear4bit.from_linear(
        m, **linear4bit_kwargs), r, alpha, dropout)) for m, names in targets]  # bad ones raise
    model.requires_grad_(False)
    for names, layer in layers:
        for name in names:                        # one layer under all its names: still shared
            model = replace_module(model, name, layer)
    if skipped:
        warnings.warn(f"prepare_qlora left {len(skipped)} targeted linear layer(s) as they were "
                      "(frozen), because converting them would change what the model computes: "
                      + "; ".join(f"{n}: {why}" for n, why in skipped.items())
                      + " (also in model.qlora_skipped)", UserWarning, stacklevel=2)
    model.qlora_skipped = skipped
    guard_save_pretrained(model)
    return model


def _why_not_convert(model: nn.Module, linear: nn.Linear, names: list):
    """Why swapping `linear` (registered under `names`) could change the model's output, or
    None when it cannot."""
    if type(linear).forward not in (nn.Linear.forward, Linear4bit.forward):
        return f"{type(linear).__name__} has its own forward"
    if linear._forward_hooks or linear._forward_pre_hooks or hasattr(linear, "parametrizations"):
        return "it has forward hooks or a parametrized weight, which the new layer would lose"
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, READS_WEIGHTS):
            return (f"its parent {type(parent).__name__} reads its .weight directly instead of "
                    "calling it")
    own = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    tied = [n for n, p in model.named_parameters(remove_duplicate=False)
            if n not in own and any(p is q for q in (getattr(linear, "weight", 0), linear.bias))]
    if tied:
        return f"its weight or bias is tied to {tied}; a 4-bit copy would untie them"
    return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where submodule `name` (dotted, as named_modules() names it) was, and return
    the model; when name is "" the model itself is replaced, so `new` is returned.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    >>> replace_module(model, "1.0", nn.Tanh())[1][0]
    Tanh()
    """
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


@dataclass
class QLoRASummary:
    """Parameter counts (a 4-bit weight counts as its out*in parameters) and bytes by storage."""
    trainable: int
    total: int
    bytes_4bit: int        # packed weights + absmax constants + codebooks
    bytes_adapters: int    # lora_A / lora_B
    bytes_other: int       # every other parameter and buffer (embeddings, norms, biases, head)
    params_4bit: int

    @property
    def bits_per_4bit_param(self) -> float:
        return 8 * self.bytes_4bit / self.params_4bit if self.params_4bit else 0.0

    def __str__(self) -> str:
        total_bytes = self.bytes_4bit + self.bytes_adapters + self.bytes_other
        rows = [("4-bit weights + constants", self.bytes_4bit), ("adapters (lora_A, lora_B)",
                self.bytes_adapters), ("everything else", self.bytes_other), ("total", total_bytes)]
        lines = [f"trainable params: {self.trainable:,} of {self.total:,} "
                 f"({100 * self.trainable / max(self.total, 1):.2f}%)"]
        lines += [f"{kind:<27}{nbytes:>14,} bytes" for kind, nbytes in rows]
        if self.params_4bit:
            lines.append(f"4-bit storage: {self.bits_per_4bit_param:.3f} bits per 4-bit parameter")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> QLoRASummary:
    """Count parameters and bytes of a (QLoRA) model.

    >>> print(trainable_summary(nn.Linear(10, 10)))
    trainable params: 110 of 110 (100.00%)
    4-bit weights + constants               0 bytes
    adapters (lora_A, lora_B)               0 bytes
    everything else                       440 bytes
    total                                 440 bytes
    """
    layers4 = [m for m in model.modules() if isinstance(m, Linear4bit)]
    quantized = {id(b) for m in layers4 for b in (*m.buffers(), *m.parameters())  # parameters:
                 if b is not m.bias}                       # distributed.shardable's layers
    adapters = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                for p in (*m.lora_A.parameters(), *m.lora_B.parameters())}
    params = list(model.parameters())
    params_4bit = sum(m.in_features * m.out_features for m in layers4)

    def nbytes(keep) -> int:                     # bytes of the parameters and buffers kept
        return sum(t.nbytes for t in params + list(model.buffers()) if keep(id(t)))
    return QLoRASummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params if id(p) not in quantized) + params_4bit,
        bytes_4bit=nbytes(lambda i: i in quantized),
        bytes_adapters=nbytes(lambda i: i in adapters),
        bytes_other=nbytes(lambda i: i not in quantized and i not in adapters),
        params_4bit=params_4bit)
