"""Double quantization and the 4-bit storage format, QuantState (lesson 04).

Blockwise NF4 at blocksize 64 stores one float32 absmax per 64 weights: 32/64 = 0.5 extra bits
per parameter. QLoRA quantizes those constants too:

    offset    = mean(absmax)                                  one float32 for the tensor
    qabsmax, absmax2 = quantize_blockwise(absmax - offset, dynamic_code(), blocksize=256)
    absmax   ~= dynamic_code()[qabsmax] * absmax2[b // 256] + offset

Cost per parameter: 8/64 + 32/(64*256) = 0.127 bits instead of 0.5, so 4.127 bits in all
(vs 4.5). Subtracting the mean first centres the absmaxes (all positive) around zero so the
signed 8-bit code spends its values on both sides.

dynamic_code() is bitsandbytes' signed dynamic 8-bit map: a sign, then values
10^e * m for 7 decades e = -6..0, decade e holding 2^(e+6) mantissas m (midpoints of an even
split of [0.1, 1]), plus 0 and 1: 127 + 127 + 2 = 256 values, fine near 0, coarse near 1.

Worked example: a 64x64 weight has 4096/64 = 64 absmaxes; they fit in one block of 256, so
the state is 64 bytes of qabsmax, one absmax2 and one offset. Which code decodes those
64x64/2 = 2048 packed bytes is in QuantState.code.

This module does not pick a backend: the CUDA kernel (cuda.py) decodes the same format.
Note: bitsandbytes' CPU quantize_blockwise finds the nearest 8-bit code through a lookup
table that can miss by one step on rare values; minqlora picks the exact nearest code, so a
rare qabsmax byte can differ from bitsandbytes' CPU output (never from the definition).
"""
import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._checks import check_blocksize, check_code, check_float
from .blockwise import dequantize_blockwise, nearest_code, quantize_blockwise, scale_blocks
from .nf4 import get_code, pack_4bit

