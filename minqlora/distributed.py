"""QLoRA across GPUs: the 4-bit weights as frozen parameters, so FSDP2 shards them (lesson 13).

PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) shards a module's *parameters*: on N ranks
each becomes a DTensor of which rank r keeps rows [r*c, (r+1)*c) of dim 0, c = ceil(rows / N).
Before the module's forward, and again before its backward, FSDP all-gathers the full tensors
and frees them afterwards. Buffers it leaves alone, whole on every rank, and Linear4bit keeps
its weight in buffers: fully_shard alone shards only the adapters (about 1% of the bytes).
`shardable` turns each Linear4bit's per-block tensors into frozen parameters:

    weight_packed  uint8 (out*in/2,)    sharded     4 bits per weight
    qabsmax        uint8 (n/64,)        sharded     0.125 bits per weight (absmax float32, 0.5,
                                                    without double quantization)
    code, absmax2, offset               replicated  16 floats per layer, 1 per 16,384 weights, 1

Why frozen uint8 parameters. FSDP1 flattens a unit's parameters into one FlatParameter of one
dtype, so bitsandbytes stores the bytes as bf16 (bnb_4bit_quant_storage) to sit beside the bf16
adapters. FSDP2 shards each parameter as its own DTensor, all-gathers mixed dtypes as bytes, and
its MixedPrecisionPolicy never casts a non-float parameter: uint8 works as it is. FSDP2's hooks
(fsdp_pre_all_gather on a tensor subclass, torchao's NF4Tensor) serve a weight whose bytes and
state travel as one tensor; Linear4bit already keeps them apart. requires_grad=False: FSDP
all-gathers them, never reduce-scatters a gradient for them, optimizers never see them. The
replicated three are about 0.002 bits per weight: sharding them would save nothing.

Worked example: a 64x64 q_proj holds 2,048 packed bytes + 64 qabsmax (sharded) and 64 + 4 + 4
bytes of code, absmax2, offset (replicated); each of 2 ranks keeps 1,024 + 32 + 72 = 1,128 of
its 2,184 bytes, 0.52.

Optimizers: torch's own take FSDP2's DTensor parameters (that is how FSDP2 is used).
PagedAdamW pages plain tensors, so `on_shards(PagedAdamW, params)` gives it each rank's shard
of every parameter and gradient: its state is per shard, 1/N of a single process's.
"""
import sys

import torch
from torch import nn

from .linear4bit import Linear4bit
from .lora import LoRALinear

SHARDED = ("weight_packed", "qabsmax", "absmax")   # per block of weights; the rest: per layer


class ShardableLinear4bit(Linear4bit):
    """Linear4bit with weight_packed and qabsmax (or absmax) as frozen nn.Parameters."""

    def _to_parameters(self) -> None:
        for name in SHARDED:
            if name in self._buffers:
                self._parameters[name] = nn.Parameter(self._buffers.pop(name), False)

    def constants(self) -> tuple:
        return tuple(getattr(self, name) for name in self._constant_names())

    def _set_state(self, packed, state) -> None:            # a load: buffers first, then again
        for name in SHARDED:
            self._parameters.pop(name, None)
        super()._set_state(packed, state)
        self._to_parameters()

    def _apply(self, fn, recurse=True):                      # float32 absmax keeps its dtype
        kept = {k: self._parameters.pop(k) for k in SHARDED if k in self._parameters}
        self._buffers.update(kept)
        super()._apply(fn, recurse)
        self._to_parameters()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        kept = dict(self._parameters)
        try:
            return super().load_state_dict(state_dict, strict, assign)
        except Exception:
            self._parameters.clear()
            self._parameters.update(kept)
            raise


def shardable(model: nn.Module) -> nn.Module:
    """Make every Linear4bit in `model` a ShardableLinear4bit, in place; returns the model."""
    for m in model.modules():
        if isinstance(m, Linear4bit) and type(m) not in (Linear4bit, ShardableLinear4bit):
            raise TypeError(f"shardable: {type(m).__name__} subclasses Linear4bit; making it a "
                            "ShardableLinear4bit would drop its own methods")
        if type(m) is Linear4bit:
            m.__class__ = ShardableLinear4bit
            m._to_parameters()
    return model


