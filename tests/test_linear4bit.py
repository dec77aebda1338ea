import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minqlora.linear4bit as linear4bit_module
from minqlora.backends import dequantize_4bit
from minqlora.linear4bit import Layout, Linear4bit, Linear4bitFunction
from minqlora.nf4 import FP4, NF4
from minqlora.quant_state import quantize_4bit

from helpers import gaussian


def linear(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias)


def test_buffers_hold_exactly_quantize_4bit_output():
    lin = linear(128, 64)
    layer = Linear4bit.from_linear(lin)
    packed, state = quantize_4bit(lin.weight.detach())
    assert torch.equal(layer.weight_packed, packed)
    assert torch.equal(layer.qabsmax, state.absmax) and torch.equal(layer.code, state.code)
    assert torch.equal(layer.absmax2, state.state2.absmax)
    assert torch.equal(layer.offset, state.offset)
    assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state))
    assert [n for n, _ in layer.named_parameters()] == ["bias"]       # no weight parameter


def test_quant_state_is_made_of_the_buffers():
    """quant_state(): the layout's fields, the buffers themselves (no copies), state2 as
    quantize_4bit builds it; plain layers have no offset or state2."""
    layer = Linear4bit.from_linear(linear(96, 40), blocksize=32, quant_type="fp4")
    state = layer.quant_state()
    assert layer.layout == Layout(torch.Size([40, 96]), 32, "fp4", torch.float32)
    assert (state.shape, state.blocksize, state.quant_type, state.dtype) == layer.layout[:4]
    assert layer.layout.backend == "auto"                    # the dequantize backend it uses
    assert state.absmax is layer.qabsmax and state.code is layer.code
    assert state.offset is layer.offset and state.state2.absmax is layer.absmax2
    _, reference = quantize_4bit(linear(96, 40).weight.detach(), 32, "fp4")
    assert (state.state2.blocksize, state.state2.shape) == (reference.state2.blocksize,
                                                            reference.state2.shape)
    plain = Linear4bit.from_linear(linear(96, 40), double_quant=False).quant_state()
    assert plain.offset is None and plain.state2 is None and plain.absmax.dtype == torch.float32


def test_from_linear_quantizes_the_given_weight_once(monkeypatch):
    """from_linear never quantizes a random weight first; Linear4bit(...) quantizes its own."""
    calls = []
    real = linear4bit_module.quantize_4bit
    monkeypatch.setattr(linear4bit_module, "quantize_4bit",
                        lambda w, *a: calls.append(w) or real(w, *a))
    lin = linear(64, 16)
    Linear4bit.from_linear(lin)
    assert len(calls) == 1 and torch.equal(calls[0], lin.weight)
    Linear4bit(64, 16)
    assert len(calls) == 2 and calls[1].shape == (16, 64)


def test_gradcheck_float64():
    """Analytic backward (dequantize again, dy @ W; dbias = sum dy) vs finite differences."""
    layer = Linear4bit.from_linear(linear(12, 6, seed=1).double(), compute_dtype=torch.float64)
    x = gaussian((3, 12), seed=2, dtype=torch.float64).requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    def fn(x, b):
        return Linear4bitFunction.apply(x, b, layer.layout, layer.weight_packed, *layer.constants())
    assert torch.autograd.gradcheck(fn, (x, bias))
    layer.bias.requires_grad_(True)                             # and through the module, 3-D x
    x3 = gaussian((2, 3, 12), seed=3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x3,))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_input_grad_match_a_plain_linear_over_the_dequantized_weight(x_dtype):
    """The reference: F.linear in bf16 over dequantize_4bit(bytes) in bf16, autograd's backward."""
    lin = linear(96, 40, seed=3)
    layer = Linear4bit.from_linear(lin)
    weight = layer.dequantize(torch.bfloat16)                       # (40, 96)
    x = gaussian((4, 7, 96), seed=4, dtype=x_dtype).requires_grad_()
    out = layer(x)
    assert out.dtype == x_dtype and out.shape == (4, 7, 40)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = lin.bias.detach().clone().requires_grad_()
    ref = nn.functional.linear(x_ref.to(torch.bfloat16), weight, b_ref.to(torch.bfloat16))
    assert torch.equal(out, ref.to(x_dtype))
    grad = gaussian((4, 7, 40), seed=5, dtype=x_dtype)
    out.backward(grad)
    ref.to(x_dtype).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=1e-2)
    assert x.grad.dtype == x_dtype
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.bias.grad, grad.float().sum((0, 1)), rtol=0.05, atol=0.05)


