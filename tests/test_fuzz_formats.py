"""Property-based fuzzing, round 2 (issue 22): sizes up to 2^64 in every field that reaches C++
(blocksize, state2.blocksize, the shape's sizes, the count of values, the grid), and the MX
formats (MXFP4, NVFP4) with random inputs and tampered states. The property, as in
test_fuzz.py: a correct result or a clear error (ValueError / TypeError), never a raw error
from inside, a crash or a wrong answer. The references are written here, apart from the
library, with index arithmetic (never a table repeated `blocksize` times: 2^62 would not fit)."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from minqlora import launch
from minqlora.microscaling import (E2M1, dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4,
                                   quantize_nvfp4)
from minqlora.mx_state import MXState
from minqlora.quant_state import quantize_4bit
from test_fuzz import FLOATS, SETTINGS, backends, bits, outcome, tensors, valid_input

__all__ = ["backends"]          # the fixture, used by name below
HUGE = st.one_of(st.sampled_from([2 ** k + d for k in (31, 32, 62, 63, 64, 65)
                                  for d in (-1, 0, 1)]), st.integers(0, 2 ** 64))
SIZES = st.one_of(HUGE, st.sampled_from([0, 1, 2, 64, 256, 4096]))


def by_hand(packed, state, dtype):
    """code[nibble i] * absmax[i // blocksize] in float32, cast once; None where a nibble has no
    code entry. Indices computed, never a table repeated blocksize times."""
    n = math.prod(state.shape)
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n].long()
    if n and int(nibbles.max()) >= state.code.numel():
        return None
    absmax = state.absmax.float()
    if state.state2 is not None:
        inner = state.state2
        b = torch.arange(state.absmax.numel())
        absmax = (inner.code.float()[state.absmax.long()] * inner.absmax.float()[
            b // inner.blocksize] + state.offset.float())
    values = state.code.float()[nibbles] * absmax[torch.arange(n) // state.blocksize]
    return values.to(dtype or state.dtype).reshape(state.shape)


@SETTINGS
@given(n=st.integers(1, 300), nested=st.booleans(), blocksize=st.sampled_from([2, 64, 4096]),
       field=st.sampled_from(["blocksize", "state2.blocksize", "shape", "shape2", "numel"]),
       size=SIZES, dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]))
def test_sizes_up_to_2_64_are_refused_alike_or_decoded_right(backends, n, nested, blocksize,
                                                             field, size, dtype):
    """One size of a valid state set to anything up to 2^64 and beyond: refused by every
    decoder (before C++: check_state), or decoded by all of them as the format says."""
    packed, state = quantize_4bit(torch.randn(n, generator=torch.Generator().manual_seed(n)),
                                  blocksize, double_quant=nested)
    if field == "blocksize":
        state.blocksize = size
    elif field == "state2.blocksize" and nested:
        state.state2.blocksize = size
    elif field == "shape":
        state.shape = torch.Size([size]) if size < 2 ** 63 else (size,)
    elif field == "shape2":
        state.shape = (size, n) if size >= 2 ** 63 else torch.Size([size, n])
    elif field == "numel":
        state.shape = torch.Size([min(size, 2 ** 63 - 1), 0])        # 0 values, whatever size
    results = {name: outcome(lambda: decode(packed, state, dtype))
               for name, decode in backends.items()}
    kinds = {name: r[0] for name, r in results.items()}
    if all(k == "error" for k in kinds.values()):
        return
    assert all(k == "ok" for k in kinds.values()), kinds
    want = by_hand(packed, state, dtype)
    for name, (_, out) in results.items():
        assert out.shape == state.shape and torch.equal(bits(out), bits(want)), name


@SETTINGS
@given(n=HUGE)
def test_a_launch_grid_is_right_or_refused(n):
    source = launch.kernel_source()
    got = outcome(lambda: launch.grid(n, source))
    if got[0] == "ok":
        blocks, threads = got[1]
        assert blocks <= launch.MAX_GRID and blocks * threads * 32 >= n
    else:
        assert -(-n // (256 * 32)) > launch.MAX_GRID


# the MX formats
def mx_reference(packed, state):
    """E2M1[q] * scale in float32 (scale = 2^(e - 127), or t * S rounded to float32 first),
    element 0 in the low nibble: the format, decoded here."""
    flat = packed.reshape(-1).long()
    q = torch.stack([flat & 15, flat >> 4], 1).reshape(-1)
    if state.format == "mxfp4":
        scale = torch.exp2(state.scales.double().reshape(-1) - 127).float()     # exact
    else:
        scale = state.tensor_scale.float() * state.scales.float().reshape(-1)
    values = E2M1[q].reshape(-1, state.blocksize) * scale.reshape(-1, 1)
    return values.reshape(state.shape)


@SETTINGS
@given(x=tensors(), blocksize=st.one_of(st.sampled_from([2, 4, 16, 32]), SIZES,
                                        st.sampled_from([3, -16, 16.0, None])),
       fmt=st.sampled_from(["mxfp4", "nvfp4"]), dtype=st.sampled_from([None, *FLOATS,
                                                                      torch.int64, "float32"]))
def test_mx_pairs(x, blocksize, fmt, dtype):
    quantize, dequantize = ((quantize_mxfp4, dequantize_mxfp4) if fmt == "mxfp4"
                            else (quantize_nvfp4, dequantize_nvfp4))
    got = outcome(lambda: quantize(x, blocksize))
    good_block = type(blocksize) is int and 2 <= blocksize <= 2 ** 62 and not \
        blocksize & (blocksize - 1)
    fits = x.dim() > 0 and good_block and x.shape[-1] % blocksize == 0
    assert (got[0] == "ok") == (valid_input(x) and fits), got
    if got[0] == "error":
        return
    packed, state = got[1]
    assert packed.dtype == torch.uint8 and packed.numel() * 2 == x.numel()
    back = outcome(lambda: dequantize(packed, state, dtype))
    out_ok = dtype is None or dtype in FLOATS
    assert (back[0] == "ok") == out_ok, back
    if not out_ok:
        return
    want = mx_reference(packed, state)
    assert torch.equal(bits(back[1]), bits(want.to(dtype or x.dtype)))
    if x.numel():                                    # within half a block's absmax (and t)
        blocks = x.double().reshape(-1, blocksize)
        absmax = blocks.abs().amax(1, keepdim=True)
        err = (want.double().reshape(-1, blocksize) - blocks).abs()
        slack = absmax * 0.5 + blocks.abs().max() * 2.0 ** -14 + 2.0 ** -118
        assert (err <= slack).all()


@SETTINGS
@given(fmt=st.sampled_from(["mxfp4", "nvfp4"]), rows=st.integers(1, 4),
       field=st.sampled_from(["blocksize", "shape", "scales", "format", "dtype", "tensor_scale",
                              "packed", "scale_values"]), size=SIZES, data=st.data())
def test_tampered_mx_states_are_refused_or_decoded_right(fmt, rows, field, size, data):
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    quantize, dequantize = ((quantize_mxfp4, dequantize_mxfp4) if fmt == "mxfp4"
                            else (quantize_nvfp4, dequantize_nvfp4))
    packed, state = quantize(x, 16)
    fields, draw = dict(state.__dict__), data.draw
    if field == "blocksize":
        fields["blocksize"] = size
    elif field == "shape":
        fields["shape"] = draw(st.sampled_from([torch.Size([size]) if size < 2 ** 63 else (size,),
                                                torch.Size([rows, 32]), torch.Size([]),
                                                torch.Size([rows * 64]), (rows, 64), "64"]))
    elif field == "scales":
        s = state.scales
        fields["scales"] = draw(st.sampled_from([s.reshape(-1)[:1], s.float(), s[:, :-1],
                                                 s.view(torch.uint8), None]))
    elif field == "format":
        fields["format"] = draw(st.sampled_from(["mxfp4", "nvfp4", "nf4", None]))
    elif field == "dtype":
        fields["dtype"] = draw(st.sampled_from([torch.int64, torch.bool, None, torch.float16]))
    elif field == "tensor_scale":
        fields["tensor_scale"] = draw(st.sampled_from([None, torch.tensor(math.nan), 1.0,
                                                       torch.tensor([1.0, 2.0]),
                                                       torch.tensor(0.0), torch.tensor(1.0)]))
    elif field == "packed":
        packed = draw(st.sampled_from([packed[:, :-1], packed.float(), packed.reshape(-1),
                                       torch.zeros(0, dtype=torch.uint8)]))
    elif field == "scale_values":
        s = state.scales.clone()
        s.view(torch.uint8).reshape(-1)[0] = draw(st.sampled_from([255, 127, 0]))
        fields["scales"] = s
    tampered = MXState(**fields)
    got = outcome(lambda: dequantize(packed, tampered))
    if got[0] == "error":
        return
    assert tampered.format == fmt and torch.isfinite(got[1].float()).all()
    want = mx_reference(packed, tampered).to(tampered.dtype)
    assert torch.equal(bits(got[1]), bits(want))
