"""The CUDA dequantization kernel, launched with CuPy or emulated on the CPU (lesson 05).

kernels/dequant_nf4.cu decodes the 4-bit format of lesson 04 in one pass, one thread per
BYTES_PER_THREAD packed bytes:

    absmax[b] = dynamic_code[qabsmax[b]] * absmax2[b // 256] + offset     (nested state)
    out[i]    = code[nibble i] * absmax[i // blocksize], in float32, cast once to dtype

Three backends give bit-identical results:
  "torch"   the vectorised reference, minqlora.double_quant.dequantize_4bit;
  "cuda"    the kernel on the GPU through cupy.RawModule (CUDA tensors; `pip install -e ".[gpu]"`);
  "emulate" the same .cu compiled for the CPU with the system C++ compiler through
            kernels/cuda_shim.h, every (block, thread) run in loops, loaded with ctypes.
"auto" is "cuda" for CUDA tensors when CuPy imports, else "torch".

Worked example: a 4096x4096 weight is 8,388,608 bytes; at 16 bytes (32 weights) per thread
and 256 threads per block the grid has 4096 * 4096 / 8192 = 2048 blocks.

Not run on a GPU yet: the "cuda" path was written and compiled to PTX (sm_80, sm_90) on a
machine without a GPU; tests/gpu_check.sh runs its tests and bench where one is present.
The emulation builds into ~/.cache/minqlora (or $MINQLORA_CACHE), keyed by the sources' hash.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch

from .double_quant import QuantState
from .double_quant import dequantize_4bit as dequantize_4bit_torch

BACKENDS = ("auto", "torch", "cuda", "emulate")
HERE = Path(__file__).resolve().parent
# kernels/ sits inside minqlora/ in a wheel, beside it in a checkout (editable install)
KERNELS = next((p for p in (HERE / "kernels", HERE.parent / "kernels")
                if (p / "dequant_nf4.cu").exists()), HERE / "kernels")
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# -ffp-contract=off: no fused multiply-add (bit-identity); initial-exec: the shim's thread_local
# threadIdx / __shared__ cost one %fs-relative load instead of a call (1.5x faster emulation).
CXXFLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared",
            "-pthread", "-ftls-model=initial-exec"]


class EmulationUnavailable(RuntimeError):
    """No C++ compiler to build the CPU emulation of the kernel."""


def kernel_source(name: str = "dequant_nf4.cu") -> str:
    """The text of a file in kernels/ (shipped in wheels as minqlora/kernels/)."""
    return (KERNELS / name).read_text()


def geometry(source: str) -> tuple[int, int]:
    """(THREADS_PER_BLOCK, BYTES_PER_THREAD) as #defined in the kernel source.

    >>> geometry(kernel_source())
    (256, 16)
    """
    get = lambda name: int(re.search(rf"#define {name} (\d+)", source).group(1))  # noqa: E731
    return get("THREADS_PER_BLOCK"), get("BYTES_PER_THREAD")


def build_emulation(source: str = None) -> ctypes.CDLL:
    """Compile kernels/emulate.cpp + cuda_shim.h + `source` (default: dequant_nf4.cu) for the
    CPU, once per distinct source text, and load it. EmulationUnavailable without a compiler."""
    source = kernel_source() if source is None else source
    files = {"dequant_nf4.cu": source, "cuda_shim.h": kernel_source("cuda_shim.h"),
             "emulate.cpp": kernel_source("emulate.cpp")}
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    cxx = next(filter(None, map(shutil.which, names)), None)
    if cxx is None:
        raise EmulationUnavailable("dequantize_4bit(backend='emulate'): no C++ compiler found "
                                   "(looked for $CXX, c++, g++, clang++); install one, e.g. "
                                   "`apt install g++`, or use backend='torch'")
    key = hashlib.sha256(repr((sorted(files.items()), CXXFLAGS, cxx)).encode()).hexdigest()[:16]
    if key not in _BUILT:
        cache = _cache_dir()
        lib = cache / f"dequant_emulate_{key}.so"
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                for name, text in files.items():
                    Path(tmp, name).write_text(text)
                done = subprocess.run([cxx, *CXXFLAGS, "-o", "lib.so", "emulate.cpp"], cwd=tmp,
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"building the kernel emulation failed:\n{done.stderr}")
                os.replace(Path(tmp, "lib.so"), lib)       # atomic: parallel builders are safe
        _BUILT[key] = ctypes.CDLL(str(lib))
    return _BUILT[key]


_BUILT = {}


def _cache_dir() -> Path:
    """$MINQLORA_CACHE, else ~/.cache/minqlora, else (home not writable) a temp dir."""
    for path in (os.environ.get("MINQLORA_CACHE"), Path.home() / ".cache" / "minqlora",
                 Path(tempfile.gettempdir()) / "minqlora"):
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except (OSError, TypeError):           # TypeError: $MINQLORA_CACHE not set
            continue
        if os.access(path, os.W_OK):
            return Path(path)
    raise RuntimeError("dequantize_4bit(backend='emulate'): no writable cache directory")


def _check_state(state, n, device):
    """The kernel trusts the state's sizes: check them here, a wrong one would read past the end."""
    bs, n_blocks = state.blocksize, -(-n // state.blocksize)
    if not isinstance(bs, int) or bs < 2 or bs & (bs - 1) or state.code.numel() > 16:
        raise ValueError(f"dequantize_4bit: blocksize must be a power of two >= 2 (got {bs!r}) and "
                         f"the code at most 16 values (got {state.code.numel()})")
    want = torch.uint8 if state.nested else state.absmax.dtype
    if state.absmax.numel() != n_blocks or state.absmax.dtype != want:
        raise ValueError(f"dequantize_4bit: expected {n_blocks} {'uint8 q' if state.nested else ''}"
                         f"absmax values for {n} weights at blocksize {bs}, "
                         f"got {state.absmax.numel()}")
    if state.nested and (state.state2.absmax.numel() != -(-n_blocks // state.state2.blocksize)
                         or state.state2.code.numel() != 256 or state.offset.numel() != 1):
        raise ValueError("dequantize_4bit: a nested state needs 256 dynamic-code values, one "
                         f"offset and one absmax2 per {state.state2.blocksize} absmaxes")
    nested = [state.offset, state.state2.absmax, state.state2.code] if state.nested else []
    if any(t.device != device for t in [state.absmax, state.code] + nested):
        raise ValueError(f"dequantize_4bit: the state must be on {device} like packed "
                         f"(state.to({str(device)!r}))")


def _kernel_args(packed, state, out):
    """(kernel name, [7 input tensors or None, out], [n, log2(blocksize), log2(blocksize2)])."""
    n = state.shape.numel()
    _check_state(state, n, packed.device)
    code = torch.nn.functional.pad(state.code.float(), (0, 16 - state.code.numel()))  # (16,) f32
    packed = packed.reshape(-1) if packed.data_ptr() % 16 == 0 else packed.reshape(-1).clone()
    if state.nested:        # qabsmax (n_blocks,) u8, dynamic code (256,), absmax2, offset (1,)
        s2 = state.state2
        tensors = [packed, code, None, state.absmax, s2.code.float(), s2.absmax.float(),
                   state.offset.float().reshape(1)]
    else:                   # absmax (n_blocks,) float32
        tensors = [packed, code, state.absmax.float(), None, None, None, None]
    tensors = [t if t is None else t.contiguous() for t in tensors]
    bits = out if out.dtype == torch.float32 else out.view(torch.int16)  # 16-bit outputs as bits
    log2_bs2 = state.state2.blocksize.bit_length() - 1 if state.nested else 0
    name = f"dequant_4bit_{SUFFIX[out.dtype]}{'_nested' if state.nested else ''}"
    return name, tensors + [bits], [n, state.blocksize.bit_length() - 1, log2_bs2]


def _grid(n: int, source: str) -> tuple[int, int]:
    threads, per_thread = geometry(source)
    return -(-n // (threads * 2 * per_thread)), threads     # blocks, threads per block


def launch_emulation(packed, state, out, source: str = None, n_workers: int = None) -> None:
    """Run the kernel on the CPU into `out` ((n,) float32 / bfloat16 / float16), every
    (block, thread) of the grid, the blocks split over n_workers threads (default: torch's).
    E.g. bytes [0x0F, 0x70], NF4, absmax [2.0], n = 3: out = [-2.0, 2.0, 0.0] (a grid of one
    block; thread 0 takes the tail path, threads 1..255 return at once)."""
    source = kernel_source() if source is None else source
    name, tensors, ints = _kernel_args(packed, state, out)
    blocks, threads = _grid(ints[0], source)
    pointers = [ctypes.c_void_p(None if t is None else t.data_ptr()) for t in tensors]
    workers = n_workers or torch.get_num_threads()
    getattr(build_emulation(source), f"launch_{name}")(
        ctypes.c_longlong(blocks), ctypes.c_int(threads), ctypes.c_int(workers), *pointers, ctypes.c_longlong(ints[0]), ctypes.c_int(ints[1]), ctypes.c_int(ints[2]))


def launch_cuda(packed, state, out) -> None:
    """Run the kernel on packed's GPU into `out`, on torch's current stream; tensors go to CuPy
    through DLPack (no copies); same arguments and result as launch_emulation. Not yet run on a
    GPU by its author (written and compiled without one): tests/gpu_check.sh runs it."""
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("dequantize_4bit(backend='cuda') needs CuPy: pip install -e \".[gpu]\" "
                           f"(cupy-cuda12x for CUDA 12) [{e}]") from None
    source = kernel_source()
    if source not in _MODULES:
        _MODULES[source] = cupy.RawModule(code=source, options=("--std=c++14",))
    name, tensors, ints = _kernel_args(packed, state, out)
    blocks, threads = _grid(ints[0], source)
    if blocks == 0:                                         # an empty tensor: CUDA refuses a 0 grid
        return
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    with cupy.cuda.Device(packed.device.index), cupy.cuda.ExternalStream(stream):
        arrays = [cupy.empty(0, cupy.uint8) if t is None else cupy.from_dlpack(t) for t in tensors]
        scalars = [cupy.int64(ints[0]), cupy.int32(ints[1]), cupy.int32(ints[2])]
        _MODULES[source].get_function(name)((blocks,), (threads,), (*arrays, *scalars))


_MODULES = {}


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype=None, backend: str = "auto"):
    """packed bytes + state -> the weight in state.shape, through the chosen backend.

    >>> from minqlora import quantize_4bit
    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [round(v, 4) for v in dequantize_4bit(packed, state, backend="torch").tolist()]
    [0.4407, -1.0, 0.0]

    backend="emulate" returns the same bits by running kernels/dequant_nf4.cu on the CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"dequantize_4bit: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "cuda" if packed.is_cuda and find_spec("cupy") is not None else "torch"
    if backend == "torch":
        return dequantize_4bit_torch(packed, state, dtype)
    dtype = dtype or state.dtype
    n = state.shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit: expected {(n + 1) // 2} uint8 bytes for shape "
                         f"{tuple(state.shape)}, got {packed.numel()} of {packed.dtype}")
    if backend == "cuda" and not packed.is_cuda:
        raise ValueError("dequantize_4bit(backend='cuda'): packed is on the CPU; move it and the "
                         "state to a GPU (.cuda(), state.to('cuda')) or use backend='emulate'")
    if backend == "emulate" and packed.device.type != "cpu":
        raise ValueError("dequantize_4bit(backend='emulate'): needs CPU tensors, got "
                         f"{packed.device}")
    kernel_dtype = dtype if dtype in SUFFIX else torch.float32  # float64: exact cast of float32
    out = torch.empty(n, dtype=kernel_dtype, device=packed.device)  # (n,)
    (launch_cuda if backend == "cuda" else launch_emulation)(packed, state, out)
    return out.to(dtype).reshape(state.shape)

