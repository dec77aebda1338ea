"""The CUDA dequantization kernel launched from Python, and the choice of backend (lesson 05).

kernels/dequant_nf4.cu decodes the 4-bit format of lesson 04 in one pass, one GPU thread per
16 packed bytes (32 weights), 256 threads per block:

    absmax[b] = dynamic_code[qabsmax[b]] * absmax2[b // 256] + offset     (nested state)
    out[i]    = code[nibble i] * absmax[i // blocksize], in float32, cast once to dtype

Three backends give bit-identical results:
  "torch"   the vectorised reference, minqlora.double_quant.dequantize_4bit;
  "cuda"    the kernel on the GPU through cupy.RawModule (CUDA tensors; `pip install -e ".[gpu]"`);
  "emulate" the same .cu compiled for the CPU and run thread by thread (emulate.py).
"auto" is "cuda" for CUDA tensors when CuPy can be imported, else "torch".

Worked example: a 4096x4096 weight is 8,388,608 packed bytes, a grid of 2048 blocks of 256
threads; each thread loads its 16 bytes at once and writes 32 bfloat16 values (64 bytes).

NOT YET RUN ON A GPU: the "cuda" path was written and compiled (nvcc to PTX and cubin for
sm_80 / sm_90, NVRTC for compute_80 / compute_90) on a machine without one, and its Python side
is tested there with a stand-in CuPy that runs the emulation. tests/gpu_check.sh runs the GPU
tests and bench where a GPU is present. What a launch needs (grid, arguments, checks) lives in
launch.py; the CPU build in emulate.py.
"""
from functools import lru_cache

import torch

from .double_quant import QuantState
from .double_quant import dequantize_4bit as dequantize_4bit_torch
from .emulate import EmulationUnavailable, launch_emulation  # noqa: F401 (callers catch it here)
from .launch import SUFFIX, grid, kernel_args, kernel_source

BACKENDS = ("auto", "torch", "cuda", "emulate")
INSTALL = 'pip install -e ".[gpu]" (cupy-cuda12x; pick the cupy-cuda* wheel for your CUDA)'
_MODULES = {}                                   # kernel source -> cupy.RawModule


@lru_cache(maxsize=None)
def _cupy():
    """The cupy module, or None when it cannot be imported (tried once per process)."""
    try:
        import cupy
    except ImportError:     # also what a CuPy built for another CUDA raises
        return None
    return cupy


def launch_cuda(packed, state, out) -> None:
    """Run the kernel on packed's GPU into `out` ((n,) float32 / bfloat16 / float16 on the same
    GPU), on torch's current stream; the tensors reach CuPy through DLPack, without copies.
    Same arguments and bits as emulate.launch_emulation. Never yet run on a GPU (see above)."""
    cupy = _cupy()
    if cupy is None:
        raise RuntimeError(f"dequantize_4bit(backend='cuda') needs CuPy, which cannot be "
                           f"imported here: {INSTALL}")
    source = kernel_source()
    name, tensors, (n, log2_bs, log2_bs2) = kernel_args(packed, state, out)
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


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype=None, backend: str = "auto"):
    """packed bytes + state -> the weight in state.shape (default dtype: state.dtype), decoded by
    `backend`; all backends give the same bits.

    >>> from minqlora import quantize_4bit
    >>> packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    >>> [round(v, 4) for v in dequantize_4bit(packed, state).tolist()]   # CPU: auto is torch
    [0.4407, -1.0, 0.0]

    backend="emulate" gives these bits by running kernels/dequant_nf4.cu on the CPU. A float64
    (or other) dtype is decoded in float32 and cast, which is exact, as on the torch path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"dequantize_4bit: unknown backend {backend!r}; choose one of {BACKENDS}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dequantize_4bit: dtype must be a floating-point dtype, got {dtype}")
    if backend == "auto":
        backend = "cuda" if packed.is_cuda and _cupy() is not None else "torch"
    if backend == "torch":
        return dequantize_4bit_torch(packed, state, dtype)
    if backend == "cuda" and not packed.is_cuda:
        missing = ("torch sees no CUDA GPU on this machine" if not torch.cuda.is_available() else
                   "packed is on the CPU; move it and the state to the GPU "
                   "(packed.cuda(), state.to('cuda'))")
        cupy = "" if _cupy() is not None else f"; it also needs CuPy: {INSTALL}"
        raise ValueError(f"dequantize_4bit(backend='cuda'): {missing}{cupy}. "
                         "backend='emulate' runs the same kernel on the CPU")
    if backend == "emulate" and packed.device.type != "cpu":
        raise ValueError("dequantize_4bit(backend='emulate'): needs CPU tensors, got "
                         f"{packed.device}; use backend='cuda' on a GPU")
    dtype = dtype or state.dtype
    kernel_dtype = dtype if dtype in SUFFIX else torch.float32
    out = torch.empty(state.shape.numel(), dtype=kernel_dtype, device=packed.device)  # (n,)
    (launch_cuda if backend == "cuda" else launch_emulation)(packed, state, out)
    return out.to(dtype).reshape(state.shape)