def test_on_a_cpu_the_bf16_input_gradient_is_the_float32_product_rounded_once():
    """dx = dy @ W with forward's bf16 W, multiplied in float32 and rounded once: within half a
    bf16 step of the exact (float64) product, wherever float32's own rounding allows."""
    layer = Linear4bit.from_linear(linear(300, 200, seed=9))
    weight = layer.dequantize(torch.bfloat16)                       # forward's W
    x = gaussian((5, 300), seed=10, dtype=torch.bfloat16).requires_grad_()
    grad = gaussian((5, 200), seed=11, dtype=torch.bfloat16)
    layer(x).backward(grad)
    assert torch.equal(x.grad, (grad.float() @ weight.float()).bfloat16())
    exact = grad.double() @ weight.double()
    step = exact.abs().log2().floor().exp2() * 2.0 ** -7              # one bf16 step at each value
    assert ((x.grad.double() - exact).abs() <= step * (0.5 + 2.0 ** -10)).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70), st.integers(1, 40), st.sampled_from([16, 64, 128]),
       st.sampled_from(["nf4", "fp4", "int4"]), st.booleans(), st.integers(0, 2**16))
def test_any_shape_equals_a_linear_over_the_dequantized_weight(in_features, out_features,
                                                               blocksize, quant_type, dq, seed):
    """Property: for every shape (odd sizes, partial blocks) and format, forward in float32
    is F.linear over dequantize_4bit(bytes), and the input gradient is dy @ W."""
    lin = linear(in_features, out_features, seed=seed)
    layer = Linear4bit.from_linear(lin, blocksize=blocksize, quant_type=quant_type,
                                   double_quant=dq, compute_dtype=torch.float32)
    weight = layer.dequantize(torch.float32)                    # (out, in)
    x = gaussian((3, in_features), seed=seed).requires_grad_()
    out = layer(x)
    assert torch.equal(out, nn.functional.linear(x.detach(), weight, lin.bias.detach()))
    grad = gaussian((3, out_features), seed=seed + 1)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)


def test_quantization_error_is_what_nf4_promises():
    """The 4-bit layer is close to the float layer: relative output error of a few percent."""
    lin = linear(256, 128, seed=6)
    x = gaussian((16, 256), seed=7)
    err = (Linear4bit.from_linear(lin)(x) - lin(x)).norm() / lin(x).norm()
    assert 0.01 < err.item() < 0.15, err.item()


def test_backward_saves_no_full_precision_weight():
    """Every tensor autograd saves for this layer's backward is the packed bytes or a state
    tensor: total bytes = packed + constants, never an (out, in) float matrix."""
    layer = Linear4bit.from_linear(linear(256, 128, bias=False))
    layer_bytes = sum(b.nbytes for b in layer.buffers())
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.nbytes))
        return t

    x = gaussian((8, 256)).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert not any(dtype.is_floating_point and shape == (128, 256) for shape, dtype, _ in saved)
    assert sum(n for *_, n in saved) == layer_bytes == 128 * 256 // 2 + 512 + 2 * 4 + 4 + 64, saved
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (8, 256)


