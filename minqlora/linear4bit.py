"""Linear4bit: a frozen linear layer stored in NF4, computed in bf16 (lesson 07).

Storage, all in buffers so state_dict() round-trips bit for bit and .to(device) moves them:

    weight_packed  uint8   (out*in/2,)          two 4-bit code indices per byte
    qabsmax        uint8   (n_blocks,)          absmax ~= DYNAMIC[qabsmax] * absmax2 + offset
    code           float32 (16,)                the codebook (NF4, FP4 or INT4)
    absmax2        float32 (n_blocks/256,)      one scale per 256 absmaxes
    offset         float32 ()                   the absmaxes' mean
    (double_quant=False: weight_packed, absmax float32 (n_blocks,), code)

Compute, with the weight dequantized twice and never kept (Linear4bitFunction):

    forward:   W = dequantize_4bit(bytes, state) in compute_dtype     (out, in), freed after
               y = x @ W.T + bias
    backward:  W = dequantize_4bit(bytes, state) again
               dx = dy @ W                dbias = dy summed over tokens (if bias trains)
               no dW: the base weight is frozen; only LoRA's adapters learn

Worked example: a 4096x4096 weight stores 8 MiB of bytes + 256 KiB qabsmax + 4 KiB absmax2
+ 4 B offset: 4.127 bits per parameter instead of bf16's 16, and its 32 MiB bf16 copy lives
only for one matmul. Like bitsandbytes' Linear4bit, forward casts x to compute_dtype and
returns x's dtype, so the layer drops into a float32 or a bf16 model.

Left to other modules: the storage format (double_quant.py), the dequantize backend (cuda.py:
"auto" picks torch on CPU and would pick the CUDA kernel for CUDA tensors with CuPy; that path
has never been run with this layer, as no GPU was at hand), the adapters (lora.py) and
whole-model conversion (qlora.py).
"""
import torch
from torch import nn

from .cuda import dequantize_4bit
from .double_quant import QuantState, dynamic_code_on, quantize_4bit
from .nf4 import CODES
from .lora import check_input


def make_state(layout: tuple, absmax, code, absmax2=None, offset=None) -> QuantState:
    """QuantState from a layout (shape, blocksize, quant_type, dtype) and the constants; with
    absmax2 and offset given, `absmax` is the uint8 qabsmax of a double-quantized state."""
    shape, blocksize, quant_type, dtype = layout
    state2 = None if absmax2 is None else QuantState(     # the absmaxes' own state
        absmax2, dynamic_code_on(absmax2.device), 256, absmax.shape, torch.float32, "dynamic")
    return QuantState(absmax, code, blocksize, torch.Size(shape), dtype, quant_type, offset, state2)


def _name_loaded_code(layer, incompatible_keys) -> None:
    """After load_state_dict, quant_type names the code table that was loaded (an fp4 checkpoint
    in an nf4 layer); decoding always uses the loaded table itself."""
    code = layer.code.cpu()
    layer.quant_type = next((name for name, c in CODES.items() if torch.equal(c, code)), "custom")


class Linear4bitFunction(torch.autograd.Function):
    """y = x @ dequantize(bytes, state).T + bias; saves only the bytes and the state's tensors."""

    @staticmethod
    def forward(ctx, x, bias, layout, packed, *constants):
        ctx.layout = layout
        ctx.save_for_backward(packed, *constants)               # no full-precision W here
        weight = dequantize_4bit(packed, make_state(layout, *constants), dtype=x.dtype)
        return nn.functional.linear(x, weight, bias)            # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):                                # grad_out: (..., out)
        packed, *constants = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:                             # dequantize again, (out, in)
            weight = dequantize_4bit(packed, make_state(ctx.layout, *constants), grad_out.dtype)
            grad_x = grad_out @ weight                          # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)   # (out,)
        return (grad_x, grad_bias) + (None,) * (2 + len(constants))


class Linear4bit(nn.Module):
    """nn.Linear's drop-in with a frozen 4-bit weight (NF4 + double quantization by default).

    >>> _ = torch.manual_seed(0)
    >>> layer = Linear4bit.from_linear(nn.Linear(128, 64))
    >>> sorted(layer.state_dict()), layer.weight_packed.shape
    (['absmax2', 'bias', 'code', 'offset', 'qabsmax', 'weight_packed'], torch.Size([4096]))
    >>> layer(torch.randn(2, 128)).dtype            # computed in bf16, returned as the input
    torch.float32
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                 compute_dtype: torch.dtype = torch.bfloat16, device=None, dtype=None,
                 _linear: nn.Linear = None):
        super().__init__()
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise TypeError(f"Linear4bit: compute_dtype must be a floating-point torch.dtype, "
                            f"got {compute_dtype!r}")
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"Linear4bit: {name} must be an integer >= 1, got {n!r}")
        if _linear is None:                                     # a fresh, randomly set weight
            _linear = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.quant_type = blocksize, double_quant, quant_type
        self.compute_dtype, self.weight_dtype = compute_dtype, _linear.weight.dtype
        packed, state = quantize_4bit(_linear.weight.detach(), blocksize, quant_type, double_quant)
        nested = (state.state2.absmax, state.offset) if double_quant else ()
        self.register_buffer("weight_packed", packed)
        for name, t in zip(self._constant_names(), (state.absmax, state.code, *nested)):
            self.register_buffer(name, t.to(packed.device).clone())     # code: a shared table
        b = _linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), b.requires_grad)
        self.register_load_state_dict_post_hook(_name_loaded_code)

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
        return cls(linear.in_features, linear.out_features, linear.bias is not None,
                   _linear=linear, **kwargs)

    def _constant_names(self) -> tuple:                        # make_state's argument order
        return ("qabsmax", "code", "absmax2", "offset") if self.double_quant else ("absmax", "code")

    def constants(self) -> tuple:
        """The state's buffers: qabsmax, code, absmax2, offset (or absmax, code)."""
        return tuple(self._buffers[name] for name in self._constant_names())

    @property
    def layout(self) -> tuple:
        """(shape, blocksize, quant_type, dtype): what make_state needs besides the buffers."""
        shape = (self.out_features, self.in_features)
        return shape, self.blocksize, self.quant_type, self.weight_dtype

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The full weight (out, in) in `dtype` (default: the dtype it was quantized from)."""
        state = make_state(self.layout, *self.constants())
        return dequantize_4bit(self.weight_packed, state, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, "Linear4bit")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = Linear4bitFunction.apply(x.to(self.compute_dtype), bias, self.layout,
                                       self.weight_packed, *self.constants())
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
