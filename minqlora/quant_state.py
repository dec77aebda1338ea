"""The 4-bit storage format: packed bytes plus a QuantState (lesson 04).

    quantize_4bit:  absmax per block -> s = x * (1/absmax) -> index of the nearest code entry
                    -> two indices per byte, element 0 in the high nibble (lessons 02, 03);
                    the absmaxes double quantized (double_quant.py) unless double_quant=False;
                    done CHUNK values at a time, so a big weight's temporaries stay in cache
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

CHUNK = 1 << 18  # values quantized per step: the temporaries stay in the CPU's cache


@dataclass
class QuantState:
    """Everything needed to decode packed 4-bit bytes, laid out like bitsandbytes' QuantState."""
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str = "nf4"
    offset: Optional[torch.Tensor] = None
    state2: Optional["QuantState"] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax in float32, double-dequantized (with state2's own code) if nested."""
        if not self.nested:
            return self.absmax.float()
        inner = self.state2                                  # the absmaxes' own blockwise state
        return double_dequantize(self.absmax, inner.absmax, self.offset, inner.blocksize,
                                 inner.code)

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


_DYNAMIC_ON = {DYNAMIC.device: DYNAMIC}     # one copy per device, not one per forward pass


def _dynamic_on(device: torch.device) -> torch.Tensor:
    if device not in _DYNAMIC_ON:        # a plain dict, not lru_cache: torch.compile reads it
        _DYNAMIC_ON[device] = DYNAMIC.to(device)
    return _DYNAMIC_ON[device]


def absmax_state(absmax2: torch.Tensor, n_absmax: int) -> QuantState:
    """state2 of a double-quantized state: how its n_absmax qabsmax bytes decode (DYNAMIC, one
    absmax2 per BLOCKSIZE2 of them). The one place a state2 is built."""
    return QuantState(absmax=absmax2, code=_dynamic_on(absmax2.device), blocksize=BLOCKSIZE2,
                      shape=torch.Size([n_absmax]), dtype=torch.float32, quant_type="dynamic")


def check_state(packed: torch.Tensor, state: QuantState, where: str) -> None:
    """A ValueError unless packed and state fit together: ceil(n/2) uint8 bytes for state.shape,
    a power-of-two blocksize, at most 16 code values, one absmax per block (uint8 when nested)
    and, when nested, one offset and one absmax2 per state2.blocksize absmaxes."""
    n = state.shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != ceil_div(n, 2):
        raise ValueError(f"{where}: expected {ceil_div(n, 2)} uint8 bytes for shape "
                         f"{tuple(state.shape)}, got {packed.numel()} of {packed.dtype}")
    check_blocksize(state.blocksize, where)
    if state.code.numel() > 16:
        raise ValueError(f"{where}: a 4-bit code has at most 16 entries, got {state.code.numel()}")
    n_blocks = ceil_div(n, state.blocksize)
    if state.absmax.numel() != n_blocks or (state.nested and state.absmax.dtype != torch.uint8):
        raise ValueError(f"{where}: expected {n_blocks} {'uint8 q' if state.nested else ''}absmax "
                         f"values for {n} weights at blocksize {state.blocksize}, "
                         f"got {state.absmax.numel()} of {state.absmax.dtype}")
    if state.nested:
        inner, n_offsets = state.state2, 0 if state.offset is None else state.offset.numel()
        check_blocksize(inner.blocksize, where, "state2.blocksize")
        if n_offsets != 1 or inner.absmax.numel() != ceil_div(n_blocks, inner.blocksize):
            raise ValueError(f"{where}: a nested state needs one offset and one absmax2 per "
                             f"state2.blocksize absmaxes; got {n_offsets} and "
                             f"{inner.absmax.numel()} for {n_blocks} absmaxes at {inner.blocksize}")


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
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not x.sum().isfinite():
        check_float(x, "quantize_4bit")    # a finite sum is the cheap screen; this counts
    check_blocksize(blocksize, "quantize_4bit")
    if code is None:
        code = get_code(quant_type).to(x.device)
    else:
        check_code(code, "quantize_4bit", most=16, increasing=False)
        code, quant_type = code.to(x.device, torch.float32), "custom"
    sorted_code, index_of = torch.sort(code, stable=True)  # FP4's table is in bit order, unsorted
    in_order = torch.equal(index_of, torch.arange(code.numel(), device=x.device))   # NF4, INT4
    n, flat = x.numel(), x.reshape(-1)
    absmax = torch.empty(ceil_div(n, blocksize), dtype=torch.float32, device=x.device)
    packed = torch.empty(ceil_div(n, 2), dtype=torch.uint8, device=x.device)
    step = max(1, CHUNK // blocksize)           # whole blocks per chunk; every chunk but the
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
        state = replace(state, absmax=qabsmax, offset=offset,
                        state2=absmax_state(absmax2, absmax.numel()))
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
