"""C++ from kernels/ compiled for the CPU: one library per distinct set of source texts, in a
private cache, verified before it is loaded. Two modules build with it: emulate.py (the CUDA
kernel's text, run thread by thread) and cpu_decode.py (backend "cpp").

    library = cache_dir() / f"{stem}_{sha256(texts, flags, compiler)[:16]}.so"

Worked example: build_library({"dequant_cpu.cpp": ..., "round16.h": ...}, "dequant_cpu.cpp",
"dequant_cpu") compiles in a temporary folder inside the cache, writes
~/.cache/minqlora/dequant_cpu_<16 hex digits>.so and its .sha256 beside it, and loads it; a
later call with the same texts loads the same file, an edited text builds a new one.

The folder must belong to you and be writable by nobody else; each library's sha256 is recorded
beside it when it is built and checked before it is loaded (a truncated or altered file, or a
folder in its place, is rebuilt, never loaded). A new library is first loaded by a child
process, so one that would end the process (a sanitizer's runtime) is refused with its message.
A build killed part-way leaves build-<host>-<pid>-* behind; the next build removes it. No C++
compiler: CompilerUnavailable (its users name themselves: emulate.EmulationUnavailable,
cpu_decode.CppDecoderUnavailable), never a quiet fallback; every setup problem is a SetupError.
"""
import contextlib
import ctypes
import hashlib
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from ._checks import SetupError, private_dir

# -ffp-contract=off: no fused multiply-add (bit-identity with the torch path). -z defs: a
# library with missing symbols (CXX=gcc, no C++ runtime) fails to link.
CXXFLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared",
            "-pthread"] + (["-Wl,-z,defs"] if sys.platform.startswith("linux") else [])
_BUILT = {}                                 # (source texts, $CXX) -> library


class CompilerUnavailable(SetupError):
    """No C++ compiler to build a library (the emulation's, or the C++ decoder's)."""


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
    c++, g++, clang++ on the PATH: then backend="auto" does not pick "cpp"). A $CXX
    that names no program raises: it was asked for."""
    try:
        return shlex.join(compiler())
    except CompilerUnavailable:
        if os.environ.get("CXX"):
            raise
        return None


def compiler() -> list:
    """The C++ compiler command: $CXX (a program and its flags, split as a shell would; the flags
    come after minqlora's, so they win) or the first of c++, g++, clang++ on the PATH."""
    try:
        words = shlex.split(os.environ.get("CXX", ""))
    except ValueError as e:                 # an unclosed quote
        raise CompilerUnavailable(f"$CXX={os.environ['CXX']!r} cannot be split: {e}") from None
    if words:
        found = shutil.which(words[0])
        if found is None:
            raise CompilerUnavailable(f"$CXX is {os.environ['CXX']!r}, but {words[0]!r} is not "
                                      "a program on the PATH; set CXX to a C++ compiler (g++ "
                                      "or clang++, flags may follow) or unset it")
        return [found, *words[1:]]
    found = next(filter(None, map(shutil.which, ["c++", "g++", "clang++"])), None)
    if found is None:
        raise CompilerUnavailable("no C++ compiler found (looked for $CXX, c++, g++, clang++); "
                                  "install one, e.g. `apt install g++`, or use backend='torch'")
    return [found]


def _build(cxx: list, files: dict, main: str, lib: Path, optional) -> ctypes.CDLL:
    """Compile in a temporary folder inside the cache, then move the library and its sha256 into
    place (atomic renames: parallel builders are safe) and load it."""
    prefix = f"build-{socket.gethostname()}-"
    _sweep(lib.parent, prefix)
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=f"{prefix}{os.getpid()}-") as tmp:
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
            raise SetupError(f"building kernels/{main} with {shlex.join(cxx)} failed{cpp} (the "
                             f"compiler's messages follow):\n{done.stderr}")
        _probe(Path(tmp, "lib.so"), cxx)
        Path(tmp, "sha256").write_text(hashlib.sha256(Path(tmp, "lib.so").read_bytes()).hexdigest())
        for name, target in (("lib.so", lib), ("sha256", Path(f"{lib}.sha256"))):
            _clear(target)
            os.replace(Path(tmp, name), target)
    return _load(lib)


def _probe(built: Path, cxx: list) -> None:
    """A SetupError unless `built` is a library a child process can load (the compiler may
    write nothing, CXX=true, or a library whose loading ends the process, -fsanitize=address)."""
    if not (built.is_file() and built.stat().st_size):
        raise SetupError(f"{shlex.join(cxx)} reported success but wrote no library; set CXX to "
                         "a C++ compiler (g++, clang++) or unset it")
    load = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"
    child = subprocess.Popen([sys.executable, "-c", load, str(built)], text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.communicate()[1]
    if child.returncode:
        last = (stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise SetupError(f"the library built with {shlex.join(cxx)} cannot be loaded ({last}); "
                         "drop the flags that need a runtime of their own (-fsanitize) from CXX")


def _clear(path: Path) -> None:
    """Remove whatever is at path that is not a regular file (a folder, a link), so that a
    rename can put the new file there."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        elif not stat.S_ISREG(path.lstat().st_mode):
            path.unlink()


def _sweep(cache: Path, prefix: str) -> None:
    """Remove the build folders of this host's builds whose process is gone (killed mid-way)."""
    for folder in cache.glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                     # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:                         # it exists (another user's: not allowed to signal)
        pass
    return True


def _verified(lib: Path) -> bool:
    """Whether lib and lib.sha256 are regular files (a FIFO would block the read) and lib's
    bytes have the sha256 recorded beside it when it was built."""
    sha = Path(f"{lib}.sha256")
    try:
        if not (stat.S_ISREG(lib.lstat().st_mode) and stat.S_ISREG(sha.lstat().st_mode)):
            return False
        return sha.read_text() == hashlib.sha256(lib.read_bytes()).hexdigest()
    except OSError:                         # never built, or a half-written entry
        return False


def _load(lib: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        raise SetupError(f"loading the compiled library {lib} failed: {e}") from None


def cache_dir() -> Path:
    """$MINQLORA_CACHE, else $XDG_CACHE_HOME/minqlora (an absolute XDG_CACHE_HOME only, as the
    XDG spec says) or ~/.cache/minqlora, else (no writable home) <tempdir>/minqlora-<uid>;
    created with mode 0700 and refused (_checks.private_dir) unless it is yours, nobody else can
    write to it or rename it, and no link of another user leads to it."""
    how = "choose another folder with MINQLORA_CACHE=/a/private/folder"
    if os.environ.get("MINQLORA_CACHE"):
        return private_dir(Path(os.environ["MINQLORA_CACHE"]), "the C++ build cache", how)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    home = Path(xdg if os.path.isabs(xdg) else Path.home() / ".cache") / "minqlora"
    with contextlib.suppress(OSError):
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (home.is_dir() and os.access(home, os.W_OK | os.X_OK)):
        home = Path(tempfile.gettempdir(), f"minqlora-{getattr(os, 'getuid', lambda: 0)()}")
    return private_dir(home, "the C++ build cache", how)
