"""The CUDA kernel run on the CPU: kernels/dequant_nf4.cu compiled by the host C++ compiler.

A CUDA launch of `grid` blocks of `block` threads runs the kernel once per (block, thread),
each call reading its own blockIdx.x and threadIdx.x. The emulation does exactly that, in loops:

    for b in range(grid): for t in range(block): blockIdx.x, threadIdx.x = b, t; kernel(...)

kernels/cuda_shim.h supplies what the GPU would (threadIdx, __shared__, uint4, the bf16/fp16
roundings), kernels/emulate.cpp writes the loops and splits the blocks over CPU threads, and
this module compiles them (build.py: -O3, cached, verified) and calls them through ctypes.
Worked example: 999,000 weights are a grid of 122 blocks x 256 threads; on 2 CPU threads,
blocks 0..60 run on one and 61..121 on the other.

The emulation is for checking the kernel where there is no GPU (lesson 05), not for speed: the
CPU's fast path is cpu_decode.py. An edited kernel text is a new library (build.py keys the
cache by the texts). No C++ compiler: EmulationUnavailable, never a quiet fallback to the torch
path. What a launch needs (grid, argument list, checks) lives in launch.py.
"""
import ctypes
import platform

import torch

from .build import CompilerUnavailable, build_library
from .launch import c_pointers, grid, kernel_args, kernel_source

# The shim's threadIdx / __shared__ are thread_local in a dlopen'ed library. The initial-exec TLS
# model would make each access one load but takes the loader's small static TLS reserve: the 4th
# edited kernel failed to load.
# TLS descriptors (gnu2 on x86-64; the default on arm64) cost one short call per access and never
# run out (an older clang lacks gnu2: an optional flag, dropped when the compiler refuses it).
TLS_DESC = ((("-mtls-dialect=gnu2", "tls-dialect"),)
            if platform.machine().lower() in ("x86_64", "amd64") else ())
MIN_BLOCKS = 32  # grid blocks (8192 weights each) per CPU thread at least: starting a thread
                 # costs tens of microseconds, more than decoding a small weight


class EmulationUnavailable(CompilerUnavailable):
    """No C++ compiler to build the CPU emulation of the CUDA kernel (backend "emulate")."""


def build_emulation(source: str = None) -> ctypes.CDLL:
    """Compile kernels/emulate.cpp + cuda_shim.h + `source` (default: dequant_nf4.cu) for the
    CPU, once per distinct text, and load it; it exports launch_<kernel name> for each kernel.
    Raises EmulationUnavailable without a compiler, RuntimeError with the compiler's message
    when the build fails."""
    files = {"dequant_nf4.cu": kernel_source() if source is None else source,
             **{name: kernel_source(name) for name in ("cuda_shim.h", "round16.h", "emulate.cpp")}}
    try:
        return build_library(files, "emulate.cpp", "dequant_emulate", TLS_DESC)
    except CompilerUnavailable as e:
        raise EmulationUnavailable(f"the kernel emulation (backend='emulate'): {e}") from None


def launch_emulation(packed, state, out, source: str = None, n_workers: int = None,
                     checked: bool = False) -> None:
    """Run the kernel on the CPU into `out` ((n,) float32 / bfloat16 / float16): every
    (block, thread) of the grid, the blocks split over n_workers threads (default: torch's
    thread count, but no more threads than MIN_BLOCKS-block shares).

    Worked example (test_golden_plain in tests/test_emulate.py runs it; not a doctest, because a
    machine without a C++ compiler must be able to skip it): bytes [0x0F, 0x70], NF4, one
    absmax 2.0, n = 3 -> out = [NF4[0] * 2, NF4[15] * 2, NF4[7] * 2] = [-2.0, 2.0, 0.0], the
    last nibble being padding. The grid is one block: thread 0 takes the tail path, threads
    1..255 return at once. checked: the state was checked already (dequantize_4bit).
    """
    source = kernel_source() if source is None else source
    name, tensors, (n, log2_bs, log2_bs2) = kernel_args(packed, state, out, checked)
    blocks, threads = grid(n, source)
    run = getattr(build_emulation(source), f"launch_{name}")
    if not n_workers:                   # torch's threads, each with MIN_BLOCKS blocks at least
        n_workers = min(torch.get_num_threads(), max(1, blocks // MIN_BLOCKS))
    run(ctypes.c_longlong(blocks), ctypes.c_int(threads), ctypes.c_int(n_workers),
        *c_pointers(tensors), ctypes.c_longlong(n), ctypes.c_int(log2_bs), ctypes.c_int(log2_bs2))
