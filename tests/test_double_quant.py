import pytest
import torch
from conftest import gaussian
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minqlora import (DYNAMIC, FP4, NF4, QuantState, double_dequantize, double_quantize,
                      dequantize_4bit, quantize_4bit, unpack_4bit)
from minqlora.nf4 import get_code


def decode_by_definition(packed, absmax, code, n, blocksize):
    """The format's definition, written independently: code[nibble] * absmax[i // blocksize]."""
    nibbles = unpack_4bit(packed.reshape(-1), n).long()
    return code[nibbles] * absmax.float().repeat_interleave(blocksize)[:n]


def test_dynamic_code_shape():
    """127 positive + 127 negative values + 0 + 1; finest step near zero is 10^-6 scale."""
    assert DYNAMIC.numel() == 256 and (DYNAMIC[1:] > DYNAMIC[:-1]).all()
    assert DYNAMIC[-1] == 1 and DYNAMIC[127] == 0 and (DYNAMIC > 0).sum() == 128
    assert DYNAMIC[128].item() == pytest.approx(0.55e-6)       # 10^-6 * (0.1 + 1) / 2
    assert DYNAMIC[0].item() == pytest.approx(-(0.1 + (1 - 0.1) * 63.5 / 64))


def test_bits_per_param_is_the_papers_arithmetic():
    x = gaussian((256, 256))
    assert quantize_4bit(x, double_quant=False)[1].bits_per_param() == 4.5
    assert quantize_4bit(x, double_quant=True)[1].bits_per_param() == 4.126953125


def test_measured_bytes_match_the_arithmetic():
    """1024 x 1024 at blocksize 64: 16384 blocks. Plain: 16384 * 4 bytes of absmax.
    Nested: 16384 qabsmax bytes + 64 absmax2 floats + 1 offset float."""
    x = gaussian((1024, 1024))
    packed, plain = quantize_4bit(x, double_quant=False)
    assert packed.numel() == 1024 * 512 and plain.nbytes() == 16384 * 4
    assert quantize_4bit(x)[1].nbytes() == 16384 + 64 * 4 + 4


def test_double_quantize_round_trip_is_close():
    absmax = gaussian((5000,)).abs() + 0.5
    qabsmax, absmax2, offset = double_quantize(absmax)
    assert qabsmax.dtype == torch.uint8 and absmax2.numel() == 20 and offset.item() == absmax.mean().item()
    back = double_dequantize(qabsmax, absmax2, offset)
    widest = (DYNAMIC[1:] - DYNAMIC[:-1]).max() / 2
    assert ((back - absmax).abs() <= widest * absmax2.repeat_interleave(256)[:5000] * 1.0001).all()


def test_golden_small_weight():
    """[0.5, -1, 0]: absmax 1; 0.5 lies below the midpoint 0.5016 of NF4[12]=0.4407 and
    NF4[13]=0.5626 -> 12; -1 -> 0; 0 -> 7; the odd count is padded with the code of 0 (7)."""
    packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    assert packed.tolist() == [0xC0, 0x77] and state.absmax.tolist() == [1.0]
    assert dequantize_4bit(packed, state).tolist() == [NF4[12].item(), -1.0, 0.0]


