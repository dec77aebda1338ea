import io
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minqlora.linear4bit as linear4bit_module
from minqlora.backends import dequantize_4bit
from minqlora.linear4bit import Linear4bit, Linear4bitFunction
from minqlora.nf4 import FP4, NF4
from minqlora.quant_state import quantize_4bit

from helpers import BnbReference, bits, gaussian


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
    """quant_state(): the layer's format, the buffers themselves (no copies), state2 as
    quantize_4bit builds it; plain layers have no offset or state2."""
    layer = Linear4bit.from_linear(linear(96, 40), blocksize=32, quant_type="fp4")
    state = layer.quant_state()
    assert (state.shape, state.blocksize, state.quant_type, state.dtype) == (
        torch.Size([40, 96]), 32, "fp4", torch.float32)
    assert layer.backend == "auto"                           # the dequantize backend it uses
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
        return Linear4bitFunction.apply(x, b, layer.weight_packed, layer.quant_state(), "auto")
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
    """Autograd saves the packed bytes only (the state rides on ctx, as in lesson 07): never an
    (out, in) float matrix, nor a copy of the constants."""
    layer = Linear4bit.from_linear(linear(256, 128, bias=False))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.nbytes))
        return t

    x = gaussian((8, 256)).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert not any(dtype.is_floating_point and shape == (128, 256) for shape, dtype, _ in saved)
    assert saved == [((128 * 256 // 2,), torch.uint8, 128 * 256 // 2)], saved
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


@pytest.mark.parametrize("backend", ["torch", "emulate", "cpp"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_backward_read_no_value_back_to_the_host(backend, double_quant, request):
    """Validation happens at construction (and load); a call only checks sizes and dtypes."""
    if backend in ("emulate", "cpp"):
        request.getfixturevalue({"emulate": "emulation", "cpp": "decoder"}[backend])
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
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]   # conftest.py: fresh and private per run,
    assert os.path.basename(cache).startswith("inductor-")    # so no code from another kernel
    assert os.stat(cache).st_mode & 0o777 == 0o700            # path (ATEN_CPU_CAPABILITY) is reused
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


def test_state_dict_keys_are_bitsandbytes_and_depend_on_double_quant():
    """bitsandbytes' Linear4bit keys, in its order; a nested state loads into a plain layer
    (and back): the layer takes the checkpoint's format."""
    plain = Linear4bit(64, 8, double_quant=False)
    assert [(k, tuple(v.shape), v.dtype) for k, v in plain.state_dict().items()] == [
        ("weight", (256, 1), torch.uint8), ("bias", (8,), torch.float32),
        ("weight.absmax", (8,), torch.float32), ("weight.quant_map", (16,), torch.float32),
        ("weight.quant_state.bitsandbytes__nf4", (76,), torch.uint8)]
    assert bytes(plain.state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist()) == (
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 64]}')
    nested = Linear4bit(64, 8)
    assert list(nested.state_dict()) == [
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
    assert nested.state_dict()["weight.absmax"].dtype == torch.uint8
    x = gaussian((3, 64))
    plain.load_state_dict(nested.state_dict())
    assert plain.double_quant and [n for n, _ in plain.named_buffers()] == [
        "weight_packed", "qabsmax", "code", "absmax2", "offset"]
    assert torch.equal(plain(x), nested(x))
    nested.load_state_dict(Linear4bit(64, 8, double_quant=False, blocksize=32).state_dict())
    assert not nested.double_quant and nested.blocksize == 32 and nested.absmax.numel() == 16


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
    dtypes = {k: v.dtype for k, v in layer.named_buffers()}
    layer.to("meta")                 # (state_dict() would need the offset's value for its JSON)
    assert all(v.device.type == "meta" for _, v in layer.named_buffers())
    assert {k: v.dtype for k, v in layer.named_buffers()} == dtypes


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


def test_int4_and_custom_codes_are_stored_faithfully_and_bitsandbytes_refuses_them():
    """A table bitsandbytes lacks is stored as it is (quant_map holds it, the JSON names it
    int4 or custom); minqlora loads it back bit for bit, bitsandbytes refuses it."""
    code = torch.linspace(-1, 1, 16) ** 3                          # some learned 4-bit code
    lin = linear(64, 16, seed=15)
    custom = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    custom._set_state(*quantize_4bit(lin.weight.detach(), code=code))
    for layer in (custom, Linear4bit.from_linear(lin, quant_type="int4", double_quant=False)):
        state_dict = layer.state_dict()
        key = f"weight.quant_state.bitsandbytes__{layer.quant_type}"
        assert key in state_dict and torch.equal(state_dict["weight.quant_map"], layer.code)
        other = Linear4bit(64, 16, compute_dtype=torch.float32)
        other.load_state_dict(state_dict)
        assert other.quant_type == layer.quant_type and "quant_type=" + layer.quant_type in repr(other)
        assert torch.equal(other.dequantize(), layer.dequantize())
        bnb = pytest.importorskip("bitsandbytes")
        with pytest.raises(ValueError, match="exactly one `quant_state` item"):
            bnb.nn.Params4bit.from_prequantized(
                state_dict["weight"], {k[7:]: v for k, v in state_dict.items()
                                       if k.startswith("weight.")}, device="cpu")


def test_loading_another_formats_checkpoint_renames_quant_type():
    """The code table travels in the state_dict; quant_type follows it, outputs match."""
    linear = nn.Linear(64, 16)
    fp4 = Linear4bit.from_linear(linear, quant_type="fp4")
    layer = Linear4bit(64, 16)                       # nf4 by default
    layer.load_state_dict(fp4.state_dict())
    assert layer.quant_type == "fp4" and "quant_type=fp4" in repr(layer)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), fp4(x))


# bitsandbytes' layout, both ways, against bitsandbytes itself --------------------------------
LAYOUT_CASES = [(qt, dq, shape, dtype) for qt in ("nf4", "fp4") for dq in (True, False)
                for shape in ((100, 30), (64, 64), (7, 5), (300, 17)) for dtype in
                (torch.float32, torch.float16, torch.bfloat16)]  # (in, out); 35, 1500: partial


def assert_same_weight(ours, theirs, quant_type):
    """Same dtype and bits; FP4's code 0b1000 aside: minqlora's FP4 table holds -0.0 there (the
    sign bit set), bitsandbytes' table +0.0, so the sign of those zeros differs."""
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    nonzero = ours != 0
    assert bits(ours[nonzero]).equal(bits(theirs[nonzero]))
    if quant_type == "nf4":
        assert bits(ours).equal(bits(theirs))


def bnb_layer(bnb, lin, quant_type, double_quant, blocksize=64):
    """bitsandbytes' own Linear4bit over lin's weight, quantized by bitsandbytes on the CPU
    (its weight kept in lin's dtype: a Linear4bit(...) of its own would be float32)."""
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False,
                                     blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=quant_type, module=layer)
    layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")                                       # bitsandbytes quantizes here


@pytest.mark.parametrize("quant_type, double_quant, shape, dtype", LAYOUT_CASES)
def test_bitsandbytes_layer_loads_and_computes_the_same(quant_type, double_quant, shape, dtype):
    """bitsandbytes' Linear4bit.state_dict() -> mq.Linear4bit: the same weight bit for bit, in
    the dtype the JSON records; the same forward (exactly here; within bf16's rounding where
    bitsandbytes takes its own AVX512-BF16 kernel); and minqlora's own quantization writes the
    same keys, shapes, dtypes and tensors (qabsmax may differ by one dynamic-code step: see
    double_quant.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    lin = linear(*shape, seed=16).to(dtype)
    reference = bnb_layer(bnb, lin, quant_type, double_quant)
    state_dict = reference.state_dict()
    layer = Linear4bit(*shape)                                  # float32, nf4, nested
    layer.load_state_dict(state_dict)
    ref = BnbReference(bnb)        # bitsandbytes' decode where it is right on this CPU (helpers)
    weight = ref.dequantize(reference.weight.data, reference.weight.quant_state)
    assert weight.dtype == dtype
    assert_same_weight(layer.dequantize(), weight, quant_type)
    assert (layer.quant_type, layer.double_quant, layer.weight_dtype) == (quant_type,
                                                                         double_quant, dtype)
    x = gaussian((4, shape[0]), seed=17, dtype=dtype)
    with torch.no_grad():
        out, expected = layer(x), reference(x)
    if ref.fault is None:                                       # its forward decodes as above
        if not reference.support_avx512bf16_for_cpu:            # both: F.linear on bf16 W
            assert torch.equal(out, expected)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    ours = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant)
    ours = ours.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in ours.items()] == [
        (k, v.shape, v.dtype) for k, v in state_dict.items()]
    for key in ours:           # torch.equal: FP4's quant_map differs in the sign of 0 (above)
        if key == "weight.absmax" and double_quant:      # absmax2 = 0: any code decodes alike
            groups = state_dict["weight.nested_absmax"].repeat_interleave(256)[:ours[key].numel()]
            steps = (ours[key].int() - state_dict[key].int()).abs()
            assert ((steps <= 1) | (groups == 0)).all()
        else:
            assert torch.equal(ours[key], state_dict[key]), key
    ref.done()


@pytest.mark.parametrize("quant_type, double_quant, shape, dtype", LAYOUT_CASES)
def test_what_minqlora_writes_bitsandbytes_loads(quant_type, double_quant, shape, dtype):
    """mq.Linear4bit.state_dict() -> bitsandbytes.nn.Params4bit.from_prequantized (what
    Transformers calls) -> bitsandbytes' dequantize_4bit gives minqlora's weight bit for bit."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = Linear4bit.from_linear(linear(*shape, seed=18).to(dtype), quant_type=quant_type,
                                   double_quant=double_quant)
    state_dict = layer.state_dict()
    param = bnb.nn.Params4bit.from_prequantized(
        state_dict["weight"], {k: v for k, v in state_dict.items() if k.startswith("weight.")},
        device="cpu")
    assert (param.quant_type, param.blocksize, param.compress_statistics) == (
        quant_type, 64, double_quant)
    ref = BnbReference(bnb)
    assert_same_weight(layer.dequantize(), ref.dequantize(param.data, param.quant_state), quant_type)
    ref.done()


