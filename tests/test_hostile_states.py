"""Issue 22, hostile states: sizes that would reach C++ as undefined behaviour, shared tables,
overflowing sums, unchecked MX states, backends that disagree, optimizer loads. Each test names
its item; each failed on the code before the fix."""
import json
import math

import pytest
import torch
from torch import nn

from helpers import bits, gaussian
from minqlora import launch
from minqlora.backends import dequantize_4bit
from minqlora.bnb_layout import state_as_dict, state_from_dict
from minqlora.linear4bit import Linear4bit
from minqlora.microscaling import (dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4,
                                   quantize_nvfp4)
from minqlora.paged_adam import PagedAdamW
from minqlora.quant_state import decode_4bit, quantize_4bit
from minqlora.state_checks import check_state

BACKENDS = ["torch", "cpp", "emulate"]
KEY = "weight.quant_state.bitsandbytes__nf4"


def retagged(tensors: dict, **fields) -> dict:
    """tensors with the JSON of its quant state changed (fields set)."""
    info = json.loads(bytes(tensors[KEY].tolist()).decode())
    info.update(fields)
    return {**tensors, KEY: torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)}


def layer_tensors(double_quant=True, blocksize=64, shape=(64, 64)) -> dict:
    packed, state = quantize_4bit(gaussian(shape), blocksize, double_quant=double_quant)
    return state_as_dict(packed, state)


# item 1: every size that reaches C++ is bounded where the state is checked
@pytest.mark.parametrize("blocksize", [2 ** 63, 2 ** 64, 2 ** 65])
def test_item1_a_file_with_a_huge_blocksize_is_refused(blocksize):
    tensors = retagged(layer_tensors(False, 4096), blocksize=blocksize)   # one absmax still
    with pytest.raises(ValueError, match="at most 2\\^62"):
        state_from_dict(tensors)


@pytest.mark.parametrize("blocksize", [2 ** 63, 2 ** 64])
def test_item1_from_linear_refuses_a_huge_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two >= 2"):
        Linear4bit.from_linear(nn.Linear(64, 64), blocksize=blocksize)


@pytest.mark.parametrize("field", ["blocksize", "state2.blocksize"])
@pytest.mark.parametrize("size", [2 ** 63, 2 ** 64, 2 ** 65])
def test_item1_every_backend_refuses_a_huge_blocksize(field, size, decoder, emulation):
    packed, state = quantize_4bit(gaussian((64, 64)), 4096)
    target = state.state2 if field == "state2.blocksize" else state
    target.blocksize = size                       # still one absmax (and one absmax2)
    with pytest.raises(ValueError, match="power of two >= 2"):
        check_state(packed, state, "here")        # first, so nothing below reaches C++
    with pytest.raises(ValueError, match="power of two >= 2"):
        decode_4bit(packed, state)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="power of two >= 2"):
            dequantize_4bit(packed, state, backend=backend)


def test_item1_the_largest_blocksize_decodes_the_same_everywhere(decoder, emulation):
    """2^62 is allowed: one block, and C++'s arithmetic stays defined."""
    packed, state = quantize_4bit(gaussian(1000), 2 ** 62)
    want = decode_4bit(packed, state)
    for backend in BACKENDS:
        assert torch.equal(bits(dequantize_4bit(packed, state, backend=backend)), bits(want))


def test_item1_a_shape_whose_count_wraps_around_is_refused():
    """[2**32, 2**32] has 2^64 values; torch.Size.numel() says 0."""
    packed, state = quantize_4bit(torch.zeros(0))
    state.shape = torch.Size([2 ** 32, 2 ** 32])
    assert state.shape.numel() == 0               # the wrap-around this guards against
    with pytest.raises(ValueError, match="more than 2\\^62"):
        check_state(packed, state, "here")


def test_item1_meta_tensors_never_reach_a_kernel(decoder, emulation):
    from minqlora.cpu_decode import decode_cpp
    from minqlora.emulate import launch_emulation
    packed, state = quantize_4bit(gaussian(100))
    packed, state = packed.to("meta"), state.to("meta")
    for launch_ in (decode_cpp, launch_emulation):
        with pytest.raises(ValueError, match="meta"):
            launch_(packed, state, torch.empty(100, device="meta"))


def test_item1_a_grid_beyond_a_launch_is_refused():
    with pytest.raises(ValueError, match="grid"):
        launch.grid(2 ** 62, launch.kernel_source())


# item 4: one DYNAMIC table per state, never shared with another layer or state
def test_item4_editing_one_states_table_changes_no_layer():
    torch.manual_seed(0)
    a, b = Linear4bit.from_linear(nn.Linear(64, 64)), Linear4bit.from_linear(nn.Linear(64, 64))
    x = torch.randn(3, 64)
    before_a, before_b = a.dequantize(), b(x)
    a.quant_state().state2.code.mul_(0.5)
    _, loaded = state_from_dict(state_as_dict(a.weight_packed, a.quant_state()))
    loaded.state2.code.mul_(0.5)
    assert torch.equal(a.dequantize(), before_a) and torch.equal(b(x), before_b)
    packed, again = state_from_dict(state_as_dict(a.weight_packed, a.quant_state()))
    assert torch.equal(decode_4bit(packed, again), before_a)


