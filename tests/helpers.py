"""Helpers shared by the test modules: `from helpers import gaussian, bits, Tiny, prepared_toy`.

pytest's default ("prepend") import mode puts tests/ on sys.path for the test modules, which is
how they find this module; fixtures shared by several test files live in conftest.py.
"""
import torch
from torch import nn

from minqlora import build
from minqlora.lora import LoRALinear
from minqlora.qlora import prepare_qlora
from minqlora.toy import ToyLM

from minqlora.bench.references import bnb_definition, probe_bnb_decode, same_bits  # noqa: F401


def gaussian(shape, seed=0, dtype=torch.float32):
    """A seeded N(0, 1) tensor, drawn in float32 on the CPU and cast to `dtype`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(t):
    """The raw bits of a float tensor, so that -0.0 != 0.0 and NaN == NaN compare as bits."""
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def private_cache(tmp_path, monkeypatch):
    """An empty build cache in tmp_path (never the user's, whose libraries this process has
    mapped), no $CXX, and no library remembered from earlier calls; returns its folder (not
    made yet). The `cache` fixture of the build-cache tests."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MINQLORA_CACHE", str(folder))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build, "_BUILT", {})
    return folder


def nonzero_lora_B(model, std=0.1):
    """Draw every LoRA B of `model` from N(0, std^2), in place; returns the model. LoRA starts
    with B = 0, where an adapter that was lost, swapped or never loaded looks the same."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, std)
    return model


def prepared_toy(seed=0, r=4, alpha=None, **kwargs):
    """ToyLM (seeded) through prepare_qlora: LoRA over 4-bit linears, alpha 2r unless given,
    float32 compute unless given, eval mode, every LoRA B non-zero (nonzero_lora_B)."""
    torch.manual_seed(seed)
    kwargs.setdefault("compute_dtype", torch.float32)
    alpha = 2 * r if alpha is None else alpha
    return nonzero_lora_B(prepare_qlora(ToyLM(), r=r, alpha=alpha, **kwargs).eval())


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


# bitsandbytes' decode as a reference, only where it agrees with the definition here ------------
# bitsandbytes' bytes and states are right on every CPU; its CPU decode is not (AVX-512 CPUs:
# see minqlora.bench.references.py). So tests compare minqlora's bytes and states with bitsandbytes'
# everywhere, and its decode only where the probe shows it equal to the definition here.
_PROBED = []


def bnb_decode_fault():
    """probe_bnb_decode() of bitsandbytes itself, run once per process."""
    if not _PROBED:
        import bitsandbytes
        _PROBED.append(probe_bnb_decode(bitsandbytes))
    return _PROBED[0]


class BnbReference:
    """bitsandbytes' decode where it equals the definition of the same bytes; elsewhere the
    definition, with the fault recorded, where the probe shows bitsandbytes' decoder wrong here.

        ref = BnbReference(bnb)
        assert same_bits(ours, ref.dequantize(packed, quant_state))  # theirs, or the definition
        if ref.fault is None: ...                  # what runs through bitsandbytes' decode
        ref.done()                                 # xfail naming the fault, if one was met

    A disagreement that the probe cannot explain fails at once: that is a finding, not noise."""

    def __init__(self, bnb, decode=None, probe=bnb_decode_fault):
        self.decode = decode or bnb.functional.dequantize_4bit
        self.probe, self.fault = probe, None

    def dequantize(self, packed, quant_state):
        theirs, definition = self.decode(packed, quant_state), bnb_definition(packed, quant_state)
        if same_bits(theirs, definition):
            return theirs
        fault = self.probe()
        assert fault is not None, ("bitsandbytes' decode differs from the definition of its own "
                                   "bytes here, and the probe found no fault in it")
        self.fault = fault
        return definition

    def done(self):
        import pytest
        if self.fault is not None:
            pytest.xfail(f"{self.fault}; minqlora was checked against the definition instead")
