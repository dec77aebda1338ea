"""The CUDA dequantization kernel launched on a GPU through CuPy (lesson 05).

kernels/dequant_nf4.cu decodes the 4-bit format of lesson 04 in one pass, one GPU thread per
16 packed bytes (32 weights), 256 threads per block:

    absmax[b] = dynamic_code[qabsmax[b]] * absmax2[b // 256] + offset     (nested state)
    out[i]    = code[nibble i] * absmax[i // blocksize], in float32, cast once to dtype

CuPy compiles the source with NVRTC on first use (one cupy.RawModule per distinct source) and
launches it on torch's current stream; the tensors reach CuPy through DLPack, without copies.

Worked example: a 4096x4096 weight is 8,388,608 packed bytes, a grid of 2048 blocks of 256
threads; each thread loads its 16 bytes at once and writes 32 bfloat16 values (64 bytes).
What a launch needs (source, grid, arguments, checks) is launch.py's; the same kernel on the
CPU is emulate.py's; choosing between them is backends.py's.
"""
from functools import lru_cache

import torch

from .launch import grid, kernel_args, kernel_source

CUPY_INSTALL = 'pip install -e ".[gpu]" (cupy-cuda12x; pick the cupy-cuda* wheel for your CUDA)'
_MODULES = {}                                   # kernel source -> cupy.RawModule


@lru_cache(maxsize=None)
def cupy_or_none():
    """The cupy module, or None when it cannot be imported (tried once per process)."""
    try:
        import cupy
    except ImportError:     # also what a CuPy built for another CUDA raises
        return None
    return cupy


def launch_cuda(packed, state, out, checked: bool = False) -> None:
    """Run the kernel on packed's GPU into `out` ((n,) float32 / bfloat16 / float16 on the same
    GPU), on torch's current stream. Same arguments and bits as emulate.launch_emulation."""
    cupy = cupy_or_none()
    if cupy is None:
        raise RuntimeError(f"dequantize_4bit(backend='cuda') needs CuPy, which cannot be "
                           f"imported here: {CUPY_INSTALL}")
    source = kernel_source()
    name, tensors, (n, log2_bs, log2_bs2) = kernel_args(packed, state, out, checked)
    blocks, threads = grid(n, source)
    if blocks == 0:                                     # an empty tensor: CUDA refuses a 0 grid
        return
    if source not in _MODULES:                          # compiled by NVRTC on first use
        _MODULES[source] = cupy.RawModule(code=source, options=("--std=c++14",))
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    with cupy.cuda.Device(packed.device.index), cupy.cuda.ExternalStream(stream):
        # a plain kernel ignores its nested inputs: an empty array stands for a null pointer
        arrays = [cupy.empty(0, cupy.uint8) if t is None else cupy.from_dlpack(t) for t in tensors]
        scalars = [cupy.int64(n), cupy.int32(log2_bs), cupy.int32(log2_bs2)]
        _MODULES[source].get_function(name)((blocks,), (threads,), (*arrays, *scalars))
