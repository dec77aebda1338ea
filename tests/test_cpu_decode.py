"""cpu_decode.py: backend "cpp", the 4-bit format decoded by a loop written for the CPU
(kernels/dequant_cpu.cpp): the bits of lesson 04's definition on every shape, blocksize, code,
output dtype and thread count, on every path this CPU runs (the scalar loop, forced, and the
SIMD lookups of dequant_x86.h: AVX2, AVX-512), with OpenMP or with the std::thread fallback."""
import ctypes
import os
import platform
import shlex
import stat
import sys
import time

import pytest
import torch
from helpers import bits, gaussian
from hypothesis import given, settings
from hypothesis import strategies as st

import minqlora as mq
from minqlora import build, cpu_decode
from minqlora.nf4 import CODES
from minqlora.quant_state import decode_4bit, quantize_4bit

pytestmark = pytest.mark.usefixtures("decoder")
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def decode_each_path(packed, state, dtype, n_workers=None) -> dict:
    """{path: the output} of decode_cpp on every path this CPU runs, "scalar" first."""
    outs = {}
    for path in cpu_decode.cpu_paths():
        outs[path] = torch.empty(state.shape.numel(), dtype=dtype)
        cpu_decode.decode_cpp(packed, state, outs[path], n_workers, path)
    return outs


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()[2:]}
    except OSError:
        return set()


def test_the_paths_are_what_the_cpu_reports():
    """"scalar" everywhere; "avx2" where the CPU has AVX2 and F16C, "avx512" where it also has
    AVX-512 F and BW (Linux x86: /proc/cpuinfo says); a path the CPU lacks is refused."""
    paths, flags = cpu_decode.cpu_paths(), cpu_flags()
    assert paths[0] == "scalar" and set(paths) <= set(cpu_decode.PATHS)
    if platform.machine() in ("x86_64", "AMD64") and flags:
        assert ("avx2" in paths) == ({"avx2", "f16c"} <= flags)
        assert ("avx512" in paths) == ({"avx2", "f16c", "avx512f", "avx512bw"} <= flags)
    elif flags:
        assert paths == ["scalar"]
    packed, state = quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match=r"path 'neon' does not run on this CPU; it runs \["):
        cpu_decode.decode_cpp(packed, state, torch.empty(64), path="neon")


def test_worked_example():
    """The module's example: bytes [0x0F, 0x77], absmax 2.0 -> out16[0], out16[15], out16[7]."""
    packed, state = quantize_4bit(torch.tensor([-2.0, 2.0, 0.0]), double_quant=False)
    assert packed.tolist() == [0x0F, 0x77] and state.absmax.tolist() == [2.0]
    out = torch.empty(3)
    cpu_decode.decode_cpp(packed, state, out)
    assert out.tolist() == [-2.0, 2.0, 0.0]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 3000), log2_bs=st.integers(1, 12), nested=st.booleans(),
       quant_type=st.sampled_from(list(CODES)), dtype=st.sampled_from(OUT_DTYPES),
       n_workers=st.integers(1, 5))
def test_bit_identical_to_the_definition(n, log2_bs, nested, quant_type, dtype, n_workers):
    """Every path: odd counts (a last lone high nibble), partial last blocks and tails of fewer
    than 32 weights, blocksizes 2..4096 (below 32: weight by weight, from 32: the 16-value
    table, 32 weights per SIMD step), every code, more workers than blocks."""
    x = gaussian((n,), seed=n) * 3
    packed, state = quantize_4bit(x, 2 ** log2_bs, quant_type, double_quant=nested)
    want = bits(decode_4bit(packed, state, dtype))
    for path, out in decode_each_path(packed, state, dtype, n_workers).items():
        assert torch.equal(bits(out), want), path


def test_the_same_bits_as_the_kernel_on_a_big_weight(emulation):
    """1000 x 999 weights, bf16 input, nested and plain: backend "cpp" == the kernel's emulation,
    on torch's threads (the default split) and on 3 workers, on every path."""
    w = gaussian((1000, 999), seed=5).bfloat16()
    for nested in (True, False):
        packed, state = quantize_4bit(w, 64, double_quant=nested)
        for dtype in OUT_DTYPES:
            kernel = mq.dequantize_4bit(packed, state, dtype, backend="emulate")
            assert torch.equal(bits(mq.dequantize_4bit(packed, state, dtype, backend="cpp")),
                               bits(kernel))
            for path, out in decode_each_path(packed, state, dtype, n_workers=3).items():
                assert torch.equal(bits(out), bits(kernel)), path


@pytest.mark.parametrize("blocksize", [16, 32, 64])
def test_special_values_round_like_torch(blocksize):
    """An absmax near float32's largest value (products overflow 16 bits: infinity in fp16 and
    bf16), tiny absmaxes (fp16 subnormals and zero), the -0.0 of FP4's code 8, ties that round
    to even, on every path (blocksize 16: weight by weight; 32, 64: the SIMD tables)."""
    values = [3e38, -3e38, 1e-7, -1e-7, 2e-6, 0.0, -1e-30, 65504.0, 65519.0, 65520.0, 1 + 2**-8,
              1 + 3 * 2**-8, 6e-8, 3e-8, -2.98e-8, 1e-38]
    x = torch.tensor([v for v in values for _ in range(blocksize)])    # a block per value
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(x, blocksize, quant_type, double_quant=False)
        for dtype in OUT_DTYPES:
            want = bits(decode_4bit(packed, state, dtype))
            for path, out in decode_each_path(packed, state, dtype).items():
                assert torch.equal(bits(out), want), (path, dtype)