CASES = [((64, 64), 128, torch.float32), ((4097,), 64, torch.bfloat16),
         ((333, 7), 64, torch.float16), ((3, 5, 67), 32, torch.float32), ((256, 512), 256, torch.bfloat16)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize,dtype", CASES)
def test_bytes_and_absmax_match_bitsandbytes(bnb_functional, shape, blocksize, dtype, quant_type):
    x = gaussian(shape, seed=blocksize, dtype=dtype)
    packed, state = quantize_4bit(x, blocksize, quant_type, double_quant=False)
    ref_packed, ref_state = bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
    # bitsandbytes' bytes decoded by minqlora equal the definition (its own CPU dequantize
    # is wrong for 2-D rows shorter than the blocksize, so it is not the oracle here).
    code = get_code(quant_type)
    expected = decode_by_definition(ref_packed, ref_state.absmax, code, x.numel(), blocksize)
    got = dequantize_4bit(ref_packed.reshape(-1), state, dtype=torch.float32)
    assert torch.equal(got.reshape(-1), expected)
    assert torch.equal(dequantize_4bit(packed, state).reshape(-1), expected.to(dtype))


@pytest.mark.parametrize("shape,blocksize,dtype", CASES)
def test_double_quant_matches_bitsandbytes(bnb_functional, shape, blocksize, dtype):
    """offset and absmax2 match exactly; qabsmax is the exact nearest dynamic code, which
    bitsandbytes' CPU lookup table misses by one step on rare values."""
    x = gaussian(shape, seed=7, dtype=dtype)
    packed, state = quantize_4bit(x, blocksize, "nf4", double_quant=True)
    ref_packed, ref = bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type="nf4",
                                                   compress_statistics=True)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
    assert torch.equal(state.state2.code, ref.state2.code)
    differ = state.absmax.int() - ref.absmax.int()
    assert differ.abs().max() <= 1 and (differ != 0).sum() <= max(1, differ.numel() // 50)
    # exact nearest code: no other dynamic code is closer to (absmax - offset) / absmax2
    plain = quantize_4bit(x, blocksize, "nf4", double_quant=False)[1].absmax
    target = ((plain - state.offset) * (1 / state.state2.absmax).repeat_interleave(256)[: plain.numel()]).clamp(-1, 1)
    chosen = (DYNAMIC[state.absmax.long()] - target).abs()
    assert (chosen <= (DYNAMIC[None, :] - target[:, None]).abs().min(dim=1).values).all()
    assert (chosen <= (DYNAMIC[ref.absmax.long()] - target).abs()).all()  # never worse than bnb


def test_all_zero_block_decodes_to_zeros_and_odd_count_pads_with_code_of_zero():
    x = torch.cat([torch.zeros(64), torch.tensor([0.3, -0.2, 0.1])])
    packed, state = quantize_4bit(x, double_quant=False)
    assert state.absmax[0] == 0 and packed[-1].item() & 0xF == 7
    out = dequantize_4bit(packed, state)
    assert torch.isfinite(out).all() and (out[:64] == 0).all()


@pytest.mark.parametrize("shape", [(0,), (0, 5), (1,), (5, 3), (2, 3, 4)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_shapes_dtypes_round_trip(shape, double_quant):
    x = gaussian(shape, dtype=torch.bfloat16)
    packed, state = quantize_4bit(x, double_quant=double_quant)
    out = dequantize_4bit(packed, state)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert dequantize_4bit(packed, state, dtype=torch.float16).dtype == torch.float16


def test_non_contiguous_input():
    x = gaussian((32, 48)).t()
    a, b = quantize_4bit(x)[0], quantize_4bit(x.contiguous())[0]
    assert torch.equal(a, b)


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(TypeError, match="torch.int32"):
        quantize_4bit(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(1 NaN"):
        quantize_4bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="power of two >= 2, got 48"):
        quantize_4bit(torch.ones(4), blocksize=48)
    with pytest.raises(ValueError, match=r"choose one of \['fp4', 'int4', 'nf4'\]"):
        quantize_4bit(torch.ones(4), quant_type="nf5")
    packed, state = quantize_4bit(torch.ones(10))
    with pytest.raises(ValueError, match="expected 5 uint8 bytes"):
        dequantize_4bit(packed[:4], state)


@settings(max_examples=40, deadline=None)
@given(arrays("float32", st.integers(1, 600), elements=st.floats(-100, 100, width=32)),
       st.sampled_from([2, 16, 64, 256]), st.sampled_from(["nf4", "fp4", "int4"]))
def test_round_trip_within_half_the_widest_gap(values, blocksize, quant_type):
    x = torch.from_numpy(values)
    packed, state = quantize_4bit(x, blocksize, quant_type, double_quant=False)
    code = get_code(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    bound = half_gap * state.absmax.repeat_interleave(blocksize)[: x.numel()]
    assert ((dequantize_4bit(packed, state) - x).abs() <= bound * (1 + 1e-5) + 1e-30).all()


def test_quant_state_moves_and_keeps_its_fields():
    packed, state = quantize_4bit(gaussian((8, 64)))
    moved = state.to("cpu")
    assert isinstance(moved, QuantState) and moved.nested and moved.quant_type == "nf4"
    assert torch.equal(moved.absmax_fp32(), state.absmax_fp32())
    assert FP4.numel() == 16


def test_absmax_fp32_decodes_with_the_states_own_inner_code():
    """A nested state carries its code for the absmaxes (state2.code); decoding must use it."""
    _, state = quantize_4bit(gaussian((4, 64)))
    halved = QuantState(state.state2.absmax, state.state2.code / 2, 256, state.state2.shape, torch.float32)
    custom = QuantState(state.absmax, state.code, 64, state.shape, state.dtype, offset=state.offset, state2=halved)
    expected = DYNAMIC[state.absmax.long()] / 2 * state.state2.absmax + state.offset
    assert torch.equal(custom.absmax_fp32(), expected)


@pytest.mark.parametrize("backend", ["torch", "emulate"])
def test_a_non_float_output_dtype_is_refused(backend):
    packed, state = quantize_4bit(gaussian((4, 64)))
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int32"):
        dequantize_4bit(packed, state, dtype=torch.int32, backend=backend)


def test_a_code_longer_than_16_entries_is_refused():
    packed, state = quantize_4bit(gaussian((4, 64)), double_quant=False)
    state.code = DYNAMIC
    with pytest.raises(ValueError, match="at most 16 entries, got 256"):
        dequantize_4bit(packed, state)