def test_blocksizes_round_trip_through_bitsandbytes():
    """Rows of 96 weights: blocks of 32 fit them, blocks of 128 and more straddle rows."""
    bnb = pytest.importorskip("bitsandbytes")
    ref = BnbReference(bnb)
    for blocksize in (32, 128, 256, 4096):
        lin = linear(96, 50, seed=19)
        reference = bnb_layer(bnb, lin, "nf4", True, blocksize)
        layer = Linear4bit(96, 50)
        layer.load_state_dict(reference.state_dict())
        assert layer.blocksize == blocksize
        weight = ref.dequantize(reference.weight.data, reference.weight.quant_state)
        assert_same_weight(layer.dequantize(), weight, "nf4")
    ref.done()


def test_the_recorded_dtype_travels_with_the_state():
    """A float32-built layer that loads a float16 layer's state decodes and merges to float16."""
    from minqlora.lora import to_linear
    half = Linear4bit.from_linear(linear(64, 32, seed=20).half())
    layer = Linear4bit(64, 32)
    assert layer.weight_dtype == torch.float32
    layer.load_state_dict(half.state_dict())
    assert layer.weight_dtype == torch.float16 and layer.dequantize().dtype == torch.float16
    assert torch.equal(layer.dequantize(), half.dequantize())
    assert to_linear(layer).weight.dtype == torch.float16


