"""Absmax quantization: the simplest way to store floats in a few bits (lesson 01).

Scale the tensor so its largest magnitude lands on the largest integer, round, and keep the
scale (the absmax) to undo it:

    levels = 2^(bits-1) - 1                      # 127 for int8, 7 for int4
    q      = round(x / absmax(x) * levels)       # integers in [-levels, levels]
    x_hat  = q * (absmax / levels)

Worked example (bits=8): x = [-0.976, 0.187, 0.886] has absmax 0.976, so
q = round(x * 127/0.976) = [-127, 24, 115] and x_hat = [-0.976, 0.1844, 0.8838].

One absmax for the whole tensor means one outlier stretches the grid for everybody: that is
the problem blockwise quantization (blockwise.py) solves. Rounding is torch.round, which
rounds halves to even. This module knows nothing of blocks or codebooks.
"""
import torch

from ._checks import check_bits, check_dtype, check_float


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` onto the integers -(2^(bits-1)-1) ... 2^(bits-1)-1 with one absmax.

    Returns (q, absmax): q is int8 for bits <= 8 (int16 up to 16 bits) in x's shape, absmax a
    float32 scalar tensor. An all-zero tensor has absmax 0 and quantizes to zeros.

    >>> q, a = absmax_quantize(torch.tensor([-0.976, 0.187, 0.886]))
    >>> q.tolist(), round(a.item(), 3)
    ([-127, 24, 115], 0.976)
    """
    check_float(x, "absmax_quantize")
    check_bits(bits, "absmax_quantize")
    levels = 2 ** (bits - 1) - 1
    xf = x.detach().float()                                  # no autograd history
    absmax = xf.abs().max() if xf.numel() else torch.zeros((), dtype=torch.float32)
    # x / absmax lies in [-1, 1] even for tiny absmax; an all-zero tensor (absmax 0) gives zeros
    unit = torch.where(absmax > 0, xf / absmax, torch.zeros_like(xf))
    q = torch.round(unit * levels).clamp(-levels, levels)
    return q.to(torch.int8 if bits <= 8 else torch.int16), absmax


def absmax_dequantize(q: torch.Tensor, absmax: torch.Tensor, bits: int = 8,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo absmax_quantize: x_hat = q * (absmax / (2^(bits-1)-1)), in `dtype`.

    >>> absmax_dequantize(torch.tensor([-127, 24, 115]), torch.tensor(0.976)).tolist()[0]
    -0.9760000109672546
    """
    check_bits(bits, "absmax_dequantize")
    check_dtype(dtype, "absmax_dequantize")
    levels = 2 ** (bits - 1) - 1
    x_hat = q.float() * (torch.as_tensor(absmax, dtype=torch.float32) / levels)
    return x_hat.to(dtype or torch.float32)