def fsdp_blocks(model: nn.Module) -> list:
    """The repeated blocks FSDP wraps one by one: the items of every nn.ModuleList."""
    return [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]


def shard_qlora(model: nn.Module, blocks=None, **fully_shard_kwargs) -> nn.Module:
    """FSDP2's recipe on a prepare_qlora model, 4-bit weights included: shardable(model), then
    fully_shard on each block (default: fsdp_blocks(model)), then on the root. kwargs go to every
    fully_shard (mesh, mp_policy, reshard_after_forward ...)."""
    from torch.distributed.fsdp import fully_shard
    shardable(model)
    for block in fsdp_blocks(model) if blocks is None else blocks:
        fully_shard(block, **fully_shard_kwargs)
    return fully_shard(model, **fully_shard_kwargs)


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that rank `rank` of `world` keeps: FSDP2 cuts with
    torch.chunk, c = ceil(rows / world) rows each, and gives the ranks chunk leaves out none.

    >>> [shard_rows(5, 4, r) for r in range(4)]
    [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    c = -(-rows // world)
    return min(rank * c, rows), min((rank + 1) * c, rows)


def _dtensor():
    """DTensor's class, or () while torch.distributed.tensor is not loaded (then no tensor is
    one): importing minqlora does not load it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module else ()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes to the parameter), or t."""
    if not isinstance(t, _dtensor()):
        return t
    with torch.no_grad():                     # a leaf, as an optimizer wants its parameters
        return t.to_local()


def held_bytes(model: nn.Module) -> dict:
    """Bytes this rank holds, by kind: the 4-bit layers' sharded and replicated tensors, the
    adapters (lora_A, lora_B) and everything else."""
    layers4 = [m for m in model.modules() if isinstance(m, Linear4bit)]
    sharded = {id(getattr(m, k)) for m in layers4 for k in SHARDED if hasattr(m, k)}
    replicated = {id(t) for m in layers4 for t in m.constants()} - sharded
    adapters = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                for p in (*m.lora_A.parameters(), *m.lora_B.parameters())}
    out = dict.fromkeys(("4bit_sharded", "4bit_replicated", "adapters", "other"), 0)
    for t in (*model.parameters(), *model.buffers()):
        kind = ("4bit_sharded" if id(t) in sharded else "4bit_replicated" if id(t) in replicated
                else "adapters" if id(t) in adapters else "other")
        out[kind] += local(t).nbytes
    return out


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state_dict on every rank, in bitsandbytes' layout (Linear4bit's): each
    sharded tensor all-gathered (DTensor.full_tensor). torch's get_model_state_dict(full_state_
    dict=True) does the same but first looks each key up as an attribute, and bitsandbytes'
    keys (weight.absmax, ...) are not attributes."""
    return {k: v.full_tensor() if isinstance(v, _dtensor()) else v
            for k, v in model.state_dict().items()}


def on_shards(optimizer_class, params, **kwargs) -> torch.optim.Optimizer:
    """optimizer_class over this rank's shard of each trainable parameter in `params` (tensors,
    not param groups): step() hands it the shards of the gradients FSDP reduce-scattered;
    zero_grad() also clears the parameters' gradients. Its state_dict() holds this rank's
    shards: save one per rank (gathering the optimizer's state into one file is not done)."""
    params = [p for p in params if p.requires_grad]
    shards = [local(p) for p in params]

    class OnShards(optimizer_class):
        def step(self, closure=None):
            for p, s in zip(params, shards):
                s.grad = None if p.grad is None else local(p.grad)
            return super().step(closure)

        def zero_grad(self, set_to_none: bool = True):
            for p in params:
                p.grad = None
            super().zero_grad(set_to_none)

    OnShards.__name__ = OnShards.__qualname__ = f"{optimizer_class.__name__}OnShards"
    return OnShards(shards, **kwargs)
