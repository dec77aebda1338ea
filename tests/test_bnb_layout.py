"""bnb_layout: a QuantState as bitsandbytes' state_dict entries, and back (the Linear4bit
round trips against bitsandbytes' own layers are in test_linear4bit.py)."""
import json

import pytest
import torch

from minqlora.bnb_layout import state_as_dict, state_from_dict
from minqlora.quant_state import decode_4bit, quantize_4bit

from helpers import BnbReference, bits, gaussian, same_bits


@pytest.mark.parametrize("shape", [(5,), (7, 5), (3, 64, 33), (4096,)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_round_trip_keeps_every_tensor_and_field(shape, double_quant, quant_type):
    x = gaussian(shape, seed=1, dtype=torch.bfloat16)
    packed, state = quantize_4bit(x, 32, quant_type, double_quant)
    tensors = state_as_dict(packed, state, "layer.weight")
    assert all(k.startswith("layer.weight") for k in tensors)
    packed2, state2 = state_from_dict(tensors, "layer.weight")
    assert torch.equal(packed2, packed) and (state2.shape, state2.dtype, state2.blocksize,
                                             state2.quant_type) == (state.shape, state.dtype,
                                                                    32, quant_type)
    assert bits(decode_4bit(packed2, state2)).equal(bits(decode_4bit(packed, state)))
    if double_quant:
        assert bits(state2.offset).equal(bits(state.offset))   # float32 -> JSON -> float32


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_same_entries_as_bitsandbytes_quant_state_as_dict(quant_type, double_quant):
    """QuantState.as_dict(packed=True) of bitsandbytes' own quantization: same keys, shapes,
    dtypes and JSON bytes; its state loads here and decodes to bitsandbytes' weight."""
    bnb = pytest.importorskip("bitsandbytes")
    x = gaussian((96, 40), seed=2, dtype=torch.float16)
    packed, theirs = bnb.functional.quantize_4bit(x, blocksize=64, quant_type=quant_type,
                                                  compress_statistics=double_quant)
    expected = {"weight": packed, **{"weight." + k: v for k, v in
                                     theirs.as_dict(packed=True).items()}}
    ours = state_as_dict(*quantize_4bit(x, 64, quant_type, double_quant))
    assert [(k, v.shape, v.dtype) for k, v in ours.items()] == [
        (k, v.shape, v.dtype) for k, v in expected.items()]
    key = f"weight.quant_state.bitsandbytes__{quant_type}"
    assert bytes(ours[key].tolist()) == bytes(expected[key].tolist())
    mine_packed, mine = state_from_dict(expected)
    ref = BnbReference(bnb)        # bitsandbytes' decode where it is right on this CPU (helpers)
    assert same_bits(decode_4bit(mine_packed, mine), ref.dequantize(packed, theirs))
    ref.done()


def test_the_json_is_what_bitsandbytes_writes():
    packed, state = quantize_4bit(gaussian((8, 64), seed=3), double_quant=True)
    blob = state_as_dict(packed, state)["weight.quant_state.bitsandbytes__nf4"]
    info = json.loads(bytes(blob.tolist()))
    assert list(info) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                          "nested_dtype", "nested_offset"]
    assert info["shape"] == [8, 64] and info["nested_offset"] == state.offset.item()


def test_safetensors_accepts_the_entries_of_many_layers():
    """No two entries share memory (safetensors refuses shared tensors): the nested code table,
    one global tensor in memory, is written as a copy per layer."""
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {}
    for i in range(2):
        tensors.update(state_as_dict(*quantize_4bit(gaussian((4, 64), seed=i)), f"l{i}.weight"))
    loaded = safetensors.load(safetensors.save(tensors))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_errors_name_the_key():
    tensors = state_as_dict(*quantize_4bit(gaussian((4, 64), seed=4)), "m.weight")
    with pytest.raises(ValueError, match="missing key 'm.weight.quant_map'"):
        state_from_dict({k: v for k, v in tensors.items() if k != "m.weight.quant_map"},
                        "m.weight")
    with pytest.raises(ValueError, match=r"m.weight.nested_absmax: expected one float32"):
        state_from_dict({**tensors, "m.weight.nested_absmax": torch.ones(3)}, "m.weight")
    with pytest.raises(ValueError, match="non-finite"):
        state_from_dict({**tensors, "m.weight.nested_absmax": torch.full((1,), float("nan"))},
                        "m.weight")
