"""The CUDA kernel run on the CPU: kernels/dequant_nf4.cu compiled by the host C++ compiler.

A CUDA launch of `grid` blocks of `block` threads runs the kernel once per (block, thread),
each call reading its own blockIdx.x and threadIdx.x. The emulation does exactly that, in loops:

    for b in range(grid): for t in range(block): blockIdx.x, threadIdx.x = b, t; kernel(...)

kernels/cuda_shim.h supplies what the GPU would (threadIdx, __shared__, uint4, the bf16/fp16
roundings), kernels/emulate.cpp writes the loops and splits the blocks over CPU threads, and
this module compiles the three files (with -O3, so it is also minqlora's fastest CPU path) and
calls them through ctypes. Worked example: 999,000 weights are a grid of 122 blocks x 256
threads; on 2 CPU threads, blocks 0..60 run on one and 61..121 on the other.

The build is cached in ~/.cache/minqlora (or $MINQLORA_CACHE), keyed by the sources' hash, so
an edited kernel is rebuilt. No C++ compiler: EmulationUnavailable, never a quiet fallback to
the torch path. What a launch needs (grid, argument list, checks) lives in launch.py.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .launch import grid, kernel_args, kernel_source

# -ffp-contract=off: no fused multiply-add (bit-identity); initial-exec: each access to the
# shim's thread_local threadIdx / __shared__ is one %fs-relative load instead of a call to
# __tls_get_addr, at the price of ~430 bytes of the static TLS space the loader keeps for
# dlopen'ed libraries.
CXXFLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared",
            "-pthread", "-ftls-model=initial-exec"]
_BUILT = {}                                     # (source, shim, emulate.cpp texts) -> library
MIN_BLOCKS = 32  # grid blocks (8192 weights each) per CPU thread at least: starting a thread
                 # costs tens of microseconds, more than decoding a small weight


class EmulationUnavailable(RuntimeError):
    """No C++ compiler to build the CPU emulation of the kernel."""


def build_emulation(source: str = None) -> ctypes.CDLL:
    """Compile kernels/emulate.cpp + cuda_shim.h + `source` (default: dequant_nf4.cu) for the
    CPU, once per distinct text, and load it; it exports launch_<kernel name> for each kernel.
    Raises EmulationUnavailable without a compiler, RuntimeError with the compiler's message
    when the build fails."""
    files = {"dequant_nf4.cu": kernel_source() if source is None else source,
             "cuda_shim.h": kernel_source("cuda_shim.h"),
             "emulate.cpp": kernel_source("emulate.cpp")}
    texts = tuple(files.values())
    if texts in _BUILT:                         # the same texts as an earlier call: no disk work
        return _BUILT[texts]
    cxx = find_compiler()
    if cxx is None:
        raise EmulationUnavailable("dequantize_4bit(backend='emulate'): no C++ compiler found "
                                   "(looked for $CXX, c++, g++, clang++); install one, e.g. "
                                   "`apt install g++`, or use backend='torch'")
    key = hashlib.sha256(repr((sorted(files.items()), CXXFLAGS, cxx)).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"dequant_emulate_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            for name, text in files.items():
                Path(tmp, name).write_text(text)
            done = subprocess.run([cxx, *CXXFLAGS, "-o", "lib.so", "emulate.cpp"], cwd=tmp,
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"building the kernel emulation with {cxx} failed:\n"
                                   f"{done.stderr}")
            os.replace(Path(tmp, "lib.so"), lib)           # atomic: parallel builders are safe
    try:
        _BUILT[texts] = ctypes.CDLL(str(lib))
    except OSError as e:        # e.g. "cannot allocate memory in static TLS block"
        raise RuntimeError(f"loading the kernel emulation {lib} failed: {e}. If it is about "
                           "static TLS, set GLIBC_TUNABLES=glibc.rtld.optional_static_tls=4096 "
                           "before starting Python") from None
    return _BUILT[texts]


def find_compiler():
    """The C++ compiler the emulation is built with: $CXX, else the first of c++, g++, clang++
    on PATH; None if there is none (then backend="auto" does not pick the emulation)."""
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return next(filter(None, map(shutil.which, names)), None)


def _cache_dir() -> Path:
    """$MINQLORA_CACHE, else ~/.cache/minqlora, else (home not writable) a temp dir."""
    for path in (os.environ.get("MINQLORA_CACHE"), Path.home() / ".cache" / "minqlora",
                 Path(tempfile.gettempdir()) / "minqlora"):
        if not path:                                        # $MINQLORA_CACHE not set
            continue
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return Path(path)
    raise RuntimeError("dequantize_4bit(backend='emulate'): no writable cache directory "
                       "(tried $MINQLORA_CACHE, ~/.cache/minqlora and the temp dir)")


def launch_emulation(packed, state, out, source: str = None, n_workers: int = None) -> None:
    """Run the kernel on the CPU into `out` ((n,) float32 / bfloat16 / float16): every
    (block, thread) of the grid, the blocks split over n_workers threads (default: torch's
    thread count, but no more threads than MIN_BLOCKS-block shares).

    Worked example (test_golden_plain in tests/test_emulate.py runs it; not a doctest, because a
    machine without a C++ compiler must be able to skip it): bytes [0x0F, 0x70], NF4, one
    absmax 2.0, n = 3 -> out = [NF4[0] * 2, NF4[15] * 2, NF4[7] * 2] = [-2.0, 2.0, 0.0], the
    last nibble being padding. The grid is one block: thread 0 takes the tail path, threads
    1..255 return at once.
    """
    source = kernel_source() if source is None else source
    name, tensors, (n, log2_bs, log2_bs2) = kernel_args(packed, state, out)
    blocks, threads = grid(n, source)
    pointers = [ctypes.c_void_p(None if t is None else t.data_ptr()) for t in tensors]
    run = getattr(build_emulation(source), f"launch_{name}")
    if not n_workers:                   # torch's threads, each with MIN_BLOCKS blocks at least
        n_workers = min(torch.get_num_threads(), max(1, blocks // MIN_BLOCKS))
    run(ctypes.c_longlong(blocks), ctypes.c_int(threads), ctypes.c_int(n_workers), *pointers,
        ctypes.c_longlong(n), ctypes.c_int(log2_bs), ctypes.c_int(log2_bs2))
