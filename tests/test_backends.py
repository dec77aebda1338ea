"""backends.py: dequantize_4bit on each backend, all giving the bits of lesson 04's definition
(quant_state.decode_4bit), and the choice of backend."""
import pytest
import torch
from helpers import bits, gaussian
from hypothesis import given, settings
from hypothesis import strategies as st

from minqlora import backends
from minqlora.backends import BACKENDS, decode_in_chunks, dequantize_4bit
from minqlora.double_quant import DYNAMIC
from minqlora.nf4 import CODES
from minqlora.quant_state import decode_4bit, quantize_4bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), log2_bs=st.integers(1, 12), nested=st.booleans(),
       quant_type=st.sampled_from(list(CODES)), dtype=st.sampled_from(DTYPES))
def test_torch_backend_is_bit_identical_to_the_definition(n, log2_bs, nested, quant_type, dtype):
    """Odd counts, partial last blocks, blocksizes 2..4096, every code, every output dtype."""
    x = gaussian((n,), seed=n) * 3
    packed, state = quantize_4bit(x, 2 ** log2_bs, quant_type, double_quant=nested)
    got = dequantize_4bit(packed, state, dtype, backend="torch")
    want = decode_4bit(packed, state, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == x.shape
    assert torch.equal(bits(got), bits(want))


def test_torch_backend_across_chunk_boundaries(monkeypatch):
    """CHUNK values per step: a tensor of several chunks plus a partial one, with a partial last
    block, decodes as in one piece; so does a blocksize larger than a chunk."""
    monkeypatch.setattr(backends, "CHUNK", 256)
    for blocksize in (64, 1024):
        packed, state = quantize_4bit(gaussian((7, 333), seed=blocksize), blocksize)
        out = torch.empty(7 * 333, dtype=torch.bfloat16)
        decode_in_chunks(packed, state, out)
        assert torch.equal(bits(out), bits(decode_4bit(packed, state, torch.bfloat16)))


@pytest.mark.parametrize("backend", ["torch", "emulate"])
def test_a_custom_code_decodes_unchanged_on_every_backend(backend, request):
    """quantize_4bit(code=...) with 7 unsorted values: each backend reads the state's own code."""
    if backend == "emulate":
        request.getfixturevalue("emulation")
    code = torch.tensor([0.3, -1.0, 1.0, -0.4, 0.0, 0.75, -0.05])
    for nested in (False, True):
        x = gaussian((129, 5), seed=1)
        packed, state = quantize_4bit(x, 32, double_quant=nested, code=code)
        assert state.quant_type == "custom" and torch.equal(state.code, code)
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize_4bit(packed, state, dtype, backend=backend)
            assert torch.equal(bits(got), bits(decode_4bit(packed, state, dtype)))
            assert set(got.float().unique().tolist()) <= set(
                (code[:, None] * state.absmax_fp32()[None, :]).to(dtype).float().flatten().tolist())


def test_auto_is_torch_on_cpu(monkeypatch):
    packed, state = quantize_4bit(torch.randn(10))
    monkeypatch.setattr(backends, "launch_emulation", lambda *a: pytest.fail("auto ran the kernel"))
    monkeypatch.setattr(backends, "launch_cuda", lambda *a: pytest.fail("auto ran the kernel"))
    assert torch.equal(dequantize_4bit(packed, state), decode_4bit(packed, state))


def test_every_backend_validates_the_state_the_same_way(monkeypatch):
    """One check (quant_state.check_state) before any backend runs, whichever is chosen."""
    packed, state = quantize_4bit(torch.randn(100), 64)
    state.blocksize = 32                                     # 4 blocks expected, 2 stored
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="dequantize_4bit: expected 4 uint8 qabsmax values"):
            dequantize_4bit(packed, state, backend=backend)


def test_bad_arguments_say_what_was_expected():
    packed, state = quantize_4bit(torch.randn(100), 64)
    with pytest.raises(ValueError, match=r"unknown backend 'cupy'; choose one of \('auto', "):
        dequantize_4bit(packed, state, backend="cupy")
    with pytest.raises(ValueError, match="expected 50 uint8 bytes"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int32"):
        dequantize_4bit(packed, state, dtype=torch.int32)
    state.code = DYNAMIC
    with pytest.raises(ValueError, match="2 to 16 entries, got 256 of torch.float32"):
        dequantize_4bit(packed, state)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    """backend='cuda' on CPU tensors says what is missing (a GPU, CuPy) and how to get it."""
    packed, state = quantize_4bit(torch.randn(10))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backends, "cupy_or_none", lambda: None)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU.*needs CuPy: pip install -e "
                                         "\"\\.\\[gpu\\]\".*backend='emulate'"):
        dequantize_4bit(packed, state, backend="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="packed is on the CPU; move it"):
        dequantize_4bit(packed, state, backend="cuda")


def test_emulate_needs_cpu_tensors():
    packed, state = quantize_4bit(torch.randn(10))
    with pytest.raises(ValueError, match="backend='emulate'\\): needs CPU tensors, got meta"):
        dequantize_4bit(packed.to("meta"), state.to("meta"), backend="emulate")
