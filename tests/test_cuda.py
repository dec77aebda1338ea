"""tests for kernels/dequant_nf4.cu and its launchers (minqlora/cuda.py, emulate.py, launch.py):
the CPU emulation of the kernel, the nvcc build for sm_80 / sm_90, the CuPy launch's Python side,
and (marked gpu, skipped without CUDA + CuPy) the kernel on a GPU.

Every comparison is bit-for-bit (torch.equal on the raw bits), never a tolerance."""
import ctypes
import os
import re
import shutil
import subprocess
import types
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minqlora as mq
from minqlora import cuda, emulate, launch
from minqlora.double_quant import DYNAMIC, QuantState

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANT_TYPES = ["nf4", "fp4", "int4"]


@pytest.fixture(scope="module")
def emulation():
    try:
        return emulate.build_emulation()
    except emulate.EmulationUnavailable as e:
        pytest.skip(str(e))


def bits(t):
    """The raw bits of a float tensor, so that -0.0 != 0.0 and NaN == NaN."""
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def assert_same(packed, state, dtype, backend="emulate"):
    want = mq.dequantize_4bit(packed, state, dtype, backend="torch")
    got = mq.dequantize_4bit(packed, state, dtype, backend=backend)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got.cpu()), bits(want.cpu()))


def test_golden_plain(emulation):
    """Bytes [0x0F, 0x70], absmax [2.0], shape (3,), NF4:
    element 0 = high nibble 0 -> NF4[0] * 2 = -2; element 1 = low nibble 15 -> NF4[15] * 2 = 2;
    element 2 = high nibble 7 -> NF4[7] * 2 = 0 (the low nibble 0 is padding)."""
    state = QuantState(torch.tensor([2.0]), mq.NF4, 64, torch.Size([3]), torch.float32)
    packed = torch.tensor([0x0F, 0x70], dtype=torch.uint8)
    out = mq.dequantize_4bit(packed, state, backend="emulate")
    assert out.tolist() == [-2.0, 2.0, 0.0]


def test_golden_nested(emulation):
    """Two blocks of 2 weights, double quantized by hand: qabsmax [255, 127] -> dynamic code
    [1.0, 0.0]; absmax2 [0.5], offset 0.25 -> absmax [1.0 * 0.5 + 0.25, 0.0 * 0.5 + 0.25] =
    [0.75, 0.25]. Byte 0xF0 -> (NF4[15], NF4[0]) = (1, -1) in block 0: [0.75, -0.75];
    byte 0xF7 -> (1, 0) in block 1: [0.25, 0.0]."""
    state2 = QuantState(torch.tensor([0.5]), DYNAMIC, 256, torch.Size([2]), torch.float32,
                        "dynamic")
    state = QuantState(torch.tensor([255, 127], dtype=torch.uint8), mq.NF4, 2, torch.Size([4]),
                       torch.float32, offset=torch.tensor(0.25), state2=state2)
    packed = torch.tensor([0xF0, 0xF7], dtype=torch.uint8)
    assert mq.dequantize_4bit(packed, state, backend="emulate").tolist() == [0.75, -0.75, 0.25, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [2, 16, 32, 64, 4096])
