"""A 4-bit weight as bitsandbytes lays it out in a state_dict (lesson 07; read byte by byte in
lesson 10). Linear4bit.state_dict() writes it; Transformers' 4-bit checkpoints hold it.

    weight                                 uint8   (ceil(n/2), 1)   the packed 4-bit indices
    weight.absmax                          float32 (n_blocks,)      uint8 qabsmax when nested
    weight.quant_map                       float32 (16,)            the code
    weight.nested_absmax                   float32 (n_blocks/256,)  absmax2          } nested
    weight.nested_quant_map                float32 (256,)           the dynamic code } only
    weight.quant_state.bitsandbytes__nf4   uint8   (bytes of JSON)  what is not a tensor:
        {"quant_type", "blocksize", "dtype", "shape", and when nested "nested_blocksize",
         "nested_dtype", "nested_offset" (the offset, a float)}

Worked example: a float16 (3, 4) weight, NF4, blocksize 64, not nested, gives `weight` of 6
bytes, shape (6, 1); one absmax; and the 84 bytes of '{"quant_type": "nf4", "blocksize": 64,
"dtype": "float16", "shape": [3, 4]}' -- the dtype the weight decodes back to.

bitsandbytes decodes with the table its quant_type names, not with quant_map (its dequantize
ignores the stored table), so a state saying "nf4" must hold NF4 itself. minqlora's other
tables are stored as faithfully, named "int4" or "custom" (quant_map is then the table):
minqlora loads them back; bitsandbytes refuses them (it knows only nf4 and fp4).
"""
import json
import math

import torch

from .blockwise import ceil_div
from .double_quant import BLOCKSIZE2, DYNAMIC
from .nf4 import CODES
from ._checks import DECODABLE, MAX_SIZE, check_blocksize, check_numel
from .quant_state import QuantState, absmax_state
from .state_checks import check_state

QUANT_STATE = "quant_state.bitsandbytes__"      # + quant_type: the key of the JSON bytes