def assert_unchanged(layer, before):
    after = layer.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype
               for k in before)


def test_another_shape_is_refused_and_the_layer_is_unchanged():
    """nn.Linear refuses a 64->32 state in a 32->64 layer; so does Linear4bit, although the
    byte count (64 * 32 / 2) matches."""
    layer = Linear4bit(32, 64)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: the checkpoint's weight "
                                           r"has shape \[32, 64\], this layer's is \[64, 32\]"):
        layer.load_state_dict(Linear4bit(64, 32).state_dict())
    assert_unchanged(layer, before)
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        layer.load_state_dict({**Linear4bit(32, 64).state_dict(), "bias": torch.zeros(3)})
    assert_unchanged(layer, before)


def malformed(state_dict):
    """(what is changed, the error it must give) for one good nested NF4 state_dict."""
    s = dict(state_dict)
    key = "weight.quant_state.bitsandbytes__nf4"
    info = json.loads(bytes(s[key].tolist()))

    def with_json(**changes):
        blob = json.dumps({**info, **changes}).encode()
        return {**s, key: torch.tensor(list(blob), dtype=torch.uint8)}

    def without(name):
        return {k: v for k, v in s.items() if k != name}
    yield without("weight.absmax"), "missing key 'weight.absmax'"
    yield without("weight.nested_quant_map"), "missing key 'weight.nested_quant_map'"
    yield without(key), r"expected one key weight.quant_state.bitsandbytes__<quant_type>"
    yield {**s, "weight.absmax": s["weight.absmax"][:-1]}, r"weight.absmax: expected 16 torch.uint8 values \(one per block of 64 of the 1024"
    yield {**s, "weight": s["weight"][:-1]}, r"weight: expected 512 bytes for shape \[16, 64\], got 511"
    yield {**s, "weight.nested_absmax": torch.ones(2)}, "weight.nested_absmax: expected one"
    yield with_json(shape=[32, 32]), r"size mismatch for weight: .* \[32, 32\]"
    yield with_json(shape=[16, 128]), r"weight.absmax: expected 32 torch.uint8 values"
    yield with_json(blocksize=48), "blocksize must be a power of two"
    yield with_json(dtype="int8"), "dtype must name a float dtype, got 'int8'"
    yield with_json(quant_type="fp4"), "the JSON says quant_type 'fp4'"
    yield with_json(nested_blocksize=128), "expected bitsandbytes' nested state"
    yield with_json(extra=1), "expected JSON fields"
    yield {**s, key: torch.tensor(list(b"{not json"), dtype=torch.uint8)}, "bytes of a JSON dict"
    yield {**s, "weight.quant_map": FP4.clone()}, "weight.quant_map is not the nf4 table"
    yield {**s, "weight.offset": torch.ones(())}, r"unexpected key\(s\) \['weight.offset'\]"
    yield {**s, "weight_packed": torch.ones(())}, None          # not ours at all: torch's list
    renamed = {k.replace("__nf4", "__af4"): v for k, v in with_json(quant_type="af4").items()}
    yield renamed, "unknown quant_type 'af4'"
    yield {**s, "weight.absmax": s["weight.absmax"].float()}, "weight.absmax: expected 16 torch.uint8 values"
    plain = {k: v for k, v in s.items() if "nested" not in k}
    yield plain, "missing key 'weight.nested_absmax'"


