import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minqlora import blockwise
from minqlora.blockwise import (TINY, ceil_div, dequantize_blockwise, nearest_code,
                                quantize_blockwise, scale_blocks)
from minqlora.double_quant import DYNAMIC
from minqlora.nf4 import CODES, INT4, NF4

TERNARY = torch.tensor([-1.0, 0.0, 1.0])  # midpoints -0.5 and 0.5


def test_golden_vector():
    """blocksize 2: [0.2, -0.8] has absmax 0.8 -> s = [0.25, -1] -> q = [1, 0];
    [3, 1.5] has absmax 3 -> s = [1, 0.5] -> 0.5 sits on a midpoint -> lower index 1."""
    q, absmax = quantize_blockwise(torch.tensor([0.2, -0.8, 3.0, 1.5]), TERNARY, blocksize=2)
    assert q.tolist() == [1, 0, 2, 1] and q.dtype == torch.uint8
    assert absmax.tolist() == pytest.approx([0.8, 3.0]) and absmax.dtype == torch.float32
    x_hat = dequantize_blockwise(q, absmax, TERNARY, 2)          # blocksize 4th, as lesson 02
    assert x_hat.tolist() == pytest.approx([0.0, -0.8, 3.0, 0.0])


def test_tie_goes_to_lower_index_just_above_goes_up():
    x = torch.tensor([1.0, 0.5, -0.5, 0.5000001])
    q, _ = quantize_blockwise(x, TERNARY, blocksize=4)
    assert q.tolist() == [2, 1, 0, 2]


def test_ceil_div():
    assert [ceil_div(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_partial_last_block_gets_its_own_absmax_and_zero_block_decodes_to_zero():
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 0.5])   # blocks [0 0 0 0] [2 -1 0.5]
    q, absmax = quantize_blockwise(x, INT4, blocksize=4)
    assert absmax.tolist() == [0.0, 2.0] and q[:4].tolist() == [7] * 4   # INT4[7] = 0
    x_hat = dequantize_blockwise(q, absmax, INT4, blocksize=4)
    assert torch.isfinite(x_hat).all() and x_hat[:4].tolist() == [0.0] * 4
    assert x_hat[4:].tolist() == pytest.approx([2.0, -1 / 7 * 2 * 4, 2 / 7 * 2], abs=1e-6)


def test_tiny_absmax_is_scaled_by_1_over_tiny_as_bitsandbytes_does():
    """A block whose absmax is below TINY (a float32 subnormal) is scaled by 1 / TINY, not by its
    own reciprocal (which may overflow): 5e-39 * 1e38 = 0.5 -> the code 0 (-1 and 1 are 1 away)
    and -2.5e-39 -> -0.25 -> 0; decoded within the absmax, never NaN."""
    x = torch.tensor([5e-39, -2.5e-39, 1e-39, 0.0])
    q, absmax = quantize_blockwise(x, TERNARY, blocksize=4)
    assert TINY == 1e-38 and absmax.item() == x[0].item()
    assert q.tolist() == [1, 1, 1, 1]
    x_hat = dequantize_blockwise(q, absmax, TERNARY, 4)
    assert torch.isfinite(x_hat).all() and (x_hat - x).abs().max() <= absmax


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5), (2, 3, 4, 5)])
def test_any_rank_and_empty_round_trip_in_shape(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q, absmax = quantize_blockwise(x, NF4, blocksize=4)
    assert q.shape == x.shape and absmax.numel() == ceil_div(x.numel(), 4)
    x_hat = dequantize_blockwise(q, absmax, NF4, blocksize=4, dtype=torch.bfloat16)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.bfloat16
    assert torch.equal(x_hat, dequantize_blockwise(q, absmax, NF4, blocksize=4).to(torch.bfloat16))


def test_non_contiguous_input_matches_its_contiguous_copy():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)).t()
    assert not x.is_contiguous()
    q1, a1 = quantize_blockwise(x, NF4, 16)
    q2, a2 = quantize_blockwise(x.contiguous(), NF4, 16)
    assert torch.equal(q1, q2) and torch.equal(a1, a2)


def test_bad_input_is_refused_with_a_reason():
    x = torch.ones(8)
    with pytest.raises(ValueError, match="power of two >= 2, got 48"):
        quantize_blockwise(x, NF4, blocksize=48)
    with pytest.raises(ValueError, match="strictly increasing"):
        quantize_blockwise(x, NF4.flip(0))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        quantize_blockwise(x, NF4 * 2)
    with pytest.raises(TypeError, match="torch.bool"):
        quantize_blockwise(torch.ones(8, dtype=torch.bool), NF4)
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\) \(0 NaN, 2 Inf\)"):
        quantize_blockwise(torch.tensor([1.0, float("inf"), -float("inf")]), NF4)
    with pytest.raises(ValueError, match="expected 2 absmax"):
        dequantize_blockwise(torch.zeros(8, dtype=torch.uint8), torch.ones(3), NF4, blocksize=4)
    with pytest.raises(ValueError, match="dequantize_blockwise: blocksize must be a power of two"):
        dequantize_blockwise(torch.zeros(8, dtype=torch.uint8), torch.ones(3), NF4, 3)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int64"):
        dequantize_blockwise(torch.zeros(8, dtype=torch.uint8), torch.ones(2), NF4, 4, torch.long)