def state_as_dict(packed: torch.Tensor, state: QuantState, name: str = "weight") -> dict:
    """{name: bytes (ceil(n/2), 1), name.absmax, name.quant_map, [nested], name.quant_state...}
    in the order bitsandbytes writes them.

    >>> from minqlora.quant_state import quantize_4bit
    >>> d = state_as_dict(*quantize_4bit(torch.zeros(3, 4, dtype=torch.float16),
    ...                                  double_quant=False))
    >>> [(k, tuple(v.shape)) for k, v in d.items()][:3]
    [('weight', (6, 1)), ('weight.absmax', (1,)), ('weight.quant_map', (16,))]
    >>> bytes(d["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    '{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [3, 4]}'
    """
    info = {"quant_type": state.quant_type, "blocksize": state.blocksize,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    tensors = {"": packed.reshape(-1, 1), ".absmax": state.absmax,   # the tables are copies:
               ".quant_map": state.code.clone()}     # shared ones (NF4) would stop safetensors
    if state.nested:
        tensors.update({".nested_absmax": state.state2.absmax,
                        ".nested_quant_map": state.state2.code.clone()})
        info.update(nested_blocksize=state.state2.blocksize, nested_dtype="float32",
                    nested_offset=state.offset.item())
    tensors["." + QUANT_STATE + state.quant_type] = torch.tensor(
        list(json.dumps(info).encode()), dtype=torch.uint8, device=packed.device)
    return {name + k: v for k, v in tensors.items()}


def _json(tensors: dict, name: str) -> tuple[str, dict]:
    """The one quant_state key and its JSON dict, or a ValueError naming what was wrong."""
    keys = [k for k in tensors if k.startswith(f"{name}.{QUANT_STATE}")]
    if len(keys) != 1:
        raise ValueError(f"expected one key {name}.{QUANT_STATE}<quant_type>, got {keys}")
    key, blob = keys[0], tensors[keys[0]]
    try:
        info = json.loads(bytes(blob.cpu().reshape(-1).tolist()).decode())
    except (TypeError, ValueError, OverflowError, RecursionError):   # deep nesting too
        info = None
    if blob.dtype != torch.uint8 or not isinstance(info, dict):
        raise ValueError(f"{key}: expected the uint8 bytes of a JSON dict")
    return key, info


def state_from_dict(tensors: dict, name: str = "weight") -> tuple[torch.Tensor, QuantState]:
    """Inverse of state_as_dict: (packed uint8 (ceil(n/2),), QuantState), checked at load time
    (keys, JSON fields, sizes, tables); a ValueError names the key that is wrong."""
    key, info = _json(tensors, name)
    known_keys = {name + s for s in ("", ".absmax", ".quant_map", ".nested_absmax",
                                     ".nested_quant_map")} | {key}
    if tensors.keys() - known_keys:
        raise ValueError(f"unexpected key(s) {sorted(tensors.keys() - known_keys)} beside {key}")
    quant_type, nested = key.rpartition("__")[2], "nested_offset" in info
    need = ["", ".absmax", ".quant_map"] + [".nested_absmax", ".nested_quant_map"] * nested
    for k in [name + s for s in need]:
        if k not in tensors:
            raise ValueError(f"missing key {k!r} (the JSON in {key} says nested={nested})")
    extra = {f"{name}.nested_absmax", f"{name}.nested_quant_map"} & tensors.keys()
    if not nested and extra:
        raise ValueError(f"{key}: no nested_offset in the JSON, but {sorted(extra)} are given")
    fields = ["quant_type", "blocksize", "dtype", "shape"]
    fields += ["nested_blocksize", "nested_dtype", "nested_offset"] * nested
    if sorted(info) != sorted(fields):
        raise ValueError(f"{key}: expected JSON fields {fields}, got {list(info)}")
    dtype, shape = getattr(torch, str(info["dtype"]), None), info["shape"]
    if info["quant_type"] != quant_type:
        raise ValueError(f"{key}: the JSON says quant_type {info['quant_type']!r}")
    if dtype not in DECODABLE:
        raise ValueError(f"{key}: dtype must name a float dtype, got {info['dtype']!r} (one of "
                         f"{', '.join(str(d)[6:] for d in DECODABLE)})")
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s <= MAX_SIZE
                                              for s in shape):
        raise ValueError(f"{key}: shape must be a list of sizes (0 to 2^62), got {shape!r}")
    code, n = tensors[name + ".quant_map"], check_numel(shape, key)
    if code.dtype != torch.float32 or code.dim() != 1 or not 2 <= code.numel() <= 16:
        raise ValueError(f"{name}.quant_map: expected 2 to 16 float32 values in [-1, 1], got "
                         f"{code.numel()} of {code.dtype}")
    known = CODES.get(quant_type)
    if quant_type != "custom" and known is None:
        raise ValueError(f"{key}: unknown quant_type {quant_type!r}; minqlora knows "
                         f"{sorted(CODES) + ['custom']} (bitsandbytes only nf4 and fp4)")
    if known is not None and not torch.equal(code.cpu(), known):
        raise ValueError(f"{name}.quant_map is not the {quant_type} table that {key} names "
                         f"(bitsandbytes would decode with {quant_type}'s own table)")
    if not torch.isfinite(code).all() or code.abs().max() > 1:
        raise ValueError(f"{name}.quant_map: expected 2 to 16 float32 values in [-1, 1]")
    absmax, blocksize = tensors[name + ".absmax"], info["blocksize"]
    check_blocksize(blocksize, key)
    n_blocks, kind = ceil_div(n, blocksize), torch.uint8 if nested else torch.float32
    if absmax.dtype != kind or absmax.numel() != n_blocks:
        raise ValueError(f"{name}.absmax: expected {n_blocks} {kind} values (one per block of "
                         f"{blocksize} of the {n} weights), got {absmax.numel()} of {absmax.dtype}")
    packed = tensors[name].contiguous().reshape(-1).view(torch.uint8)  # any quant_storage: bytes
    if packed.numel() != ceil_div(n, 2):
        raise ValueError(f"{name}: expected {ceil_div(n, 2)} bytes for shape {shape}, got "
                         f"{packed.numel()}")
    state = QuantState(absmax=absmax, code=code, blocksize=blocksize, shape=torch.Size(shape),
                       dtype=dtype, quant_type=quant_type)
    if nested:
        absmax2, table = tensors[name + ".nested_absmax"], tensors[name + ".nested_quant_map"]
        if (info["nested_blocksize"], info["nested_dtype"]) != (BLOCKSIZE2, "float32"):
            raise ValueError(f"{key}: expected bitsandbytes' nested state (blocksize "
                             f"{BLOCKSIZE2}, float32), got blocksize "
                             f"{info['nested_blocksize']!r}, {info['nested_dtype']!r}")
        if table.dtype != torch.float32 or table.shape != (256,) or not torch.equal(
                table.cpu(), DYNAMIC):
            raise ValueError(f"{name}.nested_quant_map: expected the dynamic 8-bit map (256 "
                             f"float32 values), got {table.numel()} other {table.dtype} values")
        offset = info["nested_offset"]
        if absmax2.dtype != torch.float32 or absmax2.numel() != ceil_div(ceil_div(
                n, state.blocksize), BLOCKSIZE2) or not _finite32(offset):
            raise ValueError(f"{name}.nested_absmax: expected one float32 per {BLOCKSIZE2} "
                             f"absmaxes, got {absmax2.numel()} of {absmax2.dtype} (and "
                             f"nested_offset {offset!r}: a finite float32)")
        state.offset = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
        state.state2 = absmax_state(absmax2, absmax.numel())
    check_state(packed, state, name)     # byte count, blocksize, absmax count and dtype
    floats = [state.offset.reshape(1), state.state2.absmax] if nested else [absmax]
    if not all(torch.isfinite(t).all() for t in floats):
        raise ValueError(f"{name}.absmax / nested_absmax / nested_offset: non-finite values")
    if nested and not torch.isfinite(state.absmax_fp32()).all():   # finite parts, inf sum
        raise ValueError(f"{name}: the absmaxes decoded from nested_absmax, absmax and "
                         "nested_offset overflow float32 (code * absmax2 + offset is inf)")
    return packed, state


def _finite32(x) -> bool:
    """x is a JSON number that float32 holds as a finite value."""
    return type(x) in (int, float) and abs(x) <= 3.4028234663852886e38 and math.isfinite(x)