QUANT_TYPES = ("nf4", "fp4", "int4")
CHUNK = 1 << 18  # values decoded per step: enough to vectorise, few enough to stay in cache


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: 256 sorted float32 values in [-0.993, 1].

    >>> c = dynamic_code()
    >>> len(c), c[127].item(), c[-1].item(), round(c[128].item(), 9)
    (256, 0.0, 1.0, 5.5e-07)
    """
    values = [0.0, 1.0]
    for e in range(7):                                  # decades 10^-6 ... 10^0
        edges = torch.linspace(0.1, 1, 2 ** e + 1)      # float32, as in bitsandbytes
        mantissas = (edges[:-1] + edges[1:]) / 2.0      # 2^e midpoints
        values += (10 ** (e - 6) * mantissas).tolist() + (-(10 ** (e - 6)) * mantissas).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC = dynamic_code()


@functools.lru_cache(maxsize=None)
def dynamic_code_on(device: torch.device) -> torch.Tensor:
    """DYNAMIC on `device`, copied once per device (not once per forward pass)."""
    return DYNAMIC.to(device)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256):
    """absmax (float32) -> (qabsmax uint8, absmax2 float32 per 256 absmaxes, offset float32).

    >>> qabsmax, absmax2, offset = double_quantize(torch.tensor([1.0, 2.0, 3.0]))
    >>> qabsmax.tolist(), absmax2.tolist(), offset.item()   # [-1, 0, 1] -> codes 0.99.., 0, 1
    ([0, 127, 255], [1.0], 2.0)
    """
    check_float(absmax, "double_quantize")
    offset = absmax.float().mean() if absmax.numel() else torch.zeros(())
    qabsmax, absmax2 = quantize_blockwise(absmax.float() - offset, DYNAMIC, blocksize)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax, absmax2, offset, blocksize: int = 256) -> torch.Tensor:
    """Inverse of double_quantize: DYNAMIC[qabsmax] * absmax2[b] + offset, float32.

    >>> double_dequantize(torch.tensor([0, 127, 255], dtype=torch.uint8), torch.tensor([1.0]),
    ...                   torch.tensor(2.0)).tolist()      # DYNAMIC[0] = -0.99297
    [1.0070312023162842, 2.0, 3.0]
    """
    return dequantize_blockwise(qabsmax, absmax2, DYNAMIC, blocksize=blocksize) + offset


def constants_nbytes(n: int, blocksize: int = 64, double_quant: bool = True,
                     blocksize2: int = 256) -> int:
    """Bytes of the constants for n weights: float32 absmax per block, or, double quantized,
    uint8 per block + float32 absmax2 per blocksize2 blocks + one float32 offset.

    >>> constants_nbytes(4096 * 4096, double_quant=False), constants_nbytes(4096 * 4096)
    (1048576, 266244)
    """
    blocks = -(-n // blocksize)
    return blocks + 4 * -(-blocks // blocksize2) + 4 if double_quant else 4 * blocks


@dataclass
class QuantState:
    """Everything needed to decode packed 4-bit bytes, laid out like bitsandbytes' QuantState.

    absmax is float32 per block, or, when nested (double quantized), the uint8 qabsmax with
    `offset` and `state2` (the absmaxes' own state: absmax2, the dynamic code, blocksize 256).
    """
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
        """Per-block absmax in float32, double-dequantized where nested."""
        if not self.nested:
            return self.absmax.float()
        inner = self.state2                                  # the absmaxes' own blockwise state
        return dequantize_blockwise(self.absmax, inner.absmax, inner.code,
                                    blocksize=inner.blocksize) + self.offset

    def bits_per_param(self) -> float:
        """Storage bits per weight from the format: 4 + constants (4.5, or 4.127 when nested).

        Per weight, as the paper counts it: the single float32 offset and a partial last block's
        padding are left out (nbytes() counts what is really stored).

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
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        state2 = self.state2.to(device) if self.nested else None
        return replace(self, absmax=move(self.absmax), code=move(self.code),
                       offset=move(self.offset), state2=state2)


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, code: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, QuantState]:
    """x (any shape, float) -> (packed uint8 of ceil(n/2) bytes, QuantState). Byte-compatible
    with bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant).
    `code` (a sorted codebook of at most 16 values in [-1, 1]) overrides quant_type; the state
    records it with quant_type "custom".

    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [hex(b) for b in packed.tolist()], state.absmax.tolist()
    (['0xc0', '0x77'], [1.0])
    """
    check_float(x, "quantize_4bit")
    check_blocksize(blocksize, "quantize_4bit")
    if code is None:
        code = get_code(quant_type).to(x.device)
    else:
        check_code(code, "quantize_4bit")
        if code.numel() > 16:
            raise ValueError(f"quantize_4bit: a 4-bit code has at most 16 entries, got {code.numel()}")
        code, quant_type = code.to(x.device, torch.float32), "custom"
    n = x.numel()
    scaled, absmax = scale_blocks(x, blocksize)            # (n_blocks, blocksize), (n_blocks,)
    scaled = scaled.reshape(-1)[: n + n % 2]                # odd n: keep one zero pad value
    indices = nearest_code(scaled, code.sort().values)      # index into the sorted code
    if not bool((code[1:] > code[:-1]).all()):              # FP4's table is in bit order:
        indices = torch.argsort(code, stable=True)[indices]  # sorted position -> its bits
    state = QuantState(absmax, code, blocksize, x.shape, x.dtype, quant_type)
    if double_quant:
        qabsmax, absmax2, offset = double_quantize(absmax)
        state2 = QuantState(absmax2, dynamic_code_on(x.device), 256, absmax.shape, torch.float32,
                            "dynamic")
        state = replace(state, absmax=qabsmax, offset=offset, state2=state2)
    return pack_4bit(indices), state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype=None) -> torch.Tensor:
    """packed bytes + state -> the weight in state.shape, code[i] * absmax in float32, cast once
    to `dtype` (default: the dtype that was quantized).

    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [round(v, 4) for v in dequantize_4bit(packed, state).tolist()]   # NF4[12], NF4[0], NF4[7]
    [0.4407, -1.0, 0.0]
    """
    n = state.shape.numel()
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dequantize_4bit: dtype must be a floating-point dtype, got {dtype}")
    if state.code.numel() > 16:
        raise ValueError(f"dequantize_4bit: a 4-bit code has at most 16 entries, "
                         f"got {state.code.numel()}")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit: expected {(n + 1) // 2} uint8 bytes for shape "
                         f"{tuple(state.shape)}, got {packed.numel()} of {packed.dtype}")
    code = torch.nn.functional.pad(state.code.to(packed.device, torch.float32),
                                   (0, 16 - state.code.numel()))          # INT4 leaves index 15 unused
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2): byte -> (hi, lo)
    absmax = state.absmax_fp32().to(packed.device)                              # (n_blocks,) float32
    bs, n_blocks = state.blocksize, absmax.numel()
    data = packed.reshape(-1)
    if data.numel() * 2 < n_blocks * bs:                          # a partial last block: whole bytes
        data = torch.nn.functional.pad(data, (0, n_blocks * bs // 2 - data.numel()))
    out = torch.empty(n_blocks * bs, dtype=dtype or state.dtype, device=packed.device)
    step = max(1, CHUNK // bs)                                     # blocks per chunk
    for b in range(0, n_blocks, step):  # chunks of thousands of blocks: intermediates stay in cache
        values = torch.nn.functional.embedding(data[b * bs // 2:(b + step) * bs // 2].int(), pairs)
        values = values.view(-1, bs).mul_(absmax[b:b + step, None])   # (blocks, bs) fp32 products
        out[b * bs:(b + step) * bs] = values.view(-1)                  # the one cast to dtype
    return out[:n].view(state.shape)