def half_widest_gap(code):
    return ((code[1:] - code[:-1]).max() / 2).item()


@settings(max_examples=60, deadline=None)
@given(arrays("float32", st.integers(1, 300), elements=st.floats(-1e3, 1e3, width=32)),
       st.sampled_from([2, 8, 64]), st.sampled_from(["nf4", "int4", "dynamic"]))
def test_round_trip_within_half_the_widest_gap_times_absmax(values, blocksize, name):
    code = {"nf4": NF4, "int4": INT4, "dynamic": DYNAMIC}[name]
    x = torch.from_numpy(values)
    q, absmax = quantize_blockwise(x, code, blocksize)
    err = (dequantize_blockwise(q, absmax, code, blocksize=blocksize) - x).abs()
    bound = half_widest_gap(code) * absmax.repeat_interleave(blocksize)[: x.numel()]
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()


def test_dequantize_matches_bitsandbytes_on_our_bytes(bnb_functional):
    """bitsandbytes' dequantize_blockwise reads our indices and absmax the same way."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    code = DYNAMIC
    q, absmax = quantize_blockwise(x, code, blocksize=256)
    state = bnb_functional.QuantState(absmax=absmax, code=code, blocksize=256, dtype=torch.float32)
    ref = bnb_functional.dequantize_blockwise(q, state)
    assert torch.equal(dequantize_blockwise(q, absmax, code, blocksize=256), ref)


def test_dequantize_refuses_an_index_outside_the_code():
    with pytest.raises(ValueError, match="index 20 is outside the 15-entry code"):
        dequantize_blockwise(torch.tensor([20], dtype=torch.uint8), torch.ones(1), INT4, blocksize=2)


def test_indices_must_be_integers_inside_the_code():
    """Issue 10, item 13: index -1 read the last code and float indices were truncated."""
    absmax = torch.tensor([2.0])
    with pytest.raises(ValueError, match=r"index -1 is outside the 3-entry code \(valid: 0..2\)"):
        dequantize_blockwise(torch.tensor([0, -1]), absmax, TERNARY, 2)
    with pytest.raises(TypeError, match="indices must be an integer tensor, got torch.float32"):
        dequantize_blockwise(torch.tensor([0.0, 1.7]), absmax, TERNARY, 2)
    with pytest.raises(TypeError, match="indices must be an integer tensor, got list"):
        dequantize_blockwise([0, 1], absmax, TERNARY, 2)
    with pytest.raises(TypeError, match="code must be a 1-D floating-point tensor"):
        dequantize_blockwise(torch.tensor([0, 1]), absmax, [-1.0, 0.0, 1.0], 2)
    with pytest.raises(ValueError, match="expected 1 absmax values .* got float"):
        dequantize_blockwise(torch.tensor([0, 1]), 2.0, TERNARY, 2)
    q = torch.tensor([0, 2], dtype=torch.int64)                        # any integer dtype works
    assert dequantize_blockwise(q, absmax, TERNARY, 2).tolist() == [-2.0, 2.0]


def _midpoints(code):
    return (code[:-1] + code[1:]) / 2


SORTED_4BIT = {name: c.sort().values for name, c in CODES.items()}   # FP4's has -0.0 and 0.0


@pytest.mark.parametrize("name", sorted(SORTED_4BIT))
def test_nearest_code_on_the_grid_counts_as_bucketize_on_every_edge(name):
    """The grid (4-bit codes) against torch.bucketize: on each midpoint, one float either side,
    the codes, +-0, +-1, beyond [-1, 1], +-inf and NaN (bucketize puts NaN above every midpoint)."""
    code = SORTED_4BIT[name]
    mid = _midpoints(code)
    assert blockwise._grid(tuple(mid.tolist()), mid.device) is not None      # the grid is used
    inf = torch.tensor(float("inf"))
    s = torch.cat([mid, torch.nextafter(mid, inf), torch.nextafter(mid, -inf), code,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1e-45, -1e-45, 3e38, -3e38,
                                 float("inf"), float("-inf"), float("nan")])])
    got = nearest_code(s, code)
    assert got.dtype == torch.uint8 and torch.equal(got.long(), torch.bucketize(s, mid))


@settings(max_examples=60, deadline=None)
@given(arrays("float32", st.integers(2, 16), elements=st.floats(-1, 1, width=32)),
       arrays("float32", st.integers(0, 300), elements=st.floats(width=32, allow_nan=True)))
def test_nearest_code_equals_bucketize_for_any_code_and_any_value(code, values):
    """Any sorted code of 2..16 entries (repeats and near-repeats too: then the grid cannot
    separate them and bucketize runs), any float32 value."""
    code = torch.from_numpy(code).sort().values
    s = torch.from_numpy(values)
    assert torch.equal(nearest_code(s, code).long(), torch.bucketize(s, _midpoints(code)))


def test_dynamic_code_is_too_fine_for_the_grid_and_uses_bucketize():
    mid = _midpoints(DYNAMIC)
    assert blockwise._grid(tuple(mid.tolist()), mid.device) is None
    s = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.linspace(-1, 1, 999)])
    assert torch.equal(nearest_code(s, DYNAMIC).long(), torch.bucketize(s, mid))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_scale_blocks_equals_scaling_in_float32(dtype):
    """16-bit input is scaled without a float32 copy first: same absmax, same s, bit for bit."""
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 5).to(dtype)
    x[64:128] = 0.0
    x[128:192] = torch.tensor(1e-40).to(dtype)          # subnormal in float32 / rounds in fp16
    scaled, absmax = scale_blocks(x, 64)
    blocks = blockwise.blocks_of(x.float(), 64)          # the recipe written out in float32
    want_absmax = blocks.abs().amax(dim=1)
    want = (blocks * (1.0 / want_absmax.clamp(min=TINY))[:, None]).clamp(-1, 1)
    assert scaled.dtype == absmax.dtype == torch.float32
    assert torch.equal(absmax.view(torch.int32), want_absmax.view(torch.int32))
    assert torch.equal(scaled.view(torch.int32), want.view(torch.int32))


def speed_path(x, code, blocksize):
    """quantize_4bit's route to the indices (quant_state.py): scale_blocks, then nearest_code."""
    scaled, absmax = scale_blocks(x, blocksize)
    return nearest_code(scaled, code).reshape(-1)[: x.numel()].reshape(x.shape), absmax


