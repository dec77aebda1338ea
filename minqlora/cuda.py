"""Dispatch for dequantize_4bit backends (being built by the CUDA-kernel issue: torch only so far)."""
import torch

from .double_quant import QuantState
from .double_quant import dequantize_4bit as dequantize_4bit_torch

BACKENDS = ("auto", "torch", "cuda", "emulate")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype=None, backend: str = "auto"):
    """dequantize_4bit with a choice of backend; "auto" is the torch path on CPU tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"dequantize_4bit: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend in ("auto", "torch"):
        return dequantize_4bit_torch(packed, state, dtype)
    raise NotImplementedError(f"backend {backend!r} is not built yet")
