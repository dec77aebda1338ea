"""Helpers shared by the test modules: `from helpers import gaussian, bits`.

pytest's default ("prepend") import mode puts tests/ on sys.path for the test modules, which is
how they find this module; fixtures shared by several test files live in conftest.py.
"""
import torch


def gaussian(shape, seed=0, dtype=torch.float32):
    """A seeded N(0, 1) tensor, drawn in float32 on the CPU and cast to `dtype`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(t):
    """The raw bits of a float tensor, so that -0.0 != 0.0 and NaN == NaN compare as bits."""
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])
