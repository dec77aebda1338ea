"""dequantize_4bit: the 4-bit format decoded by a backend of choice, all alike (lesson 05).

    "torch"    decode_in_chunks below: vectorised PyTorch, on any device;
    "cuda"     kernels/dequant_nf4.cu on the GPU through CuPy (cuda.py; `pip install -e ".[gpu]"`);
    "emulate"  the same .cu compiled for the CPU and run thread by thread (emulate.py);
    "cpp"      a C++ loop written for the CPU: 16 products per block, then a lookup per weight
               (cpu_decode.py).

"auto" picks by what this machine has, the same way every time (auto_backend(device) says it):
CUDA tensors get "cuda" when CuPy can be imported; CPU tensors get "cpp" on Linux when a C++
compiler is found (it does about a third of the kernel's work per weight, so it decodes 2-3x
faster than the emulation and the torch path, in one pass; its first use compiles it, once, in
seconds); everything else, and anything torch.compile traces (a ctypes or CuPy call cannot be
traced; the compiled torch path is one fused loop), gets "torch". The emulation is there to
run the GPU kernel's own text where there is no GPU (lesson 05), not for speed. A backend that
cannot run raises, e.g. a compiler that fails to build; nothing falls back quietly to another.
REGISTRY below is the one list: {name: (decode, whether auto picks it on a device)}, in auto's
order; adding a backend is its module plus one line there. dequantize_4bit checks the state
once and tells the decoder so (checked=True).

All four compute lesson 04's definition (quant_state.decode_4bit), out[i] = code[nibble i] *
absmax[i // blocksize] in float32, cast once; tests/test_backends.py proves them bit-identical.
The torch backend reshapes the definition for speed:

    pairs[byte] = (code[byte >> 4], code[byte & 15])     a (256, 2) table: one lookup per byte
    out[chunk]  = embedding(packed[chunk], pairs) * absmax[block]     DECODE_CHUNK per step

Worked example: byte 0xC0 of an NF4 weight looks up pairs[192] = (NF4[12], NF4[0]) =
(0.4407, -1.0); with absmax 2 it decodes to (0.8814, -2.0). A 4096x4096 weight is 64 chunks
of 2^18 values, each a few passes over data that stays in the CPU's cache.

The output is a new tensor each call. A 4096x4096 bf16 one is 32 MiB: 8192 pages of 4 KiB,
each a page fault on its first write, which on a virtual machine costs more than the decoding.
So a big CPU output is first asked to come in 2 MiB pages (madvise MADV_HUGEPAGE, what torch
does for every allocation under THP_MEM_ALLOC_ENABLE=1): 16 faults instead of 8192. A hint
only: the values are the same, and where the OS says no nothing changes.
"""
import ctypes
import functools
import platform
import sys

import torch

from ._checks import check_dtype
from .cuda import CUPY_INSTALL, cupy_or_none, launch_cuda
from .build import find_compiler
from .cpu_decode import decode_cpp
from .emulate import launch_emulation
from .launch import SUFFIX
from .quant_state import QuantState
from .state_checks import check_state

DECODE_CHUNK = 1 << 18  # values decoded per step: enough to vectorise, few enough for the cache
HUGE_PAGE = 1 << 21  # bytes: a transparent huge page on x86-64 (arm64 with 4 KiB pages)


def auto_backend(device) -> str:
    """The backend that backend="auto" runs for tensors on `device` (see the module's text).

    >>> auto_backend(torch.device("meta"))
    'torch'
    """
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return "torch"
    return next(name for name, (_, picked) in REGISTRY.items() if picked(device))


@functools.lru_cache(maxsize=None)
def _has_compiler() -> bool:
    return find_compiler() is not None     # looked up once per process, as CuPy is


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise on x86-64 / arm64 Linux (where MADV_HUGEPAGE is 14), else None."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def empty_output(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(n), a big CPU one asked for 2 MiB pages first (the module's last paragraph)."""
    out = torch.empty(n, dtype=dtype, device=device)
    if (out.device.type != "cpu" or out.nbytes < 4 * HUGE_PAGE or torch.compiler.is_compiling()
            or _madvise() is None):
        return out
    start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE           # the whole 2 MiB pages
    end = (out.data_ptr() + out.nbytes) // HUGE_PAGE * HUGE_PAGE    # inside the tensor
    _madvise()(start, end - start, 14)                              # 14: MADV_HUGEPAGE
    return out


