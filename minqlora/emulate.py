"""The CUDA kernel run on the CPU: kernels/dequant_nf4.cu compiled by the host C++ compiler.

A CUDA launch of `grid` blocks of `block` threads runs the kernel once per (block, thread),
each call reading its own blockIdx.x and threadIdx.x. The emulation does exactly that, in loops:

    for b in range(grid): for t in range(block): blockIdx.x, threadIdx.x = b, t; kernel(...)

kernels/cuda_shim.h supplies what the GPU would (threadIdx, __shared__, uint4, the bf16/fp16
roundings), kernels/emulate.cpp writes the loops and splits the blocks over CPU threads, and
this module compiles the three files (with -O3, so it is also minqlora's fastest CPU path) and
calls them through ctypes. Worked example: 999,000 weights are a grid of 122 blocks x 256
threads; on 2 CPU threads, blocks 0..60 run on one and 61..121 on the other.

The build is cached in ~/.cache/minqlora (or $MINQLORA_CACHE), keyed by the sources' hash and
the compiler command, so an edited kernel is rebuilt. The folder must belong to you and be
writable by nobody else; each library's sha256 is recorded beside it when it is built and
checked before it is loaded (a truncated or altered file is rebuilt, never loaded). No C++
compiler: EmulationUnavailable, never a quiet fallback to the torch path. What a launch needs
(grid, argument list, checks) lives in launch.py.
"""
import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ._checks import private_dir
from .launch import grid, kernel_args, kernel_source

# -ffp-contract=off: no fused multiply-add (bit-identity). The shim's threadIdx / __shared__ are
# thread_local in a dlopen'ed library. The initial-exec TLS model would make each access one
# load but takes the loader's small static TLS reserve: the 4th edited kernel failed to load.
# TLS descriptors (gnu2 on x86-64; the default on arm64) cost one short call per access and never
# run out (an older clang lacks gnu2: an optional flag). -z defs: a library with missing symbols
# (CXX=gcc, no C++ runtime) fails to link.
CXXFLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared",
            "-pthread"] + (["-Wl,-z,defs"] if sys.platform.startswith("linux") else [])
TLS_DESC = ((("-mtls-dialect=gnu2", "tls-dialect"),)
            if platform.machine().lower() in ("x86_64", "amd64") else ())
_BUILT = {}                                 # (source texts, $CXX) -> library
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
             **{name: kernel_source(name) for name in ("cuda_shim.h", "round16.h", "emulate.cpp")}}
    return build_library(files, "emulate.cpp", "dequant_emulate", TLS_DESC)


def build_library(files: dict, main: str, stem: str, optional=()) -> ctypes.CDLL:
    """Compile files[main] (which may include the other files) into the cache as
    <stem>_<hash>.so, once per distinct set of texts, and load it (the emulation; cpu_decode.py's
    decoder). `optional`: (flag, pattern) pairs; a flag is dropped, and the build retried, when
    the compiler's error message matches its pattern (a regular expression)."""
    texts = (tuple(files.items()), os.environ.get("CXX"))
    if texts not in _BUILT:                 # the same texts as an earlier call: no disk work
        cxx = compiler()
        key = hashlib.sha256(repr((sorted(files.items()), CXXFLAGS, optional, cxx)).encode())
        lib = cache_dir() / f"{stem}_{key.hexdigest()[:16]}.so"
        _BUILT[texts] = _load(lib) if _verified(lib) else _build(cxx, files, main, lib, optional)
    return _BUILT[texts]


def find_compiler():
    """The C++ compiler command as one string, or None when there is none ($CXX unset and no
    c++, g++, clang++ on the PATH: then backend="auto" does not pick the emulation). A $CXX
    that names no program raises: it was asked for."""
    try:
        return shlex.join(compiler())
    except EmulationUnavailable:
        if os.environ.get("CXX"):
            raise
        return None


def compiler() -> list:
    """The C++ compiler command: $CXX (a program and its flags, split as a shell would; the flags
    come after minqlora's, so they win) or the first of c++, g++, clang++ on the PATH."""
    try:
        words = shlex.split(os.environ.get("CXX", ""))
    except ValueError as e:                 # an unclosed quote
        raise EmulationUnavailable(f"$CXX={os.environ['CXX']!r} cannot be split: {e}") from None
    if words:
        found = shutil.which(words[0])
        if found is None:
            raise EmulationUnavailable(f"$CXX is {os.environ['CXX']!r}, but {words[0]!r} is not "
                                       "a program on the PATH; set CXX to a C++ compiler (g++ "
                                       "or clang++, flags may follow) or unset it")
        return [found, *words[1:]]
    found = next(filter(None, map(shutil.which, ["c++", "g++", "clang++"])), None)
    if found is None:
        raise EmulationUnavailable("dequantize_4bit(backend='emulate'): no C++ compiler found "
                                   "(looked for $CXX, c++, g++, clang++); install one, e.g. "
                                   "`apt install g++`, or use backend='torch'")
    return [found]


def _build(cxx: list, files: dict, main: str, lib: Path, optional) -> ctypes.CDLL:
    """Compile in a temporary folder inside the cache, then move the library and its sha256 into
    place (atomic renames: parallel builders are safe) and load it."""
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        while True:                         # without each optional flag the compiler refuses
            command = [cxx[0], *CXXFLAGS, *(flag for flag, _ in optional), *cxx[1:], "-o",
                       "lib.so", main]
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            refused = [pair for pair in optional if re.search(pair[1], done.stderr)]
            if not done.returncode or not refused:
                break
            optional = [pair for pair in optional if pair not in refused]
        if done.returncode:
            cpp = ("; it links no C++ runtime: set CXX to a C++ compiler (g++, clang++)"
                   if "undefined reference" in done.stderr else "")
            raise RuntimeError(f"building kernels/{main} with {shlex.join(cxx)} failed"
                               f"{cpp}:\n{done.stderr}")
        Path(tmp, "sha256").write_text(hashlib.sha256(Path(tmp, "lib.so").read_bytes()).hexdigest())
        os.replace(Path(tmp, "lib.so"), lib)
        os.replace(Path(tmp, "sha256"), f"{lib}.sha256")
    return _load(lib)


def _verified(lib: Path) -> bool:
    """Whether lib's bytes have the sha256 recorded beside it when it was built."""
    try:
        return Path(f"{lib}.sha256").read_text() == hashlib.sha256(lib.read_bytes()).hexdigest()
    except OSError:                         # never built, or a half-written entry
        return False


def _load(lib: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        raise RuntimeError(f"loading the kernel emulation {lib} failed: {e}") from None


def cache_dir() -> Path:
    """$MINQLORA_CACHE, else ~/.cache/minqlora, else (no writable home) <tempdir>/minqlora-<uid>;
    created with mode 0700 and refused unless it is yours and nobody else can write to it."""
    how = "choose another folder with MINQLORA_CACHE=/a/private/folder"
    if os.environ.get("MINQLORA_CACHE"):
        return private_dir(Path(os.environ["MINQLORA_CACHE"]), "the emulation's build cache", how)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minqlora"
    with contextlib.suppress(OSError):
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (home.is_dir() and os.access(home, os.W_OK | os.X_OK)):
        home = Path(tempfile.gettempdir(), f"minqlora-{getattr(os, 'getuid', lambda: 0)()}")
    return private_dir(home, "the emulation's build cache", how)


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