@settings(max_examples=80, deadline=None)
@given(arrays("float32", st.integers(0, 300), elements=st.floats(width=32, allow_nan=False,
                                                                  allow_infinity=False)),
       st.sampled_from([2, 4, 64, 256, 2 ** 20]),
       st.sampled_from(["nf4", "int4", "dynamic", "ternary"]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_speed_helpers_give_the_definitions_bits(values, blocksize, name, dtype):
    """The definition (quantize_blockwise, lesson 02's code) and the speed helpers that
    quantize_4bit runs (scale_blocks + nearest_code's grid) agree bit for bit: any float32
    value in range, every input dtype quantize_4bit takes, a lone short block, partial last
    blocks, zeros and subnormals (hypothesis draws them), 4-bit codes (grid) and DYNAMIC
    (bucketize). (FP4, sorted, holds -0.0 and 0.0: not strictly increasing, so quantize_blockwise
    refuses it; nearest_code's test above covers it against bucketize.)"""
    code = {"dynamic": DYNAMIC, "ternary": TERNARY, "nf4": NF4, "int4": INT4}[name]
    x = torch.from_numpy(values).to(dtype)
    x = torch.where(x.isfinite(), x, torch.zeros_like(x))               # fp16 overflows to inf
    q, absmax = quantize_blockwise(x, code, blocksize)
    q_fast, absmax_fast = speed_path(x, code, blocksize)
    assert torch.equal(q, q_fast) and q.dtype == q_fast.dtype == torch.uint8
    assert torch.equal(absmax.view(torch.int32), absmax_fast.view(torch.int32))


def test_speed_helpers_on_ties_and_blocks_that_are_all_zero_or_subnormal():
    """Every midpoint of NF4 and INT4 hit exactly (absmax 1), one float either side, a zero block
    and a subnormal block: the grid's branch-free lookup agrees with the definition's search."""
    for code in (NF4, INT4, DYNAMIC):
        mid = (code[:-1] + code[1:]) / 2
        inf = torch.tensor(float("inf"))
        x = torch.cat([torch.ones(1), mid, torch.nextafter(mid, inf), torch.nextafter(mid, -inf),
                       torch.zeros(64), torch.full((64,), 1e-40), torch.tensor([-3e-39])])
        for blocksize in (64, 4096):
            q, absmax = quantize_blockwise(x, code, blocksize)
            q_fast, absmax_fast = speed_path(x, code, blocksize)
            assert torch.equal(q, q_fast) and torch.equal(absmax, absmax_fast)
