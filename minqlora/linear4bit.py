"""Linear4bit: a frozen linear layer stored in NF4, computed in bf16 (lesson 07).

Storage, all in buffers so .to(device) moves them (the course's names):

    weight_packed  uint8   (out*in/2,)          two 4-bit code indices per byte
    qabsmax        uint8   (n_blocks,)          absmax ~= DYNAMIC[qabsmax] * absmax2 + offset
    code           float32 (16,)                the codebook (NF4, FP4 or INT4)
    absmax2        float32 (n_blocks/256,)      one scale per 256 absmaxes
    offset         float32 ()                   the absmaxes' mean
    (double_quant=False: weight_packed, absmax float32 (n_blocks,), code)

state_dict() speaks bitsandbytes' layout instead (bnb_state_dict.py, a mixin: keys weight,
weight.absmax, weight.quant_map, weight.nested_*, weight.quant_state.bitsandbytes__nf4, bias),
so a checkpoint written here loads in bitsandbytes and Transformers and back; a failed load
leaves the layer as it was.

Compute, with the weight dequantized twice and never kept (Linear4bitFunction). The buffers
make one QuantState per forward (quant_state()); autograd keeps it on ctx for the backward:

    forward:   W = dequantize_4bit(bytes, state) in compute_dtype     (out, in), freed after
               y = x @ W.T + bias
    backward:  W = dequantize_4bit(bytes, state) again
               dx = dy @ W                dbias = dy summed over tokens (if bias trains)
               no dW: the base weight is frozen; only LoRA's adapters learn

On a CPU, dx for a 16-bit compute_dtype is computed in float32 (forward's W and dy widened
exactly, one float32 matmul, rounded once to compute_dtype): torch's CPU matmul in bf16 / fp16
for this operand layout (W not transposed) is a plain loop without native bf16 hardware,
0.1-0.5 GFLOP/s against tens in float32, which made it 90% of a training step. The float32
product is also the exact one rounded once; forward keeps F.linear in compute_dtype. Under
torch.compile, dx is `dy @ W` in compute_dtype (as bitsandbytes computes it): the compiler fuses
one layer's rounding of dx to bf16 with the next layer's widening back to float32 and drops
both, so the widened form gave up to 2e-3 other gradients than eager; the 16-bit GEMM, which
accumulates in float32 and rounds once, gives eager's bits in bf16 and eager's values within a
rounding in fp16 (tests/test_compile.py).

Worked example: a 4096x4096 weight stores 8 MiB of bytes + 256 KiB qabsmax + 4 KiB absmax2
+ 4 B offset: 4.127 bits per parameter instead of bf16's 16, and its 32 MiB bf16 copy lives
only for one matmul. Like bitsandbytes' Linear4bit, forward casts x to compute_dtype and
returns x's dtype, so the layer drops into a float32 or a bf16 model.

Left to other modules: the storage format (quant_state.py), the dequantize backend
(backends.py: layer.backend = "auto" picks the CUDA kernel for CUDA tensors with CuPy, the C++
CPU decoder on Linux with a C++ compiler, else the torch path; set "torch", "cpp", "emulate" or
"cuda" to choose), the adapters (lora.py) and whole-model conversion (qlora.py).
"""
import torch
from torch import nn

from .backends import dequantize_4bit
from .bnb_state_dict import BnbStateDict
from .lora import check_input
from .quant_state import QuantState, absmax_state, quantize_4bit


class Linear4bitFunction(torch.autograd.Function):
    """y = x @ dequantize(bytes, state).T + bias. Saves the bytes and keeps the state on ctx, as
    lesson 07's DequantLinear and bitsandbytes' MatMul4Bit do: one QuantState, two decodes."""

    @staticmethod
    def forward(ctx, x, bias, packed, state, backend="auto"):
        ctx.state, ctx.backend = state, backend                 # the layer's buffers, no copy
        ctx.save_for_backward(packed)                           # no full-precision W here
        weight = dequantize_4bit(packed, state, x.dtype, backend)   # (out, in), freed on return
        return nn.functional.linear(x, weight, bias)            # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):                                # grad_out: (..., out)
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:                             # dequantize again, (out, in)
            dtype = grad_out.dtype                              # forward's W, bit for bit
            weight = dequantize_4bit(packed, ctx.state, dtype, ctx.backend)
            if grad_out.device.type == "cpu" and dtype.itemsize < 4 and \
                    not torch.compiler.is_compiling():          # in float32 (see above)
                grad_x = (grad_out.float() @ weight.float()).to(dtype)
            else:
                grad_x = grad_out @ weight                      # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            wide = torch.promote_types(grad_out.dtype, torch.float32)   # summed in float32,
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=wide)  # (out,)
            grad_bias = grad_bias.to(grad_out.dtype)                      # rounded once
        return grad_x, grad_bias, None, None, None


