"""MXState: what decodes an MXFP4 / NVFP4 tensor besides its bytes, and check_mx, the one
check every MX decode runs first (lesson 11; the formats are microscaling.py's).

    MXFP4: x_hat = E2M1[q] * 2^(e - 127)     e: one uint8 E8M0 exponent per block (255: NaN)
    NVFP4: x_hat = E2M1[q] * (t * S)         S: one float8_e4m3fn per block, t: one float32

Worked example: a (2, 64) tensor in MXFP4 with blocksize 32 has 64 bytes, 4 scales of shape
(2, 2) and no t; the same tensor's NVFP4 state at blocksize 16 has 8 scales and one t >= 2^-121.
A state of the other format, a scale count that does not match (one scale broadcast to 16
blocks), a scale of 255, an integer dtype or a blocksize of 0 is refused with a ValueError or
TypeError that says what was wrong, never decoded into NaN, integers or a broadcast.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import DECODABLE, check_blocksize, check_dtype, check_numel

T_MIN = 2.0 ** -121              # the least t with (1 / t) / 2^-6 (E4M3's least normal) finite


@dataclass
class MXState:
    """What decodes an MXFP4 / NVFP4 tensor: one scale per block of the last dimension.

    scales: (..., K // blocksize) uint8 E8M0 exponents (mxfp4) or float8_e4m3fn (nvfp4);
    tensor_scale: the float32 t of NVFP4 (None for MXFP4).
    """
    scales: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    format: str
    tensor_scale: Optional[torch.Tensor] = None

    def block_scales(self) -> torch.Tensor:
        """Each block's scale in float32: 2^(e - 127) for MXFP4, t * S for NVFP4."""
        if self.format == "mxfp4":
            return torch.exp2(self.scales.double() - 127).float()      # exact, 2^-127 included
        return self.tensor_scale * self.scales.float()

    def nbytes(self) -> int:
        """Bytes stored for the constants: one byte per block (+ 4 for NVFP4's t)."""
        return self.scales.numel() + (4 if self.tensor_scale is not None else 0)

    def bits_per_param(self) -> float:
        """4 bits per value + 8 per block (+ 32 per tensor for NVFP4): 4.25, or 4.5 + 32/n."""
        extra = 32 / self.shape.numel() if self.tensor_scale is not None else 0.0
        return 4 + 8 / self.blocksize + extra



def check_mx(packed, state, fmt: str, dtype, where: str) -> None:
    """A TypeError / ValueError unless `state` is an MXState of format `fmt` that fits packed:
    a power-of-two blocksize dividing the last of state.shape's sizes, a dtype to decode into,
    one scale per block (uint8 E8M0 exponents below 255 = NaN for mxfp4; finite float8_e4m3fn
    values >= 0 and one float32 t >= 2^-121 for nvfp4) and n / 2 uint8 bytes, on one device."""
    check_dtype(dtype, where)
    if not isinstance(state, MXState):
        raise TypeError(f"{where}: expected an MXState, got {type(state).__name__}")
    if state.format != fmt:
        raise ValueError(f"{where}: the state is {state.format!r}, not {fmt!r}")
    check_blocksize(state.blocksize, where)
    shape, scales, t = state.shape, state.scales, state.tensor_scale
    if not (isinstance(shape, torch.Size) and len(shape) and shape[-1] % state.blocksize == 0
            and state.dtype in DECODABLE):
        raise ValueError(f"{where}: state.shape must be a torch.Size whose last size is a "
                         f"multiple of blocksize {state.blocksize}, and state.dtype one of "
                         f"{[str(d) for d in DECODABLE]}; got {shape!r}, {state.dtype!r}")
    n, kind = check_numel(shape, where), torch.uint8 if fmt == "mxfp4" else torch.float8_e4m3fn
    if not (isinstance(scales, torch.Tensor) and scales.dtype == kind and scales.numel() == n
            // state.blocksize and (t is None and not (scales == 255).any() if fmt == "mxfp4"
                                  else _fine(scales.float(), t))):
        raise ValueError(f"{where}: expected {n // state.blocksize} {kind} scales (below 255 "
                         "for mxfp4, finite and >= 0 for nvfp4) and tensor_scale "
                         f"{'one float32 >= 2^-121' if fmt == 'nvfp4' else 'None'}")
    if not (isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8
            and packed.numel() * 2 == n and packed.device == scales.device):
        raise ValueError(f"{where}: expected {n // 2} uint8 bytes for shape {tuple(shape)} on "
                         f"{scales.device}, got {getattr(packed, 'dtype', type(packed))}")


def _fine(s, t) -> bool:
    """NVFP4's scales s (in float32) finite and >= 0, and t one float32 >= 2^-121 beside them."""
    return (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == 1 and
            t.device == s.device and bool(t.isfinite().all() & (t >= T_MIN).all()
                                          & s.isfinite().all() & (s >= 0).all()))