def test_nan_and_infinite_absmax_give_the_scalar_loops_bits():
    """A state with NaN, infinite and negative absmaxes (not one quantize_4bit makes): every path
    gives the scalar loop's bits, NaN included (torch's own paths disagree on NaN bits, so the
    scalar loop, round16.h, is the reference here)."""
    packed, state = quantize_4bit(gaussian((40 * 64,), seed=3), 64, double_quant=False)
    specials = torch.tensor([0x7FC00000, -0x00400000, 0x7FC12345, 0x7F812345, 0x7F800000,
                             -0x00800000, 0x7F7FFFFF, -0x40000000, 0x00000005], dtype=torch.int32)
    state.absmax[:len(specials)] = specials.view(torch.float32)   # NaNs with and without a
    # payload, a signalling NaN, +-infinity, float32's largest, -2.0, a subnormal
    finite = torch.arange(40 * 64) >= 64 * len(specials)  # blocks with a finite absmax
    for dtype in OUT_DTYPES:
        outs = decode_each_path(packed, state, dtype)
        for path, out in outs.items():
            assert torch.equal(bits(out), bits(outs["scalar"])), (path, dtype)
        want = decode_4bit(packed, state, dtype)
        assert torch.equal(bits(outs["scalar"])[finite], bits(want)[finite])


def test_built_without_simd_it_runs_the_scalar_loop(tmp_path, monkeypatch):
    """What ARM builds (no x86 SIMD compiled in; here -DMINQLORA_SCALAR_ONLY): cpu_paths() is
    ["scalar"] alone, and it gives the definition's bits."""
    monkeypatch.setenv("CXX", f"{shlex.quote(build.compiler()[0])} -DMINQLORA_SCALAR_ONLY")
    monkeypatch.setenv("MINQLORA_CACHE", str(tmp_path / "cache"))
    assert cpu_decode.cpu_paths() == ["scalar"]
    packed, state = quantize_4bit(gaussian((100, 33), seed=6), 32)
    out = torch.empty(3300, dtype=torch.bfloat16)
    cpu_decode.decode_cpp(packed, state, out)
    assert torch.equal(bits(out), bits(decode_4bit(packed, state, torch.bfloat16)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a shell-script compiler")
def test_without_openmp_the_threads_are_std_threads(tmp_path, monkeypatch):
    """A compiler that refuses -fopenmp (clang without libomp): the build is retried without it,
    the library says so (uses_openmp() == 0), and its std::thread split gives the same bits."""
    real = build.compiler()[0]
    script = tmp_path / "cxx-without-openmp"
    script.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && "
                      "{ echo \"error: unsupported option '-fopenmp'\" >&2; exit 1; }; done\n"
                      f"exec {real} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(script))
    monkeypatch.setenv("MINQLORA_CACHE", str(tmp_path / "cache"))
    lib = cpu_decode.build_decoder()
    assert lib.uses_openmp() == 0
    packed, state = quantize_4bit(gaussian((300, 301), seed=2))
    for n_workers in (1, 2, 7):
        out = torch.empty(300 * 301, dtype=torch.bfloat16)
        cpu_decode.decode_cpp(packed, state, out, n_workers)
        assert torch.equal(bits(out), bits(decode_4bit(packed, state, torch.bfloat16)))
    assert os.listdir(tmp_path / "cache") and not cpu_decode.build_decoder().uses_openmp()


def test_a_state_on_another_device_or_a_bad_output_is_refused():
    """decode_cpp takes the kernel's arguments, so launch.check_launch guards it too."""
    packed, state = quantize_4bit(torch.randn(100))
    with pytest.raises(ValueError, match=r"out must be a contiguous, 16-byte aligned \(100,\)"):
        cpu_decode.decode_cpp(packed, state, torch.empty(99))
    with pytest.raises(ValueError, match=r"out must be .*float32/bfloat16/float16"):
        cpu_decode.decode_cpp(packed, state, torch.empty(100, dtype=torch.float64))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_on_one_thread_decodes():
    """The module's fork rule: after the parent used the thread pool, a child with
    torch.set_num_threads(1) (a DataLoader worker) decodes the same bits and does not hang."""
    packed, state = quantize_4bit(gaussian((1024, 1024), seed=4))
    want = mq.dequantize_4bit(packed, state, backend="cpp", dtype=torch.bfloat16)
    pid = os.fork()
    if pid == 0:                                    # the child: exit status 0 if all is well
        torch.set_num_threads(1)
        got = mq.dequantize_4bit(packed, state, backend="cpp", dtype=torch.bfloat16)
        os._exit(0 if torch.equal(bits(got), bits(want)) else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@pytest.mark.parametrize("n, log2_bs, log2_bs2", [(64, 63, 8), (64, 0, 8), (64, 64, 8),
                                                  (-1, 6, 8), (64, 6, 63), (2**62 + 1, 6, 8)])
def test_the_library_itself_refuses_sizes_that_would_be_undefined(decoder, n, log2_bs, log2_bs2):
    """A second wall behind check_state: called directly, with sizes no state check lets through,
    every entry point returns -1 and writes nothing (no shift by 63, no read past absmax)."""
    out = torch.full((64,), 7.0)
    null = ctypes.c_void_p(None)
    args = [ctypes.c_int(1), ctypes.c_int(0), null, null, null, null, null, null, null,
            ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(n), ctypes.c_int(log2_bs),
            ctypes.c_int(log2_bs2)]
    for name in ("decode_4bit_f32", "decode_4bit_f32_nested"):
        if name == "decode_4bit_f32" and log2_bs2 == 63:
            continue                                     # a plain state has no second level
        assert getattr(decoder, name)(*args) == -1
    assert (out == 7.0).all()
