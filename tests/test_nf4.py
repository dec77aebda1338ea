import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minqlora.nf4 import (CODES, FP4, INT4, NF4, NF4_OFFSET, get_code, nf4_code, nf4_offset,
                          pack_4bit, unpack_4bit)

# bitsandbytes' published NF4 table (functional.get_4bit_type("nf4")): minqlora must BUILD it.
NF4_REFERENCE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_is_built_bit_for_bit():
    assert NF4.dtype == torch.float32
    assert NF4.tolist() == NF4_REFERENCE
    assert torch.equal(nf4_code(), NF4)


def test_nf4_shape_of_the_construction():
    """8 positive values, 7 negative, an exact zero, ends at -1 and 1, asymmetric."""
    assert (NF4 > 0).sum() == 8 and (NF4 < 0).sum() == 7 and (NF4 == 0).sum() == 1
    assert NF4[0] == -1 and NF4[-1] == 1 and NF4[1] != -NF4[-2]


def test_offset_is_the_mean_of_the_two_half_bin_choices():
    """NF4_OFFSET is bitsandbytes' 0.9677083; nf4_offset(), the account, is
    (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 929/960, NF4_OFFSET to its 7 digits. nf4_code() builds
    NF4 from the 7-digit constant; 929/960 itself gives another table (bitsandbytes rounded)."""
    assert nf4_offset() == pytest.approx(929 / 960, abs=1e-15)
    assert round(nf4_offset(), 7) == NF4_OFFSET == 0.9677083
    assert torch.equal(nf4_code(NF4_OFFSET), NF4)
    assert not torch.equal(nf4_code(nf4_offset()), NF4)


def test_the_offset_sets_the_largest_quantile():
    """The largest positive quantile is norm.ppf(offset) before scaling to 1, so the second
    largest code is norm.ppf(p_2) / norm.ppf(offset): bitsandbytes' 0.7229568 at the default."""
    from scipy.stats import norm
    p = torch.linspace(NF4_OFFSET, 0.5, 9)[:2].double()
    assert NF4[14].item() == pytest.approx(norm.ppf(p[1]) / norm.ppf(p[0]), rel=1e-6)
    other = nf4_code(0.99)
    assert other[0] == -1 and other[-1] == 1 and not torch.equal(other, NF4)
    q = torch.linspace(0.99, 0.5, 9)[:2].double()
    assert other[14].item() == pytest.approx(norm.ppf(q[1]) / norm.ppf(q[0]), rel=1e-6)


def test_fp4_and_int4_tables():
    """FP4: sign bit + [0, 0.0625, 8, 12, 4, 6, 2, 3]/12 in bit order. INT4: -7..7 over 7."""
    assert FP4[:8].tolist() == pytest.approx([0, 0.0625 / 12, 2 / 3, 1, 1 / 3, 0.5, 1 / 6, 0.25])
    assert torch.equal(FP4[8:], -FP4[:8])
    assert FP4.numel() == 16
    assert INT4.numel() == 15 and INT4[7] == 0 and INT4[0] == -1 and INT4[-1] == 1


def test_codes_is_the_one_registry_of_named_tables():
    assert sorted(CODES) == ["fp4", "int4", "nf4"]
    assert get_code("nf4") is NF4 and get_code("fp4") is FP4 and get_code("int4") is INT4
    with pytest.raises(ValueError, match=r"unknown quant_type 'nf5'; choose one of"):
        get_code("nf5")


def test_tables_match_bitsandbytes(bnb_functional):
    assert torch.equal(NF4, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4, bnb_functional.get_4bit_type("fp4", device="cpu"))


def test_pack_golden_high_nibble_first():
    """[1, 2, 15] -> 0x12, then 15 in the high nibble with a zero pad: 0xF0."""
    assert pack_4bit(torch.tensor([1, 2, 15])).tolist() == [0x12, 0xF0]
    assert unpack_4bit(torch.tensor([0x12, 0xF0], dtype=torch.uint8), 3).tolist() == [1, 2, 15]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=101))
def test_pack_unpack_round_trip(indices):
    packed = pack_4bit(torch.tensor(indices, dtype=torch.uint8))
    assert packed.dtype == torch.uint8 and packed.numel() == (len(indices) + 1) // 2
    assert unpack_4bit(packed, len(indices)).tolist() == indices


def test_pack_and_unpack_refuse_bad_input():
    with pytest.raises(ValueError, match=r"0..15, got range \[1, 256\]"):
        pack_4bit(torch.tensor([256, 1]))               # would wrap to [0, 1] as uint8
    with pytest.raises(ValueError, match=r"got range \[-1, 3\]"):
        pack_4bit(torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="integer tensor, got torch.float32"):
        pack_4bit(torch.tensor([1.7, 2.2]))
    with pytest.raises(TypeError, match="uint8"):
        unpack_4bit(torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="at most 4"):
        unpack_4bit(torch.zeros(2, dtype=torch.uint8), 5)


@pytest.mark.parametrize("offset", [1.0, 0.5, 0.3, 1.2, float("nan"), "0.9", True])
def test_nf4_code_refuses_offsets_that_make_nan(offset):
    """Issue 10, item 13: nf4_code(1.0) and nf4_code(0.5) returned tables of NaN (norm.ppf(1) is
    infinite; at 0.5 every quantile is 0 and the table is 0 / 0)."""
    with pytest.raises(ValueError, match="offset must be a probability strictly between 0.5 "
                                         "and 1"):
        nf4_code(offset)
    assert torch.isfinite(nf4_code(0.99)).all() and torch.isfinite(nf4_code(0.51)).all()