def test_item4_a_wrong_nested_table_is_named_as_such():
    tensors = layer_tensors()
    tensors["weight.nested_quant_map"] = tensors["weight.nested_quant_map"] * 0.5
    with pytest.raises(ValueError, match="nested_quant_map: expected the dynamic 8-bit map"):
        state_from_dict(tensors)


# item 5: the nested absmaxes' sum must be finite, not only its parts
def test_item5_finite_parts_with_an_infinite_sum_are_refused():
    tensors = retagged(layer_tensors(), nested_offset=3e38)
    tensors["weight.nested_absmax"] = torch.full_like(tensors["weight.nested_absmax"], 3e38)
    with pytest.raises(ValueError, match="overflow float32"):
        state_from_dict(tensors)


# item 6: the MX formats check their state
def test_item6_mx_states_are_checked():
    x = gaussian((4, 64))
    packed, nv = quantize_nvfp4(x)
    with pytest.raises(ValueError, match="'nvfp4', not 'mxfp4'"):
        dequantize_mxfp4(packed, nv)
    packed, mx = quantize_mxfp4(x)
    for change, error in ((dict(scales=mx.scales.reshape(-1)[:1]), ValueError),
                          (dict(blocksize=0), ValueError), (dict(format="nvfp4"), ValueError),
                          (dict(scales=torch.full_like(mx.scales, 255)), ValueError),
                          (dict(dtype=torch.int64), ValueError)):
        bad = type(mx)(**{**mx.__dict__, **change})
        with pytest.raises(error):
            dequantize_mxfp4(packed, bad)
    with pytest.raises(TypeError, match="floating-point"):
        dequantize_mxfp4(packed, mx, dtype=torch.int64)
    with pytest.raises(TypeError, match="MXState"):
        dequantize_nvfp4(packed, "state")


@pytest.mark.parametrize("shape", [(0,), (0, 32), (3, 0)])
def test_item6_empty_inputs_round_trip(shape):
    for quantize, dequantize in ((quantize_mxfp4, dequantize_mxfp4),
                                 (quantize_nvfp4, dequantize_nvfp4)):
        packed, state = quantize(torch.zeros(shape), 16)
        assert dequantize(packed, state).shape == shape


# item 8: every backend decodes a state with a float64 offset the same way
def test_item8_a_float64_offset_decodes_the_same_everywhere(decoder, emulation):
    packed, state = quantize_4bit(gaussian(65536, seed=3) * 3)
    state.offset = state.offset.double().reshape(1) + 1e-3   # float32 would round it
    assert state.absmax_fp32().dtype == torch.float32
    want = decode_4bit(packed, state)
    for backend in BACKENDS:
        assert torch.equal(bits(dequantize_4bit(packed, state, backend=backend)), bits(want))


# item 9: a loaded optimizer state is checked as the constructor checks its arguments
def optimizer():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8))
    opt = PagedAdamW([w], lr=0.1)
    w.grad = torch.randn(8)
    opt.step()
    return w, opt


@pytest.mark.parametrize("group, state", [
    (dict(lr=math.nan), {}), (dict(eps=-1.0), {}), (dict(betas=(1.5, 0.999)), {}),
    (dict(weight_decay=math.inf), {}), ({}, dict(step=torch.tensor(math.nan))),
    ({}, dict(step=torch.tensor(-3.0))), ({}, dict(exp_avg_sq=-torch.ones(8))),
    ({}, dict(exp_avg=torch.full((8,), math.inf)))])
def test_item9_a_hostile_optimizer_state_is_refused_and_the_old_kept(group, state):
    w, opt = optimizer()
    before = opt.state_dict()
    sd = opt.state_dict()
    sd["param_groups"][0].update(group)
    sd["state"][0].update(state)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(after["state"][0][k], before["state"][0][k])


# item 11: a state whose dtype torch cannot decode into is refused when it is loaded
@pytest.mark.parametrize("dtype", ["float4_e2m1fn_x2", "float8_e8m0fnu", "int8", "complex64"])
def test_item11_undecodable_dtypes_are_refused_at_load(dtype):
    with pytest.raises(ValueError, match="dtype must name a float dtype"):
        state_from_dict(retagged(layer_tensors(), dtype=dtype))


@pytest.mark.parametrize("shape", [[2 ** 32, 2 ** 32], [0, 2 ** 64], [2 ** 63]])
def test_item11_shapes_beyond_2_62_are_refused_at_load(shape):
    with pytest.raises(ValueError, match="2\\^62"):
        state_from_dict(retagged(layer_tensors(False), shape=shape))


def test_item10_a_float8_quant_map_is_a_clear_error():
    tensors = layer_tensors()
    tensors["weight.quant_map"] = tensors["weight.quant_map"].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="quant_map: expected 2 to 16 float32"):
        state_from_dict(tensors)
    tensors = layer_tensors()
    tensors["weight.nested_quant_map"] = tensors["weight.nested_quant_map"].to(torch.float8_e5m2)
    with pytest.raises(ValueError, match="nested_quant_map"):
        state_from_dict(tensors)
