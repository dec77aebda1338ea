import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minqlora import absmax_dequantize, absmax_quantize


def test_worked_example_int8_and_int4():
    """absmax = 0.976. int8: 127/0.976 * [-0.976, 0.187, 0.886] = [-127, 24.33, 115.29] -> [-127, 24, 115].
    int4: 7/0.976 * x = [-7, 1.341, 6.354] -> [-7, 1, 6]."""
    x = torch.tensor([-0.976, 0.187, 0.886])
    q, absmax = absmax_quantize(x)
    assert q.tolist() == [-127, 24, 115] and q.dtype == torch.int8
    assert absmax.item() == pytest.approx(0.976)
    assert absmax_dequantize(q, absmax).tolist() == pytest.approx([-0.976, 24 * 0.976 / 127, 115 * 0.976 / 127])
    q4, _ = absmax_quantize(x, bits=4)
    assert q4.tolist() == [-7, 1, 6]


def test_clustered_pair_collides_at_low_bits():
    """0.10 and 0.12 with absmax 1: int8 keeps them apart (13 vs 15), int4 maps both to 1."""
    x = torch.tensor([1.0, 0.10, 0.12])
    assert absmax_quantize(x, bits=8)[0].tolist() == [127, 13, 15]
    assert absmax_quantize(x, bits=4)[0].tolist() == [7, 1, 1]


def test_all_zero_gives_zeros_not_nan():
    q, absmax = absmax_quantize(torch.zeros(5))
    assert absmax.item() == 0 and q.tolist() == [0] * 5
    assert absmax_dequantize(q, absmax).tolist() == [0.0] * 5


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(TypeError, match="int64"):
        absmax_quantize(torch.arange(4))
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(1 NaN"):
        absmax_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="bits"):
        absmax_quantize(torch.ones(3), bits=1)
    with pytest.raises(TypeError, match="absmax_dequantize: dtype must be a floating-point dtype"):
        absmax_dequantize(torch.ones(3, dtype=torch.int8), torch.tensor(1.0), dtype=torch.int8)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64), st.sampled_from([4, 8]))
def test_round_trip_error_is_at_most_half_a_step(values, bits):
    x = torch.tensor(values)
    q, absmax = absmax_quantize(x, bits)
    step = absmax.item() / (2 ** (bits - 1) - 1)
    err = (absmax_dequantize(q, absmax, bits) - x).abs().max().item()
    assert err <= step / 2 * (1 + 1e-5) + 1e-30


def test_tiny_absmax_does_not_overflow_the_scale():
    """levels / absmax would overflow float32 for absmax < 3.7e-37; x / absmax * levels does not:
    [1e-37, 5e-38, -2e-38] -> [127, 63.5 -> 64, -25.4 -> -25]."""
    q, _ = absmax_quantize(torch.tensor([1e-37, 5e-38, -2e-38, 0.0]))
    assert q.tolist() == [127, 64, -25, 0]
