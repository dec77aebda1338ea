"""Helpers shared by the test modules: `from helpers import gaussian, bits, Tiny`.

pytest's default ("prepend") import mode puts tests/ on sys.path for the test modules, which is
how they find this module; fixtures shared by several test files live in conftest.py.
"""
import torch
from torch import nn


def gaussian(shape, seed=0, dtype=torch.float32):
    """A seeded N(0, 1) tensor, drawn in float32 on the CPU and cast to `dtype`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(t):
    """The raw bits of a float tensor, so that -0.0 != 0.0 and NaN == NaN compare as bits."""
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


class Tiny(nn.Module):
    """embed (10 x 16) -> attn.q (16 -> 32) -> mlp (32 -> 16) -> norm -> lm_head (16 -> 10)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 16)
        self.attn = nn.ModuleDict({"q": nn.Linear(16, 32)})
        self.mlp = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, tokens):
        return self.lm_head(self.norm(self.mlp(self.attn["q"](self.embed(tokens)).relu())))
