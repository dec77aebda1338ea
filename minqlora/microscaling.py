"""MXFP4 and NVFP4: the 4-bit formats that GPUs since Blackwell run in hardware (lesson 11).

Both store each value as E2M1, a 4-bit float: a sign bit and 3 bits indexing the magnitudes
[0, 0.5, 1, 1.5, 2, 3, 4, 6]; rounding is to the nearest, ties to the even index (the one
with mantissa bit 0), and anything beyond 6 saturates to 6. They differ in the block scale:

  MXFP4 (OCP Microscaling v1.0), blocks of 32, one E8M0 scale = a bare power of two:
      X = 2^(floor(log2(absmax)) - 2)          (2: the exponent of E2M1's largest value, 6)
      q = E2M1(x / X)                          stored: the 8-bit exponent, bias 127
  NVFP4, blocks of 16, an E4M3 block scale times one float32 scale per tensor:
      t = absmax(tensor) / (448 * 6)           (448: E4M3's largest value)
      S = E4M3(clamp(absmax(block) / 6 / t, 2^-6, 448))
      q = E2M1(x * ((1 / t) / S))
  and decoding is x_hat = E2M1[q] * X, or E2M1[q] * (t * S), in float32, cast once.

Bits per value: MXFP4 4 + 8/32 = 4.25; NVFP4 4 + 8/16 + 32/n = 4.5 + 32/n. MXFP4 is lesson
02's blockwise quantizer with the code E2M1/6 and the absmax rounded DOWN to a power of two
times 4, so a block's largest values may saturate; a power of two is a shift in silicon. NVFP4
pays 4 more bits per 16 values for a finer scale: double quantization in hardware.
Element 0 goes in the LOW nibble (the OCP / torch.float4_e2m1fn_x2 order), unlike NF4's.

Matches torchao 0.18 bit for bit (MXTensor.to_mx with its default FLOOR rule, the OCP one;
NVFP4Tensor.to_nvfp4 with per_tensor_scale = absmax / 2688) except in two corners. MX: where
the scale is 2^-127 (absmax < 2^-124) torchao divides by 2^-126 and multiplies back by 2^-127;
here X is used both ways. NVFP4: t >= 2^-121 here, so (1 / t) / S stays finite where torchao's
overflows (NaN or saturated codes for all-zero tensors and absmax < 2688 * 2^-121 = 1.0e-33).
Worked example: x = [0.3, -1.0, 5.0, 0.2] with blocksize 4: absmax 5, X = 2^(2-2) = 1,
q codes 0.5, -1, 4 (5 is a tie: 4 has the even index), 0 (0.2 is nearer to 0 than to 0.5).
"""
from typing import Optional

import torch

from ._checks import check_blocksize, check_float
from .mx_state import T_MIN, MXState, check_mx
from .nf4 import pack_4bit

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float32)
E2M1 = torch.cat([E2M1, -E2M1])                  # index = the 4 bits; 8..15 have the sign set
_MIDPOINTS = (E2M1[1:8] + E2M1[:7]) / 2          # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
_PAIRS = torch.stack([E2M1.repeat(16), E2M1.repeat_interleave(16)], dim=1)  # (256, 2): low, high
E4M3_MAX, E4M3_TINY = 448.0, 2.0 ** -6           # largest and smallest normal E4M3 values