def test_a_malformed_state_names_the_key_and_loads_nothing():
    good = Linear4bit(64, 16).state_dict()
    layer = Linear4bit(64, 16, quant_type="fp4", double_quant=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for state_dict, message in malformed(good):
        with pytest.raises(RuntimeError, match=message or "Unexpected key.*weight_packed"):
            layer.load_state_dict(state_dict)
        assert_unchanged(layer, before)
        assert (layer.quant_type, layer.double_quant) == ("fp4", False)
    layer.load_state_dict(good)                                 # and the good one loads
    assert layer.quant_type == "nf4" and layer.double_quant


def test_strict_false_loads_what_is_there_as_nn_linear_does():
    layer = Linear4bit(64, 16)
    source = Linear4bit(64, 16)
    result = layer.load_state_dict({k: v for k, v in source.state_dict().items() if k != "bias"},
                                   strict=False)
    assert result.missing_keys == ["bias"] and torch.equal(layer.weight_packed,
                                                           source.weight_packed)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight\""):
        layer.load_state_dict({"bias": torch.zeros(16)})


def test_load_checks_once_and_forward_checks_nothing_more(monkeypatch):
    """Validation runs at load time; forward goes straight to the dequantizer."""
    import minqlora.bnb_layout as layout
    import minqlora.bnb_state_dict as bnb_state_dict
    calls = []
    real = layout.state_from_dict
    monkeypatch.setattr(bnb_state_dict, "state_from_dict",
                        lambda *a: calls.append(1) or real(*a))
    layer = Linear4bit(64, 16)
    layer.load_state_dict(Linear4bit(64, 16).state_dict())
    for _ in range(3):
        layer(gaussian((2, 64)))
    assert calls == [1]


def test_quant_storage_other_than_uint8_is_read_as_bytes():
    """Transformers' bnb_4bit_quant_storage=torch.bfloat16 stores the same bytes as bf16."""
    source = Linear4bit(64, 16)
    state_dict = source.state_dict()
    state_dict["weight"] = state_dict["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    layer = Linear4bit(64, 16)
    layer.load_state_dict(state_dict)
    assert torch.equal(layer.weight_packed, source.weight_packed)
