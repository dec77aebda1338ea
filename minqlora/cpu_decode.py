"""Backend "cpp": 4-bit weights decoded by a C++ loop written for the CPU (kernels/dequant_cpu.cpp).

The definition is lesson 04's, out[i] = code[nibble i] * absmax[i // blocksize] in float32, cast
once. Inside one block that product takes only 16 values, one per code entry, so the loop
computes them first and then looks each weight up:

    out16[k] = cast(code[k] * absmax[b])     16 products and roundings per block
    out[i]   = out16[nibble i]               one table lookup per weight

Worked example: a block with absmax 2.0 in NF4 has out16[0] = -2.0 and out16[15] = 2.0, so
its byte 0x0F decodes to (-2.0, 2.0), with no multiply at all.

The GPU kernel (dequant_nf4.cu, run on the CPU by emulate.py) multiplies every weight, because
on a GPU a multiply is free and an indexed per-thread table is slow. On a CPU it is the other
way round: at blocksize 64 this loop makes 16 roundings where the kernel makes 64. The lookup
itself is what SIMD does best: on x86 (kernels/dequant_x86.h) one shuffle looks up 16 or 32
nibbles at once, AVX2's vpshufb in two byte tables (the low and the high bytes of out16),
AVX-512's vpermw in one. The path is picked at run time from what the CPU reports (cpu_paths),
or forced with decode_cpp(path=...); the scalar loop stays as the reference, and is what ARM
runs. It is the same definition on every path, so they give the same bits;
tests/test_cpu_decode.py checks each path this CPU has against decode_4bit.

backend="auto" runs it for CPU tensors on Linux with a C++ compiler (backends.py says why).
It is built, cached and verified like the emulation (build.build_library), and it takes the
kernel's arguments (launch.kernel_args), so a state is checked the same way. Big weights are
split over CPU threads: OpenMP's where the compiler has it (-fopenmp: the pool torch runs on),
else a std::thread per extra worker. A second thread starts only from MIN_WEIGHTS weights
each: on a busy 2-core machine a worker may wait milliseconds for a core, longer than a whole
decode of a few million weights on one thread (bench section `kernel`).
Like torch's own operations, the OpenMP pool does not survive os.fork: a forked child decodes
on one thread (torch.set_num_threads(1), as DataLoader's workers set it).
"""
import ctypes
import os

import torch

from .build import CompilerUnavailable, build_library
from .launch import KERNELS, SUFFIX, c_pointers, kernel_args, kernel_source

SOURCES = ("dequant_cpu.cpp", "dequant_x86.h", "round16.h")
PATHS = ("scalar", "avx2", "avx512")   # bit k of the library's cpu_paths(): path k runs here
OPENMP = (("-fopenmp", "openmp|omp"),)  # optional: dropped when the compiler's error names it
                                        # (-fopenmp refused, libomp or libgomp not found)
_SOURCE_PATHS = [str(KERNELS / name) for name in SOURCES]
_LOADED = {}                                   # see _decoder
MIN_WEIGHTS = 1 << 24  # per CPU thread at least: from 32M weights on, 2 threads pay when busy


class CppDecoderUnavailable(CompilerUnavailable):
    """No C++ compiler to build the C++ decoder of backend "cpp"."""


def build_decoder() -> ctypes.CDLL:
    """Compile kernels/dequant_cpu.cpp (once per text) and load it; it exports
    decode_4bit_<f32|bf16|f16>[_nested], cpu_paths() and uses_openmp(). Raises
    CppDecoderUnavailable without a C++ compiler."""
    try:
        return build_library({name: kernel_source(name) for name in SOURCES}, SOURCES[0],
                             "dequant_cpu", OPENMP)
    except CompilerUnavailable as e:
        raise CppDecoderUnavailable(f"the C++ decoder (backend='cpp'): {e}") from None


def cpu_paths() -> list:
    """The paths this CPU runs, slowest first: ["scalar"] (ARM, x86 without AVX2), then "avx2"
    (with F16C), then "avx512" (F and BW); the last one is the default of decode_cpp."""
    return _decoder()[1]


def _decoder() -> tuple:
    """(build_decoder(), its paths), looked up once per $CXX and version of the sources (their
    mtimes): a small decode costs microseconds, build_library's look-up tens of them."""
    key = (os.environ.get("CXX"), *(os.stat(p).st_mtime_ns for p in _SOURCE_PATHS))
    if key not in _LOADED:
        lib = build_decoder()
        mask = lib.cpu_paths()
        _LOADED[key] = lib, [name for k, name in enumerate(PATHS) if mask >> k & 1]
    return _LOADED[key]


def decode_cpp(packed: torch.Tensor, state, out: torch.Tensor, n_workers: int = None,
               path: str = None, checked: bool = False) -> None:
    """Decode packed + state into `out` ((n,) float32 / bfloat16 / float16 on the CPU) on
    n_workers threads (default: torch's thread count, each with MIN_WEIGHTS weights at least),
    on `path`, one of cpu_paths() (default: the last, the fastest this CPU runs).

    Worked example (test_worked_example in tests/test_cpu_decode.py runs it; not a doctest, so
    that a machine without a C++ compiler can skip it): quantize_4bit([-2.0, 2.0, 0.0]) is
    bytes [0x0F, 0x77] (the last nibble pads) with absmax 2.0; out16 = cast(NF4 * 2.0), and
    out = [out16[0], out16[15], out16[7]] = [-2.0, 2.0, 0.0]. checked: the state was checked
    already (dequantize_4bit); the launch's own checks run always.
    """
    _, tensors, (n, log2_bs, log2_bs2) = kernel_args(packed, state, out, checked)
    lib, paths = _decoder()
    if path not in (None, *paths):
        raise ValueError(f"decode_cpp: path {path!r} does not run on this CPU; it runs {paths}")
    if not n_workers:
        n_workers = min(torch.get_num_threads(), max(1, n // MIN_WEIGHTS))
    run = getattr(lib, f"decode_4bit_{SUFFIX[out.dtype]}{'_nested' if state.nested else ''}")
    status = run(ctypes.c_int(n_workers), ctypes.c_int(PATHS.index(path or paths[-1])),
                 *c_pointers(tensors), ctypes.c_longlong(n), ctypes.c_int(log2_bs),
                 ctypes.c_int(log2_bs2))
    if status != 0:                    # the C++ bounds check: unreachable past check_state
        raise ValueError(f"decode_cpp: the decoder refused n={n}, log2 blocksizes "
                         f"{log2_bs}/{log2_bs2} (each must lie in 1..62)")