def decode_in_chunks(packed: torch.Tensor, state: QuantState, out: torch.Tensor,
                     checked: bool = False) -> None:
    """The "torch" backend: decode packed bytes into `out` ((n,) of any float dtype) with a
    byte -> (high, low) code table, DECODE_CHUNK values at a time (checked: the state was)."""
    if not checked:
        check_state(packed, state, "decode_in_chunks")
    code = torch.nn.functional.pad(state.code.to(packed.device, torch.float32),
                                   (0, 16 - state.code.numel()))       # INT4 leaves index 15 unused
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2)
    absmax = state.absmax_fp32().to(packed.device)                    # (n_blocks,) float32
    blocksize, n_blocks, n = state.blocksize, absmax.numel(), out.numel()
    if n_blocks == 1:                     # one block: padded to n, not to a (huge) blocksize
        blocksize = n + n % 2
    data = packed.reshape(-1)
    if data.numel() * 2 < n_blocks * blocksize:                       # a partial last block
        data = torch.nn.functional.pad(data, (0, n_blocks * blocksize // 2 - data.numel()))
    step = max(1, DECODE_CHUNK // blocksize)                           # blocks per chunk
    for b in range(0, n_blocks, step):
        first, last = b * blocksize, min((b + step) * blocksize, n)   # values of this chunk
        chunk = data[first // 2:(b + step) * blocksize // 2].int()    # whole blocks of bytes
        values = torch.nn.functional.embedding(chunk, pairs)          # (bytes, 2) float32
        values = values.view(-1, blocksize).mul_(absmax[b:b + step, None])   # (blocks, blocksize)
        out[first:last] = values.view(-1)[:last - first]              # the one cast to dtype


# name: (decode(packed, state, out, checked=...), whether auto picks it for tensors on a device),
# in auto's order. A new backend is a module with its decode plus one line here.
REGISTRY = {
    "cuda": (launch_cuda, lambda device: device.type == "cuda" and cupy_or_none() is not None),
    "cpp": (decode_cpp, lambda device: device.type == "cpu" and sys.platform.startswith("linux")
            and _has_compiler()),
    "emulate": (launch_emulation, lambda device: False),     # for checking the kernel, not speed
    "torch": (decode_in_chunks, lambda device: True),
}


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype=None, backend: str = "auto"):
    """packed bytes + state -> the weight in state.shape (default dtype: state.dtype), decoded by
    `backend`; all backends give the same bits.

    >>> from minqlora import quantize_4bit
    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [round(v, 4) for v in dequantize_4bit(packed, state, backend="torch").tolist()]
    [0.4407, -1.0, 0.0]

    The kernels write float32, bfloat16 or float16; another dtype (float64) is decoded in float32
    and cast, which is exact, as on the torch path.
    """
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"dequantize_4bit: unknown backend {backend!r}; choose one of "
                         f"{('auto', *REGISTRY)}")
    check_dtype(dtype, "dequantize_4bit")
    check_state(packed, state, "dequantize_4bit")           # the one check of this decode
    if backend == "auto":
        backend = auto_backend(packed.device)
    if backend == "cuda" and not packed.is_cuda:
        missing = ("torch sees no CUDA GPU on this machine" if not torch.cuda.is_available() else
                   "packed is on the CPU; move it and the state to the GPU "
                   "(packed.cuda(), state.to('cuda'))")
        cupy = "" if cupy_or_none() is not None else f"; it also needs CuPy: {CUPY_INSTALL}"
        raise ValueError(f"dequantize_4bit(backend='cuda'): {missing}{cupy}. "
                         "backend='emulate' runs the same kernel on the CPU")
    if backend in ("emulate", "cpp") and packed.device.type != "cpu":
        raise ValueError(f"dequantize_4bit(backend={backend!r}): needs CPU tensors, got "
                         f"{packed.device}; use backend='cuda' on a GPU")
    dtype = dtype or state.dtype
    written = dtype if backend == "torch" or dtype in SUFFIX else torch.float32
    out = empty_output(state.shape.numel(), written, packed.device)            # (n,)
    decode, _ = REGISTRY[backend]
    decode(packed, state, out, checked=True)
    return out.to(dtype).view(state.shape)