def _blocks(x, blocksize, where):
    check_float(x, where)
    check_blocksize(blocksize, where)
    if x.dim() == 0 or x.shape[-1] % blocksize:
        raise ValueError(f"{where}: the last dimension must be a multiple of the blocksize "
                         f"{blocksize}, got shape {tuple(x.shape)}")
    return x.float().reshape(-1, blocksize)                  # (n_blocks, blocksize) float32


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 bits (uint8 0..15): nearest, ties to even, saturating at 6.

    Lesson 02's rule, the index is the number of midpoints below |v|, with "below" meaning
    strictly below where the lower neighbour has the even index (0.25, 1.25, 2.5, 5) and at
    or below where the upper one has (0.75, 1.75, 3.5).

    >>> e2m1_encode(torch.tensor([0.25, 0.75, 5.0, 7.0, -0.1, -2.6])).tolist()
    [0, 2, 6, 7, 8, 13]
    """
    mag = v.abs()
    index = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for k, midpoint in enumerate(_MIDPOINTS.tolist()):
        index += (mag >= midpoint) if k % 2 else (mag > midpoint)
    return index | (torch.signbit(v).to(torch.uint8) << 3)       # -0.0 keeps its sign bit


def _pack(bits, shape):
    """Two E2M1 codes per byte, element 0 in the low nibble: (..., K) -> (..., K // 2)."""
    return pack_4bit(bits.reshape(-1, 2).flip(1)).reshape(*shape[:-1], shape[-1] // 2)


def _decode(packed, state, dtype, where):
    check_mx(packed, state, where.rpartition("_")[2], dtype, where)
    pairs = _PAIRS.to(packed.device)                                  # byte -> its two values
    values = torch.nn.functional.embedding(packed.reshape(-1).long(), pairs)     # (n // 2, 2)
    values = values.view(-1, state.blocksize) * state.block_scales().reshape(-1, 1)
    return values.to(dtype or state.dtype).reshape(state.shape)


def quantize_mxfp4(x: torch.Tensor, blocksize: int = 32) -> tuple[torch.Tensor, MXState]:
    """x (..., K), K a multiple of blocksize -> (packed uint8 (..., K // 2), MXState).

    >>> packed, state = quantize_mxfp4(torch.tensor([0.3, -1.0, 5.0, 0.2]), blocksize=4)
    >>> [hex(b) for b in packed.tolist()], state.scales.tolist()
    (['0xa1', '0x6'], [127])
    >>> dequantize_mxfp4(packed, state).tolist()
    [0.5, -1.0, 4.0, 0.0]
    """
    blocks = _blocks(x, blocksize, "quantize_mxfp4")
    absmax = blocks.abs().amax(dim=1)                                # (n_blocks,)
    exponent = ((absmax.view(torch.int32) >> 23) & 0xFF) - 127      # floor(log2); 0 -> -127
    scales = ((exponent - 2).clamp(-127, 127) + 127).to(torch.uint8)  # E8M0, bias 127
    state = MXState(scales.reshape(*x.shape[:-1], x.shape[-1] // blocksize), blocksize,
                    x.shape, x.dtype, "mxfp4")
    bits = e2m1_encode(blocks / state.block_scales().reshape(-1, 1))
    return _pack(bits, x.shape), state


def dequantize_mxfp4(packed: torch.Tensor, state: MXState, dtype=None) -> torch.Tensor:
    """E2M1[q] * 2^(e - 127) in float32, cast once to dtype (default: the quantized dtype)."""
    return _decode(packed, state, dtype, "dequantize_mxfp4")


def quantize_nvfp4(x: torch.Tensor, blocksize: int = 16, tensor_scale: Optional[float] = None
                   ) -> tuple[torch.Tensor, MXState]:
    """x (..., K) -> (packed uint8 (..., K // 2), MXState with E4M3 scales and t). tensor_scale:
    t (default absmax / 2688; 1.0 gives torchao's single-level to_nvfp4(x)).

    >>> packed, state = quantize_nvfp4(torch.tensor([0.3, -1.0, 5.0, 0.2]), blocksize=4)
    >>> x_hat = dequantize_nvfp4(packed, state)
    >>> state.scales.float().tolist(), [round(v, 4) for v in x_hat.tolist()]
    ([448.0], [0.4167, -0.8333, 5.0, 0.0])
    """
    blocks = _blocks(x, blocksize, "quantize_nvfp4")
    if tensor_scale is None:                                         # an empty x: t = 2^-121
        absmax = x.detach().abs().amax().float() if x.numel() else torch.tensor(0.0)
        tensor_scale = (absmax / (E4M3_MAX * 6)).clamp(min=T_MIN)
    t = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device)
    if t.numel() != 1 or not (torch.isfinite(t) & (t >= T_MIN)).all():
        raise ValueError(f"quantize_nvfp4: tensor_scale must be one finite number >= 2^-121, "
                         f"got {tensor_scale!r}")
    block_scale = blocks.abs().amax(dim=1) / 6.0 / t                 # (n_blocks,) float32
    scales = block_scale.clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn)
    v = blocks * ((1.0 / t) / scales.float()).unsqueeze(1)           # torchao's order of ops
    bits = e2m1_encode(v)                                            # saturates at +-6
    state = MXState(scales.reshape(*x.shape[:-1], x.shape[-1] // blocksize), blocksize,
                    x.shape, x.dtype, "nvfp4", t)
    return _pack(bits, x.shape), state


def dequantize_nvfp4(packed: torch.Tensor, state: MXState, dtype=None) -> torch.Tensor:
    """E2M1[q] * (t * S) in float32, cast once to dtype (default: the quantized dtype)."""
    return _decode(packed, state, dtype, "dequantize_nvfp4")
