"""What a 4-bit state must be before any decoder reads it (lesson 04): check_state.

A decoder trusts its sizes: the C++ loop and the CUDA kernel index absmax[i // blocksize] and
code[nibble] without bounds, so a state one absmax short reads past a buffer instead of
raising. check_state is the one wall in front of them all (quant_state.decode_4bit,
backends.dequantize_4bit, launch.kernel_args, bnb_layout's loads):

    bytes   = ceil(n / 2) uint8                      n = shape.numel() <= 2^62
    absmax  = ceil(n / blocksize) values             float, or uint8 qabsmax when nested
    code    = 2 to 16 floats, 1-D                    blocksize: a power of two <= 2^62
    nested: one float offset; state2.absmax = ceil(n_blocks / state2.blocksize) floats;
            state2.code = the 256-value dynamic code

Worked example: 100 weights at blocksize 64 need 50 bytes and 2 absmaxes; a state that says
blocksize 32 (4 absmaxes) over the same 2 raises "expected 4 float absmax values for 100
weights at blocksize 32, got 2 of torch.float32".

Shapes, dtypes and counts only: no tensor value is read (no device sync). It takes any object
with QuantState's fields (quant_state.py builds QuantState and imports this check, so the
check cannot import the class).
"""
import torch

from ._checks import DECODABLE, check_blocksize, check_numel
from .blockwise import ceil_div

FIELDS = ("absmax", "code", "blocksize", "shape", "dtype", "offset", "state2")  # QuantState's


def check_state(packed: torch.Tensor, state, where: str) -> None:
    """A TypeError / ValueError unless packed and state fit together: ceil(n/2) uint8 bytes for
    state.shape (a torch.Size of n <= 2^62 values, counted without wrapping around), a DECODABLE
    state.dtype, a power-of-two blocksize <= 2^62 (C++'s shifts stay defined), a 1-D
    float code of 2 to 16 values, one absmax per block (float; uint8 when nested) and, when
    nested, one float offset and a state2 with a power-of-two blocksize, one float absmax2 per
    state2.blocksize absmaxes and a 256-value float code, all 1-D (or 0-d). Shapes and dtypes
    only: no tensor value is read (no device sync), so it is cheap enough for every call.

    >>> from minqlora.quant_state import quantize_4bit
    >>> packed, state = quantize_4bit(torch.zeros(100), 64, double_quant=False)
    >>> state.blocksize = 32                               # 4 blocks, 2 absmaxes stored
    >>> check_state(packed, state, "here")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: here: expected 4 float absmax values for 100 weights at blocksize 32, got 2 ...
    """
    if not all(hasattr(state, field) for field in FIELDS):
        raise TypeError(f"{where}: expected a QuantState, got {type(state).__name__}")
    if not isinstance(state.shape, torch.Size) or any(d < 0 for d in state.shape):
        raise TypeError(f"{where}: state.shape must be a torch.Size, got {state.shape!r}")
    if state.dtype not in DECODABLE:
        raise TypeError(f"{where}: state.dtype (what was quantized) must be a floating-point "
                        f"dtype ({', '.join(str(d)[6:] for d in DECODABLE)}), got {state.dtype!r}")
    n, nested, uint8 = check_numel(state.shape, where), state.state2 is not None, torch.uint8
    _fits(packed, ceil_div(n, 2), uint8, where, lambda: f"{ceil_div(n, 2)} uint8 bytes for "
          f"shape {tuple(state.shape)}", any_shape=True)      # messages made only on failure
    check_blocksize(state.blocksize, where)
    code = state.code
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not 2 <= code.numel() <= 16 \
            or not code.is_floating_point():
        raise ValueError(f"{where}: a 4-bit code is a 1-D floating-point tensor of 2 to 16 "
                         f"entries, got {_got(code)}")
    n_blocks = ceil_div(n, state.blocksize)
    _fits(state.absmax, n_blocks, uint8 if nested else None, where, lambda: f"{n_blocks} "
          f"{'uint8 q' if nested else 'float '}absmax values for {n} weights at blocksize "
          f"{state.blocksize}")
    if nested:
        inner = state.state2
        if not all(hasattr(inner, field) for field in FIELDS):
            raise TypeError(f"{where}: state.state2 must be a QuantState, got {_got(inner)}")
        check_blocksize(inner.blocksize, where, "state2.blocksize")
        n_absmax2 = ceil_div(n_blocks, inner.blocksize)
        _fits(state.offset, 1, None, where, lambda: "one float offset (the absmaxes' mean)")
        _fits(inner.absmax, n_absmax2, None, where, lambda: f"{n_absmax2} float absmax2 values "
              f"for {n_blocks} absmaxes at state2.blocksize {inner.blocksize}")
        _fits(inner.code, 256, None, where, lambda: "a 256-value float state2.code (the "
              "dynamic code; qabsmax indexes it)")


def _got(t) -> str:
    return f"{t.numel()} of {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _fits(t, numel: int, dtype, where: str, expected, any_shape: bool = False) -> None:
    """t holds numel values of `dtype` (None: any floating-point dtype), in one dimension (or
    none) unless any_shape; else a ValueError saying expected()."""
    if isinstance(t, torch.Tensor) and t.numel() == numel and (any_shape or t.dim() <= 1) and \
            (t.dtype == dtype if dtype is not None else t.dtype.is_floating_point):
        return
    got = f"{_got(t)}{f' in shape {tuple(t.shape)}' if isinstance(t, torch.Tensor) else ''}"
    raise ValueError(f"{where}: expected {expected()}, got {got}")
