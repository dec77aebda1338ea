"""double_quant.py: the dynamic 8-bit map and the double quantization of the absmaxes."""
import pytest
import torch
from helpers import gaussian

from minqlora.blockwise import ceil_div, dequantize_blockwise
from minqlora.double_quant import (BLOCKSIZE2, DYNAMIC, constants_nbytes, double_dequantize,
                                   double_quantize, dynamic_code)


def test_dynamic_code_shape():
    """127 positive + 127 negative values + 0 + 1; finest step near zero is 10^-6 scale."""
    assert torch.equal(dynamic_code(), DYNAMIC)
    assert DYNAMIC.numel() == 256 and (DYNAMIC[1:] > DYNAMIC[:-1]).all()
    assert DYNAMIC[-1] == 1 and DYNAMIC[127] == 0 and (DYNAMIC > 0).sum() == 128
    assert DYNAMIC[128].item() == pytest.approx(0.55e-6)       # 10^-6 * (0.1 + 1) / 2
    assert DYNAMIC[0].item() == pytest.approx(-(0.1 + (1 - 0.1) * 63.5 / 64))


def test_dynamic_code_matches_bitsandbytes(bnb_functional):
    assert torch.equal(DYNAMIC, bnb_functional.create_dynamic_map(signed=True))


def test_double_quantize_golden():
    """[1, 2, 3]: offset 2, centred [-1, 0, 1], absmax2 1 -> codes 0 (DYNAMIC[0] = -0.99297),
    127 (0) and 255 (1); back: [2 - 0.99297, 2, 3]."""
    qabsmax, absmax2, offset = double_quantize(torch.tensor([1.0, 2.0, 3.0]))
    assert qabsmax.tolist() == [0, 127, 255] and absmax2.tolist() == [1.0] and offset.item() == 2
    back = double_dequantize(qabsmax, absmax2, offset)
    assert back.tolist() == [(DYNAMIC[0] * 1.0 + 2.0).item(), 2.0, 3.0]   # float32 arithmetic


def test_double_quantize_round_trip_is_close():
    absmax = gaussian((5000,)).abs() + 0.5
    qabsmax, absmax2, offset = double_quantize(absmax)
    assert qabsmax.dtype == torch.uint8 and absmax2.numel() == ceil_div(5000, BLOCKSIZE2) == 20
    assert offset.item() == absmax.mean().item()
    back = double_dequantize(qabsmax, absmax2, offset)
    widest = (DYNAMIC[1:] - DYNAMIC[:-1]).max() / 2
    assert ((back - absmax).abs() <= widest * absmax2.repeat_interleave(256)[:5000] * 1.0001).all()


def test_double_dequantize_uses_the_code_it_is_given():
    qabsmax, absmax2, offset = double_quantize(gaussian((300,)).abs())
    halved = double_dequantize(qabsmax, absmax2, offset, code=DYNAMIC / 2)
    assert torch.equal(halved, DYNAMIC[qabsmax.long()] / 2 * absmax2.repeat_interleave(256)[:300]
                       + offset)


def test_constants_nbytes_counts_what_quantize_stores():
    """1024 x 1024 at blocksize 64: 16384 blocks. Plain: 16384 float32 absmaxes. Nested: 16384
    qabsmax bytes + 64 absmax2 floats + 1 offset float; a partial block counts whole."""
    assert constants_nbytes(1024 * 1024, 64, double_quant=False) == 16384 * 4
    assert constants_nbytes(1024 * 1024, 64) == 16384 + 64 * 4 + 4
    assert constants_nbytes(65, 64, double_quant=False) == 2 * 4
    assert constants_nbytes(64 * 257, 64) == 257 + 2 * 4 + 4


def test_double_quantize_refuses_non_finite_absmax():
    with pytest.raises(ValueError, match=r"double_quantize: input has 1 non-finite"):
        double_quantize(torch.tensor([1.0, float("inf")]))


@pytest.mark.parametrize("kwargs, match", [(dict(blocksize=-64), "blocksize must be"),
                                           (dict(blocksize=0), "blocksize must be"),
                                           (dict(blocksize2=0), "blocksize2 must be"),
                                           (dict(n=-5), "n must be an int >= 0")])
def test_constants_nbytes_refuses_bad_sizes(kwargs, match):
    """Issue 10, item 13: a negative blocksize gave negative bytes, blocksize 0 a
    ZeroDivisionError."""
    with pytest.raises(ValueError, match=match):
        constants_nbytes(**{"n": 4096, **kwargs})


def test_double_dequantize_reads_every_byte_unchecked_with_the_checked_bits():
    """Bytes into the 256-value code cannot miss it, so the decode skips the index check (a
    host sync) and gives dequantize_blockwise's bits: every byte value, a partial last block."""
    qabsmax = torch.arange(1000).remainder(256).to(torch.uint8).flip(0)
    absmax2, offset = gaussian((4,), seed=2).abs() + 0.1, torch.tensor(0.37)
    got = double_dequantize(qabsmax, absmax2, offset)
    want = dequantize_blockwise(qabsmax, absmax2, DYNAMIC, BLOCKSIZE2) + offset
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    with pytest.raises(ValueError, match="expected 4 absmax values for 1000 values"):
        double_dequantize(qabsmax, absmax2[:3], offset)              # still checked, and said
    with pytest.raises(ValueError, match="index 255 is outside the 255-entry code"):
        double_dequantize(qabsmax, absmax2, offset, code=DYNAMIC[:255])   # a code bytes can miss
