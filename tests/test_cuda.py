"""cuda.py: the kernel launched through CuPy. Without a GPU: the launcher's Python side with a
stand-in CuPy, and nvcc's build for sm_80 / sm_90. With one (marked gpu, skipped otherwise;
tests/gpu_check.sh): the kernel on the GPU, bit for bit against the definition and the
emulation."""
import ctypes
import re
import shutil
import subprocess
import types
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from helpers import bits

from minqlora import backends, cuda, launch
from minqlora.backends import dequantize_4bit
from minqlora.nf4 import CODES
from minqlora.quant_state import decode_4bit, quantize_4bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_no_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda, "cupy_or_none", lambda: None)            # as without CuPy
    packed, state = quantize_4bit(torch.randn(10))
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
    monkeypatch.setattr(cuda, "cupy_or_none", lambda: fake)
    monkeypatch.setattr(cuda, "_MODULES", {})
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0))
    for nested in (False, True):
        packed, state = quantize_4bit(torch.randn(20001), 64, double_quant=nested)
        for dtype in DTYPES:
            out = torch.empty(20001, dtype=dtype)
            cuda.launch_cuda(packed, state, out)
            assert torch.equal(bits(out), bits(decode_4bit(packed, state, dtype)))
    assert launches[-1] == ("dequant_4bit_f16_nested", (3,), (256,))
    packed, state = quantize_4bit(torch.empty(0))
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


def assert_same_on_gpu(packed, state, dtype):
    got = dequantize_4bit(packed, state, dtype, backend="cuda")
    want = decode_4bit(packed, state, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got.cpu()), bits(want.cpu()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [2, 16, 32, 64, 128, 256, 1024, 4096])
def test_gpu_bit_identical(dtype, nested, blocksize):
    """On the GPU the kernel == the definition (on the GPU) == the emulation (on the CPU)."""
    pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(blocksize)
    for n in (1, 33, 8191, 8193, 1_000_003):
        for quant_type in CODES:
            x = torch.randn(n, generator=g).cuda()
            packed, state = quantize_4bit(x, blocksize, quant_type, double_quant=nested)
            assert_same_on_gpu(packed, state, dtype)
            emulated = dequantize_4bit(packed.cpu(), state.to("cpu"), dtype, backend="emulate")
            assert torch.equal(bits(dequantize_4bit(packed, state, dtype).cpu()), bits(emulated))


@pytest.mark.gpu
@gpu
def test_gpu_auto_stream_and_misaligned_input(monkeypatch):
    """"auto" launches the kernel for CUDA tensors; it runs on torch's current stream (a side
    stream here); a packed view not on a 16-byte boundary is copied, not read misaligned."""
    pytest.importorskip("cupy")
    x = torch.randn(4096, 65, device="cuda")
    packed, state = quantize_4bit(x)
    want = dequantize_4bit(packed, state, torch.bfloat16, backend="torch")
    side = torch.cuda.Stream()
    with monkeypatch.context() as m, torch.cuda.stream(side):
        m.setattr(backends, "decode_in_chunks", lambda *a: pytest.fail("auto took the torch path"))
        out = dequantize_4bit(packed, state, torch.bfloat16)
    side.synchronize()
    assert torch.equal(bits(out), bits(want))
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8, device="cuda"), packed])[1:]
    assert shifted.data_ptr() % 16
    assert_same_on_gpu(shifted, state, torch.float16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("quant_type", list(CODES))
def test_gpu_quantize_keeps_the_state_on_the_gpu_and_matches_the_cpu(quant_type):
    """quantize_4bit of a CUDA tensor: every state tensor on the GPU (the kernel checks that),
    and the same bytes and absmax as on the CPU (double quant's mean may reduce in another
    order on the GPU, so it is compared on the plain state)."""
    x = torch.randn(1000, 77, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(x.cuda(), 64, quant_type)
    on_gpu = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert all(t.is_cuda for t in on_gpu)
    packed, state = quantize_4bit(x.cuda(), 64, quant_type, double_quant=False)
    cpu_packed, cpu_state = quantize_4bit(x, 64, quant_type, double_quant=False)
    assert torch.equal(packed.cpu(), cpu_packed) and torch.equal(state.absmax.cpu(), cpu_state.absmax)