class Linear4bit(BnbStateDict, nn.Module):
    """nn.Linear's drop-in with a frozen 4-bit weight (NF4 + double quantization by default).

    >>> _ = torch.manual_seed(0)
    >>> layer = Linear4bit.from_linear(nn.Linear(128, 64))
    >>> [name for name, _ in layer.named_buffers()], layer.weight_packed.shape
    (['weight_packed', 'qabsmax', 'code', 'absmax2', 'offset'], torch.Size([4096]))
    >>> list(layer.state_dict())[:3]               # as bitsandbytes names them
    ['weight', 'bias', 'weight.absmax']
    >>> layer(torch.randn(2, 128)).dtype            # computed in bf16, returned as the input
    torch.float32
    """

    backend = "auto"    # dequantize_4bit's backend in forward and backward (backends.py)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                 compute_dtype: torch.dtype = torch.bfloat16, device=None, dtype=None):
        """A layer over a fresh nn.Linear(in_features, out_features, bias)'s random weight,
        quantized: the shape to load a checkpoint into. from_linear quantizes a given layer."""
        super().__init__()
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"Linear4bit: {name} must be an integer >= 1, got {n!r}")
        self._store(nn.Linear(in_features, out_features, bias, device=device, dtype=dtype),
                    blocksize, double_quant, quant_type, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Linear4bit":
        """Quantize an nn.Linear's weight (kwargs: blocksize, double_quant, quant_type,
        compute_dtype); the bias is copied as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear: expected an nn.Linear, "
                            f"got {type(linear).__name__}")
        if {"device", "dtype"} & kwargs.keys():
            raise TypeError("Linear4bit.from_linear: the weight is quantized where it is, in its "
                            "dtype; move the result with .to(device) instead of device=/dtype=")
        layer = cls.__new__(cls)          # not __init__: it would quantize a random weight first
        nn.Module.__init__(layer)
        layer._store(linear, **kwargs)
        return layer

    def _store(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
               quant_type: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16) -> None:
        """Quantize linear's weight into this layer's buffers and copy its bias."""
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise TypeError(f"Linear4bit: compute_dtype must be a floating-point torch.dtype, "
                            f"got {compute_dtype!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self._set_state(*quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant))
        b = linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), b.requires_grad)

    def _set_state(self, packed: torch.Tensor, state: QuantState) -> None:
        """Take packed bytes + state as this layer's weight: buffers and layout attributes."""
        self.blocksize, self.double_quant = state.blocksize, state.nested
        self.quant_type, self.weight_dtype = state.quant_type, state.dtype
        nested = (state.state2.absmax, state.offset) if state.nested else ()
        device = packed.device
        for name in ("qabsmax", "absmax", "code", "absmax2", "offset"):
            self._buffers.pop(name, None)
        self.register_buffer("weight_packed", packed.reshape(-1))
        for name, t in zip(self._constant_names(), (state.absmax, state.code, *nested)):
            self.register_buffer(name, t.to(device).clone())        # code: a shared table

    def _constant_names(self) -> tuple:                        # the QuantState's tensors
        return ("qabsmax", "code", "absmax2", "offset") if self.double_quant else ("absmax", "code")

    def constants(self) -> tuple:
        """The state's buffers: qabsmax, code, absmax2, offset (or absmax, code)."""
        return tuple(self._buffers[name] for name in self._constant_names())

    def quant_state(self, shared: bool = False) -> QuantState:
        """The QuantState of the stored weight, made of the layer's buffers (no copies). Its
        state2.code, the dynamic table, is its own copy (shared=True: one per device, for the
        state a forward pass carries to its backward and no further)."""
        absmax, code, *nested = self.constants()
        state = QuantState(absmax=absmax, code=code, blocksize=self.blocksize,
                           shape=torch.Size([self.out_features, self.in_features]),
                           dtype=self.weight_dtype, quant_type=self.quant_type)
        if nested:
            absmax2, state.offset = nested
            state.state2 = absmax_state(absmax2, absmax.numel(), shared=shared)
        return state

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The full weight (out, in) in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight_packed, self.quant_state(), dtype, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, "Linear4bit")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = Linear4bitFunction.apply(x.to(self.compute_dtype), bias, self.weight_packed,
                                       self.quant_state(shared=True), self.backend)
        return out.to(x.dtype)                                  # (..., out) in x's dtype

    def _apply(self, fn, recurse=True):
        """.to(dtype) / .half() must not round the float32 constants: they only move with the
        bytes (to the same device), keeping their dtype and their place in state_dict()."""
        constants = dict(zip(self._constant_names(), self.constants()))
        super()._apply(fn, recurse)
        self._buffers.update({k: t.to(self.weight_packed.device) for k, t in constants.items()})
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")
