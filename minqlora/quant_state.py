"""The 4-bit storage format: packed bytes plus a QuantState (lesson 04).

    quantize_4bit:  absmax per block -> s = x * (1/absmax) -> index of the nearest code entry
                    -> two indices per byte, element 0 in the high nibble (lessons 02, 03);
                    the absmaxes double quantized (double_quant.py) unless double_quant=False;
                    done QUANTIZE_CHUNK values at a time, so a big weight's temporaries stay
                    in cache
    decode_4bit:    x_hat = code[index] * absmax[block], in float32, cast once to the dtype

QuantState holds everything but the bytes, laid out like bitsandbytes' QuantState: absmax
(float32 per block, or the uint8 qabsmax when nested), code (the 4-bit table), blocksize,
shape, dtype, quant_type and, when nested, the offset and state2 (the absmaxes' own state:
absmax2, the dynamic code, blocksize 256).

Worked example: x = [0.5, -1.0, 0.0] in NF4 is one block with absmax 1. 0.5 lies below the
midpoint of NF4[12] = 0.4407 and NF4[13] = 0.5626, so it gets 12; -1 gets 0, 0 gets 7, and the
odd count is padded with the code of 0: bytes 0xC0 0x77, decoded [0.4407, -1.0, 0.0].

decode_4bit is the format's definition, built from lessons 02 and 03 alone. mq.dequantize_4bit
(backends.py, lesson 05) gives the same bits faster, on the backend of your choice.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._checks import check_blocksize, check_code, check_dtype, check_float
from .blockwise import ceil_div, dequantize_blockwise, nearest_code, scale_blocks
from .double_quant import BLOCKSIZE2, DYNAMIC, double_dequantize, double_quantize
from .nf4 import get_code, pack_4bit, unpack_4bit
from .state_checks import check_state

QUANTIZE_CHUNK = 1 << 18  # values quantized per step: the temporaries stay in the cache
SCREENED = (torch.float32, torch.bfloat16, torch.float16)  # a finite sum: finite, in range


@dataclass(eq=False)
class QuantState:
    """Everything needed to decode packed 4-bit bytes, laid out like bitsandbytes' QuantState.
    Two states are equal when they have the same format and the same bytes (any device)."""
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str = "nf4"
    offset: Optional[torch.Tensor] = None
    state2: Optional["QuantState"] = None

    def __post_init__(self):
        if type(self.shape) in (tuple, list) and all(type(d) is int for d in self.shape):
            self.shape = torch.Size(self.shape)            # (3, 4) -> torch.Size([3, 4])

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        fields = ("blocksize", "shape", "dtype", "quant_type")
        return (all(getattr(self, f) == getattr(other, f) for f in fields)
                and all(_same_bytes(getattr(self, t), getattr(other, t))
                        for t in ("absmax", "code", "offset")) and self.state2 == other.state2)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax in float32, double-dequantized (with state2's own code) if nested."""
        if not self.nested:
            return self.absmax.float()
        inner = self.state2          # the absmaxes' own blockwise state, in float32 as the kernels
        return double_dequantize(self.absmax, inner.absmax.float(), self.offset.float(),
                                 inner.blocksize, inner.code.float())

    def bits_per_param(self) -> float:
        """Storage bits per weight, as the paper counts them (4.5, or 4.127 when nested): the
        single offset and a partial last block's padding are left out; nbytes() counts them.

        >>> quantize_4bit(torch.ones(64), double_quant=False)[1].bits_per_param()
        4.5
        >>> quantize_4bit(torch.ones(64), double_quant=True)[1].bits_per_param()
        4.126953125
        """
        if not self.nested:
            return 4 + 32 / self.blocksize
        return 4 + 8 / self.blocksize + 32 / (self.blocksize * self.state2.blocksize)

    def nbytes(self) -> int:
        """Bytes actually stored for the constants (absmax or qabsmax, absmax2, offset)."""
        tensors = [self.absmax] + ([self.offset, self.state2.absmax] if self.nested else [])
        return sum(t.nbytes for t in tensors)

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        state2 = self.state2.to(device) if self.nested else None
        return replace(self, absmax=move(self.absmax), code=move(self.code),
                       offset=move(self.offset), state2=state2)