def test_dequantizes_once_in_forward_and_once_in_backward_only_when_needed(monkeypatch):
    """The only extra work over a bf16 layer: one decode (in compute_dtype) per forward, one
    more per backward, and none in backward when only the bias needs a gradient."""
    calls, real = [], linear4bit_module.dequantize_4bit

    def counting(*args, **kwargs):
        weight = real(*args, **kwargs)
        calls.append(weight.dtype)
        return weight

    monkeypatch.setattr(linear4bit_module, "dequantize_4bit", counting)
    layer = Linear4bit.from_linear(linear(64, 32))
    x = gaussian((4, 64)).requires_grad_()
    out = layer(x)
    assert calls == [torch.bfloat16]
    out.sum().backward()
    assert calls == [torch.bfloat16] * 2
    layer(x.detach()).sum().backward()                         # only the bias trains
    assert calls == [torch.bfloat16] * 3 and layer.bias.grad is not None


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on aten._local_scalar_dense: what .item(), int(t) and bool(t) run, a device-to-host
    sync on a GPU (and a break in a torch.compile graph)."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            pytest.fail("a host sync (.item() / int() / bool() of a tensor) in the hot path")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "emulate"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_backward_read_no_value_back_to_the_host(backend, double_quant, request):
    """Validation happens at construction (and load); a call only checks sizes and dtypes."""
    if backend == "emulate":
        request.getfixturevalue("emulation")
    layer = Linear4bit.from_linear(linear(128, 64, seed=3), double_quant=double_quant)
    layer.backend = backend
    x = gaussian((4, 128)).requires_grad_()
    with _NoHostSync():
        layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")   # torch's own
def test_the_default_layer_compiles_as_one_graph_with_the_eager_bits():
    """torch.compile(fullgraph=True) refuses any graph break (a host sync would be one); the
    compiled forward and input gradient equal eager's bit for bit (eager may run another
    backend: auto is the torch path while tracing, and every backend gives the same bits).
    x in bf16, the compute dtype, as in a bf16 model: for float32 x, inductor may skip the
    rounding of the bf16 gradient before widening it (it does not emulate precision casts)."""
    try:
        torch.compile(lambda t: t + 1)(torch.ones(2))
    except Exception as e:           # inductor needs a C++ compiler on a CPU
        pytest.skip(f"torch.compile cannot run here: {type(e).__name__}: {e}")
    layer = Linear4bit(256, 256)
    x = gaussian((8, 256), seed=1, dtype=torch.bfloat16).requires_grad_()
    grad = gaussian((8, 256), seed=2, dtype=torch.bfloat16)
    eager = layer(x)
    eager.backward(grad)
    eager_grad, x.grad = x.grad, None
    compiled = torch.compile(layer, fullgraph=True)(x)
    compiled.backward(grad)
    assert torch.equal(compiled.view(torch.int16), eager.view(torch.int16))
    assert torch.equal(x.grad.view(torch.int16), eager_grad.view(torch.int16))


def test_state_dict_round_trips_bit_for_bit():
    layer = Linear4bit.from_linear(linear(64, 48, seed=8), quant_type="nf4")
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = Linear4bit(64, 48)                                 # different random weight
    other.load_state_dict(torch.load(buffer))
    for (name, a), (_, b) in zip(layer.state_dict().items(), other.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = gaussian((3, 64), seed=9)
    assert torch.equal(layer(x), other(x))


def test_loading_a_checkpoint_never_writes_into_the_shared_code_tables():
    """The code buffer is a copy: load_state_dict copies in place, and the NF4 table is global."""
    nf4_before = NF4.clone()
    layer = Linear4bit(64, 8, quant_type="nf4")
    assert layer.code.data_ptr() != NF4.data_ptr()
    layer.load_state_dict(Linear4bit(64, 8, quant_type="fp4").state_dict())
    assert torch.equal(layer.code, FP4) and torch.equal(NF4, nf4_before)


def test_state_dict_keys_depend_on_double_quant():
    plain = Linear4bit(64, 8, double_quant=False)
    assert list(plain.state_dict()) == ["bias", "weight_packed", "absmax", "code"]
    assert plain.absmax.dtype == torch.float32
    with pytest.raises(RuntimeError, match="qabsmax"):
        plain.load_state_dict(Linear4bit(64, 8).state_dict())


def test_dtype_casts_never_round_the_constants():
    """model.to(bfloat16) / .half() cast parameters, but the float32 absmax2 / offset / code
    must stay float32 (a bf16 NF4 table would decode different weights)."""
    layer = Linear4bit.from_linear(linear(64, 32, bias=False))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = gaussian((2, 64))
    y = layer(x)
    layer.half().to(torch.bfloat16)
    assert list(layer.state_dict()) == list(before)             # same keys, same order
    for k, v in layer.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert torch.equal(layer(x), y)


def test_to_device_moves_every_buffer_and_keeps_dtypes():
    """.to(device) moves the bytes and the float32 constants together (the meta device stands
    in for a GPU here: same code path in _apply, no GPU needed)."""
    layer = Linear4bit.from_linear(linear(64, 32))
    dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
    layer.to("meta")
    assert all(v.device.type == "meta" for v in layer.state_dict().values())
    assert {k: v.dtype for k, v in layer.state_dict().items()} == dtypes


def test_odd_shapes_and_other_quant_types():
    for quant_type, double_quant in [("fp4", False), ("int4", True), ("nf4", False)]:
        lin = linear(7, 5, seed=10)                             # 35 weights: odd, one partial block
        layer = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant,
                                       blocksize=16, compute_dtype=torch.float32)
        packed, state = quantize_4bit(lin.weight.detach(), 16, quant_type, double_quant)
        x = gaussian((3, 7), seed=11)
        expected = nn.functional.linear(x, dequantize_4bit(packed, state), lin.bias)
        assert torch.equal(layer(x), expected), quant_type


