"""helpers.BnbReference and its probe: bitsandbytes' decode is a reference only where it agrees
with the definition on this CPU. The detection is tested here with a stand-in decoder that has
the fault bitsandbytes 0.50's AVX-512 decoder has (minqlora.bench.references.py), so it runs on CPUs where bitsandbytes is right."""
import pytest
import torch

from minqlora.bnb_layout import state_from_dict
from minqlora.nf4 import unpack_4bit

from helpers import BnbReference, bnb_definition, gaussian, probe_bnb_decode, same_bits

bnb = pytest.importorskip("bitsandbytes")


def straddling_decoder(packed, quant_state):
    """The fault, modelled: every row restarts its blocks (row r, column c takes block
    r * ceil(cols / blocksize) + c // blocksize), which is right only where a row's length is a
    multiple of the blocksize; elsewhere rows after the first take their neighbours' absmax."""
    tensors = {"weight": packed, **{f"weight.{k}": v
                                    for k, v in quant_state.as_dict(packed=True).items()}}
    flat, state = state_from_dict(tensors)
    rows, cols = state.shape
    index = unpack_4bit(flat, rows * cols).long().reshape(rows, cols)
    per_row = -(-cols // state.blocksize)
    block = torch.arange(rows)[:, None] * per_row + torch.arange(cols)[None, :] // state.blocksize
    absmax = state.absmax_fp32()[block.clamp(max=state.absmax.numel() - 1)]
    return (state.code[index] * absmax).to(state.dtype)


def quantized(shape, seed=0):
    return bnb.functional.quantize_4bit(gaussian(shape, seed=seed), blocksize=64,
                                        compress_statistics=True, quant_type="nf4")


def test_the_probe_names_a_decoder_wrong_where_rows_straddle_blocks():
    fault = probe_bnb_decode(bnb, straddling_decoder)
    assert fault is not None and "64x96 nf4 float32" in fault and "torch picks" in fault


def test_the_probe_passes_a_decoder_that_is_the_definition():
    assert probe_bnb_decode(bnb, bnb_definition) is None


def test_the_stand_in_is_right_where_rows_hold_whole_blocks():
    packed, state = quantized((64, 128))
    assert same_bits(straddling_decoder(packed, state), bnb_definition(packed, state))


def test_a_faulty_decode_gives_the_definition_and_an_xfail_naming_the_fault():
    ref = BnbReference(bnb, straddling_decoder, lambda: probe_bnb_decode(bnb, straddling_decoder))
    packed, state = quantized((64, 96))
    got = ref.dequantize(packed, state)
    assert same_bits(got, bnb_definition(packed, state))
    assert not same_bits(got, straddling_decoder(packed, state))
    with pytest.raises(pytest.xfail.Exception, match="64x96 nf4 float32.*checked against the "
                                                     "definition instead"):
        ref.done()


def test_an_agreeing_decode_is_used_and_nothing_is_marked():
    ref = BnbReference(bnb, straddling_decoder, lambda: probe_bnb_decode(bnb, straddling_decoder))
    packed, state = quantized((64, 128))
    assert same_bits(ref.dequantize(packed, state), straddling_decoder(packed, state))
    assert ref.fault is None
    ref.done()                                    # no xfail


def test_a_disagreement_the_probe_cannot_explain_fails():
    def off_by_one_ulp(packed, quant_state):
        out = bnb_definition(packed, quant_state)
        return torch.nextafter(out, torch.full_like(out, float("inf")))
    ref = BnbReference(bnb, off_by_one_ulp, probe=lambda: None)
    with pytest.raises(AssertionError, match="the probe found no fault"):
        ref.dequantize(*quantized((8, 64)))
