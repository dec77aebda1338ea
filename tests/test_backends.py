"""backends.py: dequantize_4bit on each backend, all giving the bits of lesson 04's definition
(quant_state.decode_4bit), and the choice of backend."""
import pytest
import torch
from helpers import bits, gaussian
from hypothesis import given, settings
from hypothesis import strategies as st

from minqlora import backends
from minqlora.backends import REGISTRY, decode_in_chunks, dequantize_4bit
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
    """DECODE_CHUNK values per step: a tensor of several chunks plus a partial one, with a
    partial last block, decodes as in one piece; so does a blocksize larger than a chunk."""
    monkeypatch.setattr(backends, "DECODE_CHUNK", 256)
    for blocksize in (64, 1024):
        packed, state = quantize_4bit(gaussian((7, 333), seed=blocksize), blocksize)
        out = torch.empty(7 * 333, dtype=torch.bfloat16)
        decode_in_chunks(packed, state, out)
        assert torch.equal(bits(out), bits(decode_4bit(packed, state, torch.bfloat16)))


NEEDS = {"emulate": "emulation", "cpp": "decoder"}   # the fixture that builds each C++ backend


@pytest.mark.parametrize("backend", ["torch", "emulate", "cpp"])
def test_a_custom_code_decodes_unchanged_on_every_backend(backend, request):
    """quantize_4bit(code=...) with 7 unsorted values: each backend reads the state's own code."""
    if backend in NEEDS:
        request.getfixturevalue(NEEDS[backend])
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


def _record_launches(monkeypatch):
    """Replace the four launchers by recorders (each still decodes, through the torch path)."""
    ran = []
    for name, (decode, picked) in backends.REGISTRY.items():
        def launcher(packed, state, out, name=decode.__name__, checked=False):
            ran.append(name)
            assert checked                      # dequantize_4bit checked the state, once
            decode_in_chunks(packed, state, out)
        monkeypatch.setitem(backends.REGISTRY, name, (launcher, picked))
    return ran


def test_auto_on_cpu_is_the_cpu_decoder_where_a_compiler_is_found(monkeypatch):
    """Linux + a C++ compiler: the C++ loop written for the CPU ("cpp"); no compiler, or not
    Linux: torch. The emulation is never auto's pick (it is the GPU kernel's text, for lesson
    05). The choice depends only on what is installed (auto_backend says it), never on what
    failed."""
    packed, state = quantize_4bit(torch.randn(10))
    ran = _record_launches(monkeypatch)
    for found, platform, want in ((True, "linux", "decode_cpp"),
                                  (False, "linux", "decode_in_chunks"),
                                  (True, "darwin", "decode_in_chunks")):
        monkeypatch.setattr(backends, "_has_compiler", lambda found=found: found)
        monkeypatch.setattr(backends.sys, "platform", platform)
        assert backends.auto_backend("cpu") == {"decode_cpp": "cpp"}.get(want, "torch")
        assert torch.equal(dequantize_4bit(packed, state), decode_4bit(packed, state))
        assert ran.pop() == want and not ran


def test_auto_on_cuda_needs_cupy_and_tracing_is_always_torch(monkeypatch):
    monkeypatch.setattr(backends, "_has_compiler", lambda: True)
    monkeypatch.setattr(backends, "cupy_or_none", lambda: object())
    assert backends.auto_backend(torch.device("cuda", 0)) == "cuda"
    monkeypatch.setattr(backends, "cupy_or_none", lambda: None)
    assert backends.auto_backend("cuda") == "torch" == backends.auto_backend("meta")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # inside torch.compile
    assert backends.auto_backend("cpu") == "torch"