def test_bit_identical_to_torch(emulation, dtype, nested, blocksize):
    """Sizes cover: one weight, an odd count, a partial last block, a partial last thread (the
    scalar tail), exactly one thread (32), and several blocks of 256 threads (> 8192). The
    quant type rotates with the size, so each case meets NF4, FP4 and INT4 twice. Blocksizes:
    below 32 (several absmax blocks per 32-weight chunk: 2, 16), exactly 32, above (64, 4096);
    up to 64 the 20001 weights have more than 256 absmaxes, so more than one absmax2."""
    g = torch.Generator().manual_seed(blocksize)
    for i, n in enumerate((1, 31, 32, 33, 1000, 20001)):
        x = torch.randn(n, generator=g) * 3
        packed, state = mq.quantize_4bit(x, blocksize, QUANT_TYPES[i % 3], double_quant=nested)
        assert_same(packed, state, dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), log2_bs=st.integers(1, 9),
       nested=st.booleans(), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_bit_identical_any_shape(emulation, rows, cols, log2_bs, nested, dtype, scale):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 71 + cols)) * scale
    packed, state = mq.quantize_4bit(x, 2 ** log2_bs, double_quant=nested)
    assert_same(packed, state, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_ties_and_range(emulation, dtype):
    """NF4[15] = 1.0, so every output is an absmax itself: pick absmaxes whose float32 bits sit
    exactly halfway between two 16-bit values (ties go to the even one), float16 subnormals
    (< 2^-14), values rounding to 0, 65519 (-> 65504) and 65520 (-> inf in float16)."""
    ties = [0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000, 0x33000000, 0x33000001, 0x387FE000,
            0x38801000, 0x38803000, 0x2F800000, 0x477FEF00, 0x477FF000, 0x4B7FFF80]
    absmax = torch.tensor(ties, dtype=torch.int32).view(torch.float32)
    absmax = torch.cat([absmax, absmax * 3.0, absmax / 7.0])
    state = QuantState(absmax, mq.NF4, 2, torch.Size([2 * absmax.numel()]), torch.float32)
    packed = torch.full((absmax.numel(),), 0xF0, dtype=torch.uint8)     # (1.0, -1.0) per block
    assert_same(packed, state, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_any_float(emulation, dtype):
    """The shim's float -> bf16 / fp16 roundings against torch's cast on 2^18 random float32 bit
    patterns (every exponent: subnormals, overflow, infinities). The kernel path is the same as
    above: absmax = the pattern, outputs +-absmax. NaN only has to stay NaN: torch itself gives
    different NaN bits on different code paths (and quantize_4bit never makes one)."""
    pattern = torch.randint(-2**31, 2**31, (1 << 18,), generator=torch.Generator().manual_seed(5))
    absmax = pattern.to(torch.int32).view(torch.float32)
    state = QuantState(absmax, mq.NF4, 2, torch.Size([2 * absmax.numel()]), torch.float32)
    packed = torch.full((absmax.numel(),), 0xF0, dtype=torch.uint8)
    got = mq.dequantize_4bit(packed, state, dtype, backend="emulate")
    want = mq.dequantize_4bit(packed, state, dtype, backend="torch")
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and 0 < nan.sum() < nan.numel()
    assert torch.equal(bits(got[~nan]), bits(want[~nan]))


def test_empty_tensor(emulation):
    for nested in (False, True):
        packed, state = mq.quantize_4bit(torch.empty(0, 5), double_quant=nested)
        assert_same(packed, state, torch.bfloat16)


def test_float64_and_default_dtype(emulation):
    x = torch.randn(7, 9, dtype=torch.float64)
    packed, state = mq.quantize_4bit(x)
    assert_same(packed, state, None)                                  # state.dtype = float64
    assert mq.dequantize_4bit(packed, state, backend="emulate").dtype == torch.float64


def test_misaligned_and_strided_packed(emulation):
    """The kernel loads 16 bytes at a time from a 16-byte boundary: a packed view that starts
    one byte in, or a strided one, is copied to an aligned buffer first, same bits."""
    packed, state = mq.quantize_4bit(torch.randn(300, 7), 64)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
    assert shifted.data_ptr() % 16
    assert_same(shifted, state, torch.bfloat16)
    strided = torch.stack([packed, packed], 1)[:, 0]
    assert not strided.is_contiguous()
    assert_same(strided, state, torch.float32)


def test_workers_agree(emulation):
    """1, 2 and more CPU workers than blocks split the grid differently, same bits."""
    packed, state = mq.quantize_4bit(torch.randn(70000), 64)
    outs = []
    for workers in (1, 2, 64):
        out = torch.empty(70000, dtype=torch.bfloat16)
        emulate.launch_emulation(packed, state, out, n_workers=workers)
        outs.append(bits(out))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    want = mq.dequantize_4bit(packed, state, torch.bfloat16, backend="torch")
    assert torch.equal(outs[0], bits(want))


def test_edited_source_is_rebuilt(emulation):
    """The build is keyed by the source text: 32 bytes per thread is a new library, a grid of
    half as many blocks, and still the same bits."""
    source = launch.kernel_source().replace("#define BYTES_PER_THREAD 16",
                                            "#define BYTES_PER_THREAD 32")
    assert launch.geometry(source) == (256, 32)
    assert launch.grid(50001, source) == (4, 256)                      # was (7, 256)
    assert emulate.build_emulation(source) is not emulation
    packed, state = mq.quantize_4bit(torch.randn(50001), 64)
    out = torch.empty(50001)
    emulate.launch_emulation(packed, state, out, source=source)
    assert torch.equal(out, mq.dequantize_4bit(packed, state, backend="torch"))


def test_kernel_source_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    """One disk read per version of a file, not one per launch."""
    monkeypatch.setattr(launch, "KERNELS", tmp_path)
    (tmp_path / "k.cu").write_text("#define THREADS_PER_BLOCK 128\n#define BYTES_PER_THREAD 16")
    first = launch.kernel_source("k.cu")
    assert launch.kernel_source("k.cu") is first and launch.grid(4097, first) == (2, 128)
    (tmp_path / "k.cu").write_text("#define THREADS_PER_BLOCK 64\n#define BYTES_PER_THREAD 32")
    os.utime(tmp_path / "k.cu", ns=(0, 10**9))                # a new mtime even on coarse clocks
    assert launch.geometry(launch.kernel_source("k.cu")) == (64, 32)


def test_broken_source_is_a_clear_error(emulation):
    source = launch.kernel_source().replace("__syncthreads();", "__syncthreads()", 1)
    with pytest.raises(RuntimeError, match="building the kernel emulation with .* failed"):
        emulate.build_emulation(source)
    with pytest.raises(ValueError, match="no `#define BYTES_PER_THREAD <number>` line"):
        launch.geometry("#define THREADS_PER_BLOCK 256")


def test_matches_bitsandbytes(emulation):
    """bitsandbytes' own quantized bytes and state, decoded by our kernel = its dequantize."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(300, 129, generator=torch.Generator().manual_seed(3))
    for nested in (False, True):
        p, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        state = QuantState(s.absmax, s.code, 64, s.shape, s.dtype)
        if nested:
            state.offset = s.offset
            state.state2 = QuantState(s.state2.absmax, s.state2.code, 256, s.absmax.shape,
                                      torch.float32)
        out = mq.dequantize_4bit(p.reshape(-1), state, backend="emulate")
        assert torch.equal(out, F.dequantize_4bit(p, s))


def test_auto_is_torch_on_cpu(monkeypatch):
    packed, state = mq.quantize_4bit(torch.randn(10))
    monkeypatch.setattr(cuda, "launch_emulation", lambda *a: pytest.fail("auto ran the kernel"))
    monkeypatch.setattr(cuda, "launch_cuda", lambda *a: pytest.fail("auto ran the kernel"))
    want = mq.dequantize_4bit(packed, state, backend="torch")
    assert torch.equal(mq.dequantize_4bit(packed, state), want)


def test_bad_input(emulation):
    packed, state = mq.quantize_4bit(torch.randn(100), 64)
    with pytest.raises(ValueError, match="unknown backend 'cupy'"):
        mq.dequantize_4bit(packed, state, backend="cupy")
    with pytest.raises(ValueError, match="expected 50 uint8 bytes"):
        mq.dequantize_4bit(packed[:-1], state, backend="emulate")
    with pytest.raises(ValueError, match="out must be a contiguous, 16-byte aligned \\(100,\\)"):
        emulate.launch_emulation(packed, state, torch.empty(101)[1:])    # misaligned out
    with pytest.raises(ValueError, match="out must be"):
        emulate.launch_emulation(packed, state, torch.empty(100, dtype=torch.float64))
    state.blocksize = 48
    with pytest.raises(ValueError, match="blocksize must be a power of two >= 2 \\(got 48\\)"):
        mq.dequantize_4bit(packed, state, backend="emulate")
    state.blocksize = 64
    state.state2.blocksize = 100                                  # b >> log2 would be wrong
    with pytest.raises(ValueError, match="one absmax2 per state2.blocksize \\(a power of two\\)"):
        mq.dequantize_4bit(packed, state, backend="emulate")
    state.state2.blocksize = 256
    state.absmax = state.absmax[:1]                                     # would read past the end
    with pytest.raises(ValueError, match="expected 2 uint8 qabsmax values"):
        mq.dequantize_4bit(packed, state, backend="emulate")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    """backend='cuda' on CPU tensors says what is missing (a GPU, CuPy) and how to get it."""
    packed, state = mq.quantize_4bit(torch.randn(10))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda, "_cupy", lambda: None)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU.*needs CuPy: pip install -e "
                                         "\"\\.\\[gpu\\]\".*backend='emulate'"):
        mq.dequantize_4bit(packed, state, backend="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="packed is on the CPU; move it"):
        mq.dequantize_4bit(packed, state, backend="cuda")


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(emulate, "_BUILT", {})
    packed, state = mq.quantize_4bit(torch.randn(10))
    with pytest.raises(emulate.EmulationUnavailable, match="no C.. compiler found"):
        mq.dequantize_4bit(packed, state, backend="emulate")


def test_no_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda, "_cupy", lambda: None)                  # as without CuPy
    packed, state = mq.quantize_4bit(torch.randn(10))
    with pytest.raises(RuntimeError, match=re.escape('needs CuPy, which cannot be imported here: '
                                                     'pip install -e ".[gpu]"')):
        cuda.launch_cuda(packed, state, torch.empty(10))


def test_cuda_launch_plumbing(emulation, monkeypatch):
    """launch_cuda's Python side without a GPU: a stand-in `cupy` whose kernel runs the CPU
    emulation with exactly the grid, block and arguments launch_cuda passes. Catches a wrong
    argument order, kernel name or grid; says nothing about the GPU itself (gpu_check.sh does)."""
    launches = []

    def get_function(name):
        def run(grid, block, args):
            launches.append((name, grid, block))
            ptrs = [ctypes.c_void_p(a.data_ptr() if a.numel() else None) for a in args[:8]]
            n, log2_bs, log2_bs2 = (int(a) for a in args[8:])
            getattr(emulation, f"launch_{name}")(
                ctypes.c_longlong(grid[0]), ctypes.c_int(block[0]), ctypes.c_int(1), *ptrs,
                ctypes.c_longlong(n), ctypes.c_int(log2_bs), ctypes.c_int(log2_bs2))
        return run

    fake = types.SimpleNamespace(
        RawModule=lambda code, options: types.SimpleNamespace(get_function=get_function),
        cuda=types.SimpleNamespace(Device=lambda i: nullcontext(),
                                   ExternalStream=lambda p: nullcontext()),
        from_dlpack=lambda t: t, empty=lambda n, dtype: torch.empty(0, dtype=torch.uint8),
        uint8=np.uint8, int32=np.int32, int64=np.int64)
    monkeypatch.setattr(cuda, "_cupy", lambda: fake)
    monkeypatch.setattr(cuda, "_MODULES", {})
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0))
    for nested in (False, True):
        packed, state = mq.quantize_4bit(torch.randn(20001), 64, double_quant=nested)
        for dtype in DTYPES:
            out = torch.empty(20001, dtype=dtype)
            cuda.launch_cuda(packed, state, out)
            want = mq.dequantize_4bit(packed, state, dtype, backend="torch")
            assert torch.equal(bits(out), bits(want))
    assert launches[-1] == ("dequant_4bit_f16_nested", (3,), (256,))
    packed, state = mq.quantize_4bit(torch.empty(0))
    cuda.launch_cuda(packed, state, torch.empty(0))                # no launch for an empty grid
    assert len(launches) == 6


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles_for_the_gpu(arch, tmp_path):
    """nvcc builds the six kernels for Ampere and Hopper (source -> PTX -> ptxas -> cubin), and
    ptxas reports no register spills (a spill would put the 32 outputs per chunk in slow local
    memory)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: cannot check that the kernel compiles for the GPU")
    src = tmp_path / "dequant_nf4.cu"
    src.write_text(launch.kernel_source())
    command = ["nvcc", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin")]
    done = subprocess.run(command + [str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    entries = re.findall(rf"Compiling entry function '(\w+)' for '{arch}'", done.stderr)
    assert sorted(entries) == sorted(f"dequant_4bit_{d}{n}" for d in ("f32", "bf16", "f16")
                                     for n in ("", "_nested"))
    assert done.stderr.count(" 0 bytes spill stores") == 6
    assert not re.search(r" [1-9]\d* bytes spill", done.stderr)


# ---- on a GPU (tests/gpu_check.sh): skipped without CUDA and CuPy ------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [2, 16, 32, 64, 128, 256, 1024, 4096])
def test_gpu_bit_identical(dtype, nested, blocksize):
    """On the GPU the kernel == the torch path (on the GPU) == the emulation (on the CPU)."""
    pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(blocksize)
    for n in (1, 33, 8191, 8193, 1_000_003):
        for quant_type in QUANT_TYPES:
            x = torch.randn(n, generator=g).cuda()
            packed, state = mq.quantize_4bit(x, blocksize, quant_type, double_quant=nested)
            assert_same(packed, state, dtype, backend="cuda")
            emulated = mq.dequantize_4bit(packed.cpu(), state.to("cpu"), dtype, backend="emulate")
            assert torch.equal(bits(mq.dequantize_4bit(packed, state, dtype).cpu()), bits(emulated))


@pytest.mark.gpu
@gpu
def test_gpu_auto_stream_and_misaligned_input(monkeypatch):
    """"auto" launches the kernel for CUDA tensors; it runs on torch's current stream (a side
    stream here); a packed view not on a 16-byte boundary is copied, not read misaligned."""
    pytest.importorskip("cupy")
    x = torch.randn(4096, 65, device="cuda")
    packed, state = mq.quantize_4bit(x)
    want = mq.dequantize_4bit(packed, state, torch.bfloat16, backend="torch")
    side = torch.cuda.Stream()
    with monkeypatch.context() as m, torch.cuda.stream(side):
        m.setattr(cuda, "dequantize_4bit_torch", lambda *a: pytest.fail("auto took the torch path"))
        out = mq.dequantize_4bit(packed, state, torch.bfloat16)
    side.synchronize()
    assert torch.equal(bits(out), bits(want))
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8, device="cuda"), packed])[1:]
    assert shifted.data_ptr() % 16
    assert_same(shifted, state, torch.float16, backend="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gpu_quantize_keeps_the_state_on_the_gpu_and_matches_the_cpu(quant_type):
    """quantize_4bit of a CUDA tensor: every state tensor on the GPU (the kernel checks that),
    and the same bytes and absmax as on the CPU (double quant's mean may reduce in another
    order on the GPU, so it is compared on the plain state)."""
    x = torch.randn(1000, 77, generator=torch.Generator().manual_seed(0))
    packed, state = mq.quantize_4bit(x.cuda(), 64, quant_type)
    on_gpu = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert all(t.is_cuda for t in on_gpu)
    packed, state = mq.quantize_4bit(x.cuda(), 64, quant_type, double_quant=False)
    cpu_packed, cpu_state = mq.quantize_4bit(x, 64, quant_type, double_quant=False)
    assert torch.equal(packed.cpu(), cpu_packed) and torch.equal(state.absmax.cpu(), cpu_state.absmax)