def test_the_frozen_weight_gets_no_gradient():
    layer = Linear4bit.from_linear(linear(32, 16))
    layer(gaussian((4, 32))).sum().backward()
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())
    assert layer.bias.grad is not None


def test_matches_bitsandbytes_matmul_4bit():
    """Same bytes as bitsandbytes (no double quant: see double_quant.py's note), same output."""
    bnb = pytest.importorskip("bitsandbytes")
    lin = linear(128, 64, seed=12)
    layer = Linear4bit.from_linear(lin, double_quant=False)
    packed, state = bnb.functional.quantize_4bit(lin.weight.detach(), blocksize=64,
                                                 compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed.reshape(-1), layer.weight_packed)
    x = gaussian((6, 128), seed=13, dtype=torch.bfloat16).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = bnb.matmul_4bit(x_ref, packed.t(), quant_state=state, bias=lin.bias.to(torch.bfloat16))
    out = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    grad = gaussian((6, 64), seed=14, dtype=torch.bfloat16)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-2, rtol=1e-2)


def test_bad_input_and_arguments_say_what_was_expected():
    layer = Linear4bit(16, 8)
    with pytest.raises(ValueError, match=r"Linear4bit: expected input with last dimension 16 "
                                         r"\(in_features\), got shape \(4, 12\)"):
        layer(torch.zeros(4, 12))
    with pytest.raises(TypeError, match="Linear4bit: expected a floating-point input tensor, "
                                        "got torch.int32"):
        layer(torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="compute_dtype must be a floating-point torch.dtype, "
                                        "got torch.int8"):
        Linear4bit(16, 8, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="in_features must be an integer >= 1, got 0"):
        Linear4bit(0, 8)
    with pytest.raises(ValueError, match="blocksize must be a power of two >= 2, got 48"):
        Linear4bit(16, 8, blocksize=48)
    with pytest.raises(TypeError, match="from_linear: expected an nn.Linear, got Conv1d"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))


def test_from_linear_refuses_device_and_dtype_it_would_ignore():
    with pytest.raises(TypeError, match=r"\.to\(device\)"):
        Linear4bit.from_linear(nn.Linear(64, 8), device="cpu")


def test_a_custom_code_checkpoint_loads_as_custom():
    """A layer whose code table is none of CODES (e.g. a learned 4-bit code) decodes with it."""
    layer = Linear4bit(64, 16, compute_dtype=torch.float32)
    state_dict = layer.state_dict()
    state_dict["code"] = state_dict["code"] * 0.5
    layer.load_state_dict(state_dict)
    assert layer.quant_type == "custom" and "quant_type=custom" in repr(layer)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantize(), layer.bias))


def test_loading_another_formats_checkpoint_renames_quant_type():
    """The code table travels in the state_dict; quant_type follows it, outputs match."""
    linear = nn.Linear(64, 16)
    fp4 = Linear4bit.from_linear(linear, quant_type="fp4")
    layer = Linear4bit(64, 16)                       # nf4 by default
    layer.load_state_dict(fp4.state_dict())
    assert layer.quant_type == "fp4" and "quant_type=fp4" in repr(layer)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), fp4(x))