def test_auto_never_falls_back_when_its_backend_fails(monkeypatch):
    """A compiler that is there but cannot build the kernel is an error, not a quiet switch."""
    packed, state = quantize_4bit(torch.randn(10))
    monkeypatch.setattr(backends, "_has_compiler", lambda: True)
    monkeypatch.setattr(backends.sys, "platform", "linux")

    def broken(*args, **kwargs):
        raise RuntimeError("building kernels/dequant_cpu.cpp with g++ failed")
    monkeypatch.setitem(backends.REGISTRY, "cpp", (broken, backends.REGISTRY["cpp"][1]))
    monkeypatch.setitem(backends.REGISTRY, "torch", (lambda *a, **k: pytest.fail("fell back"),
                                                     backends.REGISTRY["torch"][1]))
    with pytest.raises(RuntimeError, match="building kernels/dequant_cpu.cpp"):
        dequantize_4bit(packed, state)


def test_every_backend_validates_the_state_the_same_way(monkeypatch):
    """One check (state_checks.check_state) before any backend runs, whichever is chosen."""
    packed, state = quantize_4bit(torch.randn(100), 64)
    state.blocksize = 32                                     # 4 blocks expected, 2 stored
    for backend in ("auto", *REGISTRY):
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


@pytest.mark.parametrize("backend", ["emulate", "cpp"])
def test_the_cpu_backends_need_cpu_tensors(backend):
    packed, state = quantize_4bit(torch.randn(10))
    with pytest.raises(ValueError, match=f"backend='{backend}'\\): needs CPU tensors, got meta"):
        dequantize_4bit(packed.to("meta"), state.to("meta"), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "emulate", "cpp"])
def test_a_big_output_asked_for_huge_pages_holds_the_same_bits(backend, request):
    """Outputs of 8 MiB and more get the MADV_HUGEPAGE hint (on Linux): a hint, same values."""
    if backend in NEEDS:
        request.getfixturevalue(NEEDS[backend])
    out = backends.empty_output(3 * backends.HUGE_PAGE + 5, torch.float32, "cpu")
    assert out.shape == (3 * backends.HUGE_PAGE + 5,) and out.dtype == torch.float32
    packed, state = quantize_4bit(gaussian((1500, 1401), seed=3).bfloat16())   # 8.0 MiB of fp32
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_4bit(packed, state, dtype, backend=backend)
        assert torch.equal(bits(got), bits(decode_4bit(packed, state, dtype)))


@pytest.mark.parametrize("backend", ["torch", "cpp", "emulate"])
def test_a_decode_checks_the_state_once(backend, monkeypatch, request):
    """dequantize_4bit checks the state, then tells the backend (checked=True): the launch
    checks only what is its own (devices, the output), not the state a second time."""
    import minqlora.launch as launch
    if backend != "torch":                              # skip without a C++ compiler
        request.getfixturevalue({"cpp": "decoder", "emulate": "emulation"}[backend])
    packed, state = quantize_4bit(torch.randn(300), 64)
    calls = []
    real = backends.check_state

    def counted(*args):
        calls.append(args[2])
        return real(*args)
    monkeypatch.setattr(backends, "check_state", counted)
    monkeypatch.setattr(launch, "check_state", counted)
    out = dequantize_4bit(packed, state, backend=backend)
    assert calls == ["dequantize_4bit"] and torch.equal(out, decode_4bit(packed, state))


def test_a_backend_is_one_registry_entry(monkeypatch):
    """REGISTRY is the one place that names the backends: a new entry is accepted by
    dequantize_4bit and runs with the state checked; auto picks it where it says so, in the
    registry's order (here first, for the meta device only)."""
    ran = []

    def decode(packed, state, out, checked=False):
        ran.append(checked)
        decode_in_chunks(packed, state, out)
    picked = lambda device: device.type == "meta"                       # noqa: E731
    monkeypatch.setattr(backends, "REGISTRY", {"mine": (decode, picked), **REGISTRY})
    packed, state = quantize_4bit(torch.randn(100), 64)
    assert torch.equal(dequantize_4bit(packed, state, backend="mine"), decode_4bit(packed, state))
    assert ran == [True]
    assert backends.auto_backend("meta") == "mine" and backends.auto_backend("cpu") != "mine"
