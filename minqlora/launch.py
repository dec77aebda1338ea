"""What one launch of the dequantization kernel needs (lesson 05): the source, grid, arguments.

kernels/dequant_nf4.cu gives each GPU thread BYTES_PER_THREAD packed bytes (2 weights per
byte) and puts THREADS_PER_BLOCK threads in a block, so for n weights

    grid = ceil(n / (THREADS_PER_BLOCK * 2 * BYTES_PER_THREAD)) blocks of THREADS_PER_BLOCK

Worked example: 4096 * 4096 weights at 256 threads x 16 bytes = 8192 weights per block is a
grid of 2048 blocks. The kernel trusts the sizes it is given, so kernel_args() checks the
QuantState first (check_launch): a wrong absmax count would read past a buffer, not raise.

Both launchers use this module: the GPU one (cuda.py, through CuPy) and the CPU emulation
(emulate.py). The source is read from kernels/, never kept as a Python string.
"""
import ctypes
import re
from functools import lru_cache
from pathlib import Path

import torch

from .blockwise import ceil_div
from .state_checks import check_state

HERE = Path(__file__).resolve().parent
# kernels/ sits inside minqlora/ in a wheel, beside it in a checkout (editable install)
KERNELS = next((p for p in (HERE / "kernels", HERE.parent / "kernels")
                if (p / "dequant_nf4.cu").exists()), HERE / "kernels")
MAX_GRID = 2 ** 31 - 1        # blocks in one launch (gridDim.x)
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # kernel names


def kernel_source(name: str = "dequant_nf4.cu") -> str:
    """The text of a file in kernels/ (shipped in wheels as minqlora/kernels/), read again only
    when the file changes (a launch costs microseconds on a GPU, so no disk read per call).

    >>> kernel_source().splitlines()[0][:15]
    '// dequant_nf4.'
    """
    path = KERNELS / name
    return _read(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _read(path: Path, mtime_ns: int) -> str:
    return path.read_text()


@lru_cache(maxsize=16)
def geometry(source: str) -> tuple[int, int]:
    """(THREADS_PER_BLOCK, BYTES_PER_THREAD) as #defined in the kernel source.

    >>> geometry(kernel_source())
    (256, 16)
    """
    def define(name):
        found = re.search(rf"#define {name} (\d+)", source)
        if found is None:
            raise ValueError(f"kernel source: no `#define {name} <number>` line")
        return int(found.group(1))
    return define("THREADS_PER_BLOCK"), define("BYTES_PER_THREAD")


def grid(n: int, source: str) -> tuple[int, int]:
    """(blocks, threads per block) for n weights.

    >>> grid(4096 * 4096, kernel_source()), grid(3, kernel_source()), grid(0, kernel_source())
    ((2048, 256), (1, 256), (0, 256))
    """
    threads, per_thread = geometry(source)
    blocks = ceil_div(n, threads * 2 * per_thread)
    if blocks > MAX_GRID:                 # CUDA's limit; the emulation's block index is 32-bit
        raise ValueError(f"dequantize_4bit: {n} weights need a grid of {blocks} blocks, more "
                         f"than a launch takes ({MAX_GRID})")
    return blocks, threads


def check_launch(packed: torch.Tensor, state, out: torch.Tensor, checked: bool = False) -> None:
    """Raise ValueError unless packed, state and out have the sizes and places the kernel reads:
    state_checks.check_state's rules (a 256-value dynamic code when nested among them; skipped
    when `checked`: dequantize_4bit has checked the state once already), every tensor on
    packed's device, and `out` a contiguous, 16-byte aligned (n,) float32 / bf16 / fp16 tensor."""
    if not checked:
        check_state(packed, state, "dequantize_4bit")
    n = state.shape.numel()
    tensors = [state.absmax, state.code]     # check_state: state2.code has 256 values, so
    if state.nested:                          # the kernel's code2[qabsmax] stays inside it
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    if any(t.device != packed.device for t in tensors):
        raise ValueError(f"dequantize_4bit: the state must be on {packed.device} like packed "
                         f"(state.to({str(packed.device)!r}))")
    if packed.is_meta:                       # data_ptr() 0: a kernel would read address 0
        raise ValueError("dequantize_4bit: meta tensors hold no bytes to decode")
    if (out.dtype not in SUFFIX or out.shape != (n,) or not out.is_contiguous()
            or out.device != packed.device or out.data_ptr() % 16):
        raise ValueError(f"dequantize_4bit: out must be a contiguous, 16-byte aligned ({n},) "
                         f"float32/bfloat16/float16 tensor on {packed.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")


def kernel_args(packed: torch.Tensor, state, out: torch.Tensor, checked: bool = False):
    """(kernel name, [7 input tensors or None, out], (n, log2 blocksize, log2 blocksize2)), in
    the order of the kernel's parameters; None where a plain (not nested) kernel has no input.

    >>> from minqlora import quantize_4bit
    >>> packed, state = quantize_4bit(torch.randn(100), 64)
    >>> name, tensors, ints = kernel_args(packed, state, torch.empty(100, dtype=torch.bfloat16))
    >>> name, [None if t is None else t.dtype for t in tensors[2:4]], ints
    ('dequant_4bit_bf16_nested', [None, torch.uint8], (100, 6, 8))
    """
    check_launch(packed, state, out, checked)
    code = torch.nn.functional.pad(state.code.float(), (0, 16 - state.code.numel()))  # (16,) f32
    packed = packed.reshape(-1)                                          # (ceil(n / 2),) uint8
    if packed.data_ptr() % 16:               # the kernel loads 16 bytes at a time: align a copy
        packed = packed.clone()
    if state.nested:        # qabsmax (n_blocks,) u8, dynamic code (256,), absmax2, offset (1,)
        inner = state.state2
        tensors = [packed, code, None, state.absmax, inner.code.float(), inner.absmax.float(),
                   state.offset.float().reshape(1)]
    else:                   # absmax (n_blocks,) float32
        tensors = [packed, code, state.absmax.float(), None, None, None, None]
    tensors = [t if t is None else t.contiguous() for t in tensors]
    bits = out if out.dtype == torch.float32 else out.view(torch.int16)  # 16-bit outputs as bits
    log2_bs2 = state.state2.blocksize.bit_length() - 1 if state.nested else 0
    name = f"dequant_4bit_{SUFFIX[out.dtype]}{'_nested' if state.nested else ''}"
    return name, tensors + [bits], (state.shape.numel(), state.blocksize.bit_length() - 1, log2_bs2)


def c_pointers(tensors: list) -> list:
    """kernel_args' tensors as the C pointers a ctypes call takes (None: a null pointer), for
    both CPU libraries, the emulation and the C++ decoder."""
    return [ctypes.c_void_p(None if t is None else t.data_ptr()) for t in tensors]