def _same_bytes(a, b) -> bool:
    """Both None, or tensors of one dtype and shape holding the same bytes (-0.0 != 0.0)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a is None and b is None
    if a.is_meta or b.is_meta:                              # no bytes to compare
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        *(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)))


_DYNAMIC_ON = {}     # one copy per device (never DYNAMIC itself), not one per forward pass


def _dynamic_on(device: torch.device) -> torch.Tensor:
    if device not in _DYNAMIC_ON:        # a plain dict, not lru_cache: torch.compile reads it
        _DYNAMIC_ON[device] = DYNAMIC.to(device, copy=True)
    return _DYNAMIC_ON[device]


def absmax_state(absmax2: torch.Tensor, n_absmax: int, code: torch.Tensor = None,
                 shared: bool = False) -> QuantState:
    """state2 of a double-quantized state: how its n_absmax qabsmax bytes decode (DYNAMIC, one
    absmax2 per BLOCKSIZE2 of them). The one place a state2 is built. code=None: the state's own
    copy of DYNAMIC (an edit of one state's table changes no other); shared=True: one copy per
    device, for Linear4bit's passes, whose states never leave them."""
    if code is None:
        code = _dynamic_on(absmax2.device) if shared else _dynamic_on(absmax2.device).clone()
    return QuantState(absmax=absmax2, code=code, blocksize=BLOCKSIZE2,
                      shape=torch.Size([n_absmax]), dtype=torch.float32, quant_type="dynamic")


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, code: torch.Tensor = None
                  ) -> tuple[torch.Tensor, QuantState]:
    """x (any shape, float) -> (packed uint8 of ceil(n/2) bytes, QuantState). Byte-compatible
    with bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant).
    `code`: any 4-bit table (2 to 16 values in [-1, 1], in any order) instead of quant_type's;
    the state then says quant_type "custom".

    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [hex(b) for b in packed.tolist()], state.absmax.tolist()
    (['0xc0', '0x77'], [1.0])
    """
    if not (isinstance(x, torch.Tensor) and x.dtype in SCREENED and x.sum().isfinite()):
        check_float(x, "quantize_4bit")    # a finite sum is the cheap screen; this counts
    check_blocksize(blocksize, "quantize_4bit")
    if code is None:                                       # the state's own copy of the table
        code = get_code(quant_type).to(x.device, copy=True)
    else:
        check_code(code, "quantize_4bit", most=16, increasing=False)
        code, quant_type = code.to(x.device, torch.float32), "custom"
    sorted_code, index_of = torch.sort(code, stable=True)  # FP4's table is in bit order, unsorted
    in_order = torch.equal(index_of, torch.arange(code.numel(), device=x.device))   # NF4, INT4
    n, flat = x.numel(), x.reshape(-1)
    absmax = torch.empty(ceil_div(n, blocksize), dtype=torch.float32, device=x.device)
    packed = torch.empty(ceil_div(n, 2), dtype=torch.uint8, device=x.device)
    step = max(1, QUANTIZE_CHUNK // blocksize)  # whole blocks per chunk; every chunk but the
    for b in range(0, absmax.numel(), step):    # last holds an even number of values
        first, last = b * blocksize, min((b + step) * blocksize, n)
        scaled, absmax[b:b + step] = scale_blocks(flat[first:last], blocksize)
        scaled = scaled.reshape(-1)[: last - first + (last - first) % 2]  # odd n: one zero pad
        indices = nearest_code(scaled, sorted_code)     # position in the sorted code, uint8
        if not in_order:                                # -> index into code
            indices = index_of[indices.long()]
        packed[first // 2: ceil_div(last, 2)] = pack_4bit(indices)
    state = QuantState(absmax=absmax, code=code, blocksize=blocksize, shape=x.shape,
                       dtype=x.dtype, quant_type=quant_type)
    if double_quant:
        qabsmax, absmax2, offset = double_quantize(absmax)
        state = replace(state, absmax=qabsmax, offset=offset, state2=absmax_state(
            absmax2, absmax.numel(), DYNAMIC.to(x.device, copy=True)))
        if absmax.numel() and absmax2.max() + offset > 3e38 and \
                not torch.isfinite(state.absmax_fp32()).all():    # code * absmax2 + offset
            raise ValueError("quantize_4bit: absmaxes this close to float32's maximum "
                             f"({absmax.max().item():.4g}) overflow when double quantized; "
                             "use double_quant=False or scale the tensor down")
    return packed, state


def decode_4bit(packed: torch.Tensor, state: QuantState, dtype=None) -> torch.Tensor:
    """The definition: x_hat = code[index] * absmax[block] in float32, cast once to `dtype`
    (default: the dtype that was quantized), in state.shape.

    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [round(v, 4) for v in decode_4bit(packed, state).tolist()]   # NF4[12], NF4[0], NF4[7]
    [0.4407, -1.0, 0.0]
    """
    check_dtype(dtype, "decode_4bit")
    check_state(packed, state, "decode_4bit")
    indices = unpack_4bit(packed.reshape(-1), state.shape.numel())        # (n,) uint8
    x_hat = dequantize_blockwise(indices, state.absmax_fp32(), state.code, state.blocksize,
                                 dtype or state.dtype)                      # (n,)
    return x_hat.reshape(state.shape)
