"""quant_state.py: quantize_4bit, the QuantState, and decode_4bit (the format's definition)."""
import pytest
import torch
from helpers import gaussian
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minqlora.double_quant import DYNAMIC
from minqlora.nf4 import CODES, NF4, get_code, unpack_4bit
from minqlora.quant_state import QuantState, absmax_state, decode_4bit, quantize_4bit
from minqlora.state_checks import check_state


def decode_by_hand(packed, absmax, code, n, blocksize):
    """The format's definition, written independently: code[nibble] * absmax[i // blocksize]."""
    nibbles = unpack_4bit(packed.reshape(-1), n).long()
    return code[nibbles] * absmax.float().repeat_interleave(blocksize)[:n]


def test_golden_small_weight():
    """[0.5, -1, 0]: absmax 1; 0.5 lies below the midpoint 0.5016 of NF4[12]=0.4407 and
    NF4[13]=0.5626 -> 12; -1 -> 0; 0 -> 7; the odd count is padded with the code of 0 (7)."""
    packed, state = quantize_4bit(torch.tensor([0.5, -1.0, 0.0]), double_quant=False)
    assert packed.tolist() == [0xC0, 0x77] and state.absmax.tolist() == [1.0]
    assert decode_4bit(packed, state).tolist() == [NF4[12].item(), -1.0, 0.0]


def test_bits_per_param_is_the_papers_arithmetic():
    """4 + 32/64 = 4.5 without, 4 + 8/64 + 32/(64 * 256) = 4.126953125 with double quant."""
    x = gaussian((256, 256))
    assert quantize_4bit(x, double_quant=False)[1].bits_per_param() == 4.5
    assert quantize_4bit(x, double_quant=True)[1].bits_per_param() == 4.126953125
    assert quantize_4bit(x, blocksize=128)[1].bits_per_param() == 4 + 8 / 128 + 32 / (128 * 256)


def test_measured_bytes_match_the_arithmetic():
    """1024 x 1024 at blocksize 64: 16384 blocks. Plain: 16384 * 4 bytes of absmax.
    Nested: 16384 qabsmax bytes + 64 absmax2 floats + 1 offset float."""
    x = gaussian((1024, 1024))
    packed, plain = quantize_4bit(x, double_quant=False)
    assert packed.numel() == 1024 * 512 and plain.nbytes() == 16384 * 4
    assert quantize_4bit(x)[1].nbytes() == 16384 + 64 * 4 + 4


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
    expected = decode_by_hand(ref_packed, ref_state.absmax, code, x.numel(), blocksize)
    got = decode_4bit(ref_packed.reshape(-1), state, dtype=torch.float32)
    assert torch.equal(got.reshape(-1), expected)
    assert torch.equal(decode_4bit(packed, state).reshape(-1), expected.to(dtype))


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


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_and_subnormal_blocks_match_bitsandbytes(bnb_functional, quant_type):
    """Both take the reciprocal of max(absmax, 1e-38): an all-zero block and blocks whose absmax
    is a float32 subnormal give the same bytes and absmaxes (full blocks; bitsandbytes stores a
    partial block's absmax clamped, minqlora as it is)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(64), torch.randn(64, generator=g) * 3e-39,
                   torch.randn(64, generator=g) * 7e-45, torch.randn(64, generator=g)])
    packed, state = quantize_4bit(x, 64, quant_type, double_quant=False)
    ref_packed, ref = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, ref_packed.reshape(-1)) and torch.equal(state.absmax, ref.absmax)
    assert state.absmax[0] == 0 and 0 < state.absmax[2] < 1e-43
    assert torch.equal(decode_4bit(packed, state),
                       bnb_functional.dequantize_4bit(ref_packed, ref).reshape(-1))


def test_all_zero_block_decodes_to_zeros_and_odd_count_pads_with_code_of_zero():
    x = torch.cat([torch.zeros(64), torch.tensor([0.3, -0.2, 0.1])])
    packed, state = quantize_4bit(x, double_quant=False)
    assert state.absmax[0] == 0 and packed[-1].item() & 0xF == 7
    out = decode_4bit(packed, state)
    assert torch.isfinite(out).all() and (out[:64] == 0).all()


@pytest.mark.parametrize("shape", [(0,), (0, 5), (1,), (5, 3), (2, 3, 4)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_shapes_dtypes_round_trip(shape, double_quant):
    x = gaussian(shape, dtype=torch.bfloat16)
    packed, state = quantize_4bit(x, double_quant=double_quant)
    out = decode_4bit(packed, state)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert decode_4bit(packed, state, dtype=torch.float16).dtype == torch.float16


def test_non_contiguous_input():
    x = gaussian((32, 48)).t()
    a, b = quantize_4bit(x)[0], quantize_4bit(x.contiguous())[0]
    assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(arrays("float32", st.integers(1, 600), elements=st.floats(-100, 100, width=32)),
       st.sampled_from([2, 16, 64, 256]), st.sampled_from(list(CODES)))
def test_round_trip_within_half_the_widest_gap(values, blocksize, quant_type):
    x = torch.from_numpy(values)
    packed, state = quantize_4bit(x, blocksize, quant_type, double_quant=False)
    code = get_code(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    bound = half_gap * state.absmax.repeat_interleave(blocksize)[: x.numel()]
    assert ((decode_4bit(packed, state) - x).abs() <= bound * (1 + 1e-5) + 1e-30).all()


def test_a_custom_code_is_used_as_given_and_recorded_as_custom():
    """A 4-bit table of 5 values in no particular order: every index points into it as given,
    each value goes to its nearest entry, and NF4's quant_type is overridden."""
    code = torch.tensor([0.5, -1.0, 0.0, 1.0, -0.25])
    x = torch.tensor([0.9, -0.1, -0.2, 0.3, -1.0, 0.0, 0.7])      # absmax 1: s = x
    packed, state = quantize_4bit(x, quant_type="nf4", double_quant=False, code=code)
    assert state.quant_type == "custom" and torch.equal(state.code, code)
    assert unpack_4bit(packed, 7).tolist() == [3, 2, 4, 0, 1, 2, 0]    # 0.3 -> 0.5, 0.7 -> 0.5
    assert decode_4bit(packed, state).tolist() == [1.0, 0.0, -0.25, 0.5, -1.0, 0.0, 0.5]


@pytest.mark.parametrize("name", list(CODES))
def test_a_named_table_passed_as_code_gives_the_same_bytes(name):
    """NF4, FP4 (stored in bit order, with -0 and +0) and INT4 (15 values) through code=."""
    x = gaussian((70, 33), seed=4)
    packed, state = quantize_4bit(x, 32, quant_type=name)
    custom_packed, custom = quantize_4bit(x, 32, code=get_code(name).clone())
    assert torch.equal(custom_packed, packed) and torch.equal(custom.absmax, state.absmax)
    assert custom.quant_type == "custom" and torch.equal(decode_4bit(custom_packed, custom),
                                                         decode_4bit(packed, state))


def test_a_bad_custom_code_is_refused():
    for bad, message in [(torch.linspace(-1, 1, 17), r"2 to 16 entries .*, got 17"),
                         (torch.tensor([-2.0, 0.0, 1.0]), r"\[-1, 1\]"),
                         (torch.tensor([[0.0, 1.0]]), "1-D floating-point"),
                         (torch.tensor([0, 1]), "1-D floating-point")]:
        with pytest.raises(ValueError, match=message):
            quantize_4bit(torch.ones(4), code=bad)


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
    with pytest.raises(ValueError, match="decode_4bit: expected 5 uint8 bytes"):
        decode_4bit(packed[:4], state)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int32"):
        decode_4bit(packed, state, dtype=torch.int32)


def test_quant_state_moves_and_keeps_its_fields():
    packed, state = quantize_4bit(gaussian((8, 64)))
    moved = state.to("meta")
    assert isinstance(moved, QuantState) and moved.nested and moved.quant_type == "nf4"
    assert all(t.is_meta for t in (moved.absmax, moved.code, moved.offset, moved.state2.absmax,
                                   moved.state2.code))
    assert (moved.blocksize, moved.shape, moved.dtype) == (64, (8, 64), torch.float32)
    assert not state.absmax.is_meta                           # a new state; the old one stays


def test_absmax_state_is_the_nested_states_state2():
    """quantize_4bit builds state2 with absmax_state: DYNAMIC, blocksize 256, one shape entry
    per absmax. Each state owns its copy of DYNAMIC (issue 22: an edit of one state's table
    must change no other), never DYNAMIC itself; quantize_4bit's state owns its copy too."""
    _, state = quantize_4bit(gaussian((40, 64)))
    inner = absmax_state(state.state2.absmax, 40)
    for field in ("blocksize", "shape", "dtype", "quant_type", "offset", "state2"):
        assert getattr(inner, field) == getattr(state.state2, field), field
    assert (inner.blocksize, inner.shape, inner.quant_type) == (256, (40,), "dynamic")
    assert torch.equal(inner.code, DYNAMIC) and inner.code is not DYNAMIC
    assert inner.code is not absmax_state(state.state2.absmax, 40).code
    assert torch.equal(state.state2.code, DYNAMIC) and state.state2.code is not inner.code


def test_absmax_fp32_decodes_with_the_states_own_inner_code():
    """A nested state carries its code for the absmaxes (state2.code); decoding must use it."""
    _, state = quantize_4bit(gaussian((4, 64)))
    halved = QuantState(absmax=state.state2.absmax, code=state.state2.code / 2, blocksize=256,
                        shape=state.state2.shape, dtype=torch.float32)
    custom = QuantState(absmax=state.absmax, code=state.code, blocksize=64, shape=state.shape,
                        dtype=state.dtype, offset=state.offset, state2=halved)
    expected = DYNAMIC[state.absmax.long()] / 2 * state.state2.absmax + state.offset
    assert torch.equal(custom.absmax_fp32(), expected)


def test_check_state_names_what_does_not_fit():
    packed, state = quantize_4bit(torch.randn(100), 64)           # 2 blocks, 1 absmax2
    check_state(packed, state, "here")                              # fits: no error
    cases = [(dict(blocksize=48), r"here: blocksize must be a power of two >= 2, got 48"),
             (dict(blocksize=32), "expected 4 uint8 qabsmax values for 100 weights at "
                                  "blocksize 32, got 2 of torch.uint8"),
             (dict(absmax=state.absmax.float()), "expected 2 uint8 qabsmax values"),
             (dict(code=DYNAMIC), "a 4-bit code is a 1-D floating-point tensor of 2 to 16 entries, got 256"),
             (dict(offset=None), r"expected one float offset \(the absmaxes' mean\), got "
                                 "NoneType")]
    for change, message in cases:
        broken = QuantState(**{**state.__dict__, **change})
        with pytest.raises(ValueError, match=message):
            check_state(packed, broken, "here")
    state.state2.blocksize = 100
    with pytest.raises(ValueError, match="state2.blocksize must be a power of two >= 2, got 100"):
        check_state(packed, state, "here")


# ---- issue 10: tampered states, values beyond float32, shared tables, bitsandbytes' edges ----

def tampered(state, **change):
    """A copy of state with some fields changed (state2's fields as state2_<name>)."""
    import dataclasses
    inner = {k[7:]: v for k, v in change.items() if k.startswith("state2_")}
    outer = {k: v for k, v in change.items() if not k.startswith("state2_")}
    if inner:
        outer["state2"] = dataclasses.replace(state.state2, **inner)
    return dataclasses.replace(state, **outer)


TAMPERED = [  # (change, what the error must say); the data was quantized at blocksize 32
    (dict(blocksize=64), "expected 16 uint8 qabsmax values for 1000 weights at blocksize 64"),
    (dict(blocksize=48), "blocksize must be a power of two >= 2, got 48"),
    (dict(blocksize=0), "blocksize must be a power of two >= 2, got 0"),
    (dict(blocksize=32.0), "blocksize must be a power of two >= 2, got 32.0"),
    (dict(dtype=torch.int32), r"state.dtype \(what was quantized\) must be a floating-point"),
    (dict(dtype="float32"), "state.dtype"),
    (dict(offset=None), "expected one float offset"),
    (dict(offset=torch.zeros(2)), "expected one float offset"),
    (dict(code=torch.zeros(20)), "2 to 16 entries, got 20"),
    (dict(code=torch.arange(16)), "1-D floating-point tensor of 2 to 16 entries, got 16 of "
                                  "torch.int64"),
    (dict(code=[0.0, 1.0]), "got list"),
    (dict(absmax=torch.zeros(32)), "expected 32 uint8 qabsmax values"),
    (dict(state2_code=torch.zeros(10)), "256-value float state2.code"),
    (dict(state2_absmax=torch.zeros(2)), "expected 1 float absmax2 values"),
    (dict(state2_absmax=torch.zeros(1, dtype=torch.int32)), "expected 1 float absmax2"),
    (dict(state2_blocksize=0), "state2.blocksize must be a power of two"),
    (dict(state2=torch.zeros(3)), "state2 must be a QuantState"),
    (dict(shape=torch.Size([998])), r"expected 499 uint8 bytes for shape \(998,\)"),
]


@pytest.mark.parametrize("decode", ["decode_4bit", "torch", "emulate", "cpp"])
@pytest.mark.parametrize("change, message", TAMPERED, ids=lambda v: str(v)[:40])
def test_every_backend_refuses_the_same_tampered_state(decode, change, message, request):
    """Item 9 (issue 10): a state tampered with is refused by one check (check_state) on every
    path, with the same message; before, the torch backend decoded blocksize 64 for data
    quantized at 32 as garbage, returned ints for dtype=int32, and raised ZeroDivisionError,
    TypeError or AttributeError from inside for blocksize 0, offset=None or a tuple shape."""
    if decode in ("emulate", "cpp"):
        request.getfixturevalue({"emulate": "emulation", "cpp": "decoder"}[decode])
    from minqlora.backends import dequantize_4bit
    run = decode_4bit if decode == "decode_4bit" else (
        lambda p, s: dequantize_4bit(p, s, backend=decode))
    packed, state = quantize_4bit(gaussian(1000), 32)
    with pytest.raises((ValueError, TypeError), match=message):
        run(packed, tampered(state, **change))
    with pytest.raises(TypeError, match="expected a QuantState, got NoneType"):
        run(packed, None)
    with pytest.raises(ValueError, match="uint8 bytes .* got list"):
        run([1, 2], state)


def test_a_tuple_shape_is_a_torch_size():
    """A state made with a tuple (or list) shape works; one changed to a tuple afterwards is
    refused clearly, not with an AttributeError from inside."""
    packed, state = quantize_4bit(gaussian((10, 7)), 32)
    made = QuantState(**{**state.__dict__, "shape": (10, 7)})
    assert made.shape == torch.Size([10, 7]) and isinstance(made.shape, torch.Size)
    assert torch.equal(decode_4bit(packed, made), decode_4bit(packed, state))
    state.shape = (10, 7)
    with pytest.raises(TypeError, match=r"state.shape must be a torch.Size, got \(10, 7\)"):
        decode_4bit(packed, state)


def test_float64_beyond_float32_is_refused():
    """Item 11: [1e300, 1, -2, 3] in float64 decoded to [inf, nan, nan, nan]; absmaxes are
    float32, so it is refused, saying so. Within float32's range float64 is correct."""
    from minqlora import absmax_quantize, quantize_blockwise
    x = torch.tensor([1e300, 1, -2, 3], dtype=torch.float64)
    for quantize in (lambda: quantize_4bit(x, double_quant=False), lambda: quantize_4bit(x),
                     lambda: absmax_quantize(x), lambda: quantize_blockwise(x, DYNAMIC)):
        with pytest.raises(ValueError, match=r"1 value\(s\) beyond float32's range \(largest "
                                             r"\|x\| 1e\+300 > 3.4028e\+38\)"):
            quantize()
    y = torch.tensor([1e38, -3e38, 1e-30, 7.0], dtype=torch.float64)
    for double_quant in (False, True):
        packed, state = quantize_4bit(y, double_quant=double_quant)
        want = decode_4bit(*quantize_4bit(y.float(), double_quant=double_quant)).double()
        assert torch.equal(decode_4bit(packed, state), want) and state.dtype == torch.float64


def test_finite_float32_near_its_maximum():
    """Item 11: torch.full((128,), 2e38) with double quantization failed ('2 non-finite values':
    the mean of the absmaxes overflowed in float32). The mean falls back to float64, so it
    round-trips exactly; where the double-quantized constant itself would overflow, the error
    says so (the plain format still holds it)."""
    x = torch.full((128,), 2e38)
    for double_quant in (False, True):
        packed, state = quantize_4bit(x, double_quant=double_quant)
        assert torch.equal(decode_4bit(packed, state), x)
    big = torch.finfo(torch.float32).max
    y = torch.cat([torch.full((128,), big), torch.zeros(64)])
    with pytest.raises(ValueError, match="close to float32's maximum .* overflow when double "
                                         "quantized; use double_quant=False"):
        quantize_4bit(y)
    packed, state = quantize_4bit(y, double_quant=False)
    assert torch.equal(decode_4bit(packed, state), y)


def test_normal_inputs_keep_bitsandbytes_offset(bnb_functional):
    """The float64 mean is only a fallback: an ordinary weight's offset is still the float32
    mean bitsandbytes computes (same bits)."""
    x = gaussian((300, 257), seed=3)
    _, state = quantize_4bit(x)
    _, ref = bnb_functional.quantize_4bit(x, blocksize=64, compress_statistics=True)
    assert torch.equal(state.offset, ref.offset)


def test_editing_a_state_never_touches_the_tables():
    """Item 13: state.code was mq.NF4 itself and state2.code the dynamic table, so editing a
    state in place corrupted every later quantization. Each state owns its tables now."""
    x = gaussian(1000)
    packed, state = quantize_4bit(x)
    tables = NF4.clone(), DYNAMIC.clone()
    state.code.zero_()
    state.state2.code.zero_()
    assert torch.equal(NF4, tables[0]) and torch.equal(DYNAMIC, tables[1])
    again, fresh = quantize_4bit(x)
    assert torch.equal(again, packed) and torch.equal(fresh.code, NF4)
    assert torch.equal(fresh.state2.code, DYNAMIC)


def test_a_parameter_quantizes_without_autograd_history():
    """Item 13: quantizing an nn.Parameter left state2.absmax and offset with requires_grad."""
    from minqlora import absmax_quantize, double_quantize, quantize_blockwise
    w = torch.nn.Parameter(gaussian((64, 64)))
    _, state = quantize_4bit(w)
    assert not any(t.requires_grad for t in (state.absmax, state.offset, state.state2.absmax))
    assert not quantize_blockwise(w, DYNAMIC)[1].requires_grad
    assert not absmax_quantize(w)[1].requires_grad
    assert not any(t.requires_grad for t in double_quantize(w.abs().reshape(-1)))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_input_is_quantized(dtype):
    """Item 13: float8 input raised NotImplementedError ('isfinite' for Float8) from inside
    torch. It is quantized like its float32 values, and decodes back to float8."""
    x = gaussian(200).to(dtype)
    packed, state = quantize_4bit(x)
    want_packed, want = quantize_4bit(x.float())
    assert torch.equal(packed, want_packed) and state.dtype == dtype
    assert torch.equal(decode_4bit(packed, state).float(),
                       decode_4bit(want_packed, want).to(dtype).float())


def test_a_huge_blocksize_on_a_few_values_allocates_little():
    """Item 13: blocksize 2**26 on 10 values padded a block of 2**26 values (~540 MB). One
    short block is padded to an even count only; results as with blocksize 16."""
    import subprocess
    import sys
    code = """
import resource, torch, minqlora as mq
from minqlora.quant_state import decode_4bit
x = torch.randn(10, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for double_quant in (False, True):
    p, s = mq.quantize_4bit(x, 2 ** 26, double_quant=double_quant)
    p16, s16 = mq.quantize_4bit(x, 16, double_quant=double_quant)
    assert torch.equal(p, p16)
    for backend in ("torch", "emulate", "cpp"):
        assert torch.equal(mq.dequantize_4bit(p, s, backend=backend), decode_4bit(p16, s16))
q, a = mq.quantize_blockwise(x, mq.DYNAMIC, 2 ** 26)
assert torch.equal(mq.dequantize_blockwise(q, a, mq.DYNAMIC, 2 ** 26),
                   mq.dequantize_blockwise(*mq.quantize_blockwise(x, mq.DYNAMIC, 16), mq.DYNAMIC, 16))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 64, f"{done.stdout.split()[-1]} MB more at its peak"


def test_partial_last_block_is_scaled_by_the_reciprocal():
    """Item 14: minqlora scales every block, the partial last one too, by x * (1/absmax), as
    bitsandbytes' CUDA kernel does everywhere and its CPU quantizer does for full blocks. fp16
    [3.2578125, -1.900390625] in FP4: -1.900390625 * (1 / 3.2578125) lands on an FP4 midpoint
    that x / absmax misses, so a partial block of these two gives byte 58 (bitsandbytes 0.50's
    CPU quantizer, dividing: 61); the same pair inside a full block gives 58 on both."""
    pair = torch.tensor([3.2578125, -1.900390625], dtype=torch.float16)
    packed, _ = quantize_4bit(pair, 64, "fp4", double_quant=False)
    assert packed.tolist() == [58]
    full = torch.cat([pair, torch.zeros(62, dtype=torch.float16)])
    assert quantize_4bit(full, 64, "fp4", double_quant=False)[0][0].item() == 58


def test_partial_last_block_edges_against_bitsandbytes(bnb_functional):
    """The known differences, pinned: bitsandbytes 0.50's CPU quantizer divides in a partial
    last block (byte 61 above) and stores max(absmax, 1e-38) for an all-zero partial block
    (torch.zeros(100): [0, 1e-38]; minqlora [0, 0], as it stores every all-zero block). The
    bytes of zeros agree, and both decode to zeros."""
    pair = torch.tensor([3.2578125, -1.900390625], dtype=torch.float16)
    ref_packed, _ = bnb_functional.quantize_4bit(pair, blocksize=64, quant_type="fp4")
    assert ref_packed.reshape(-1).tolist() == [61]
    full = torch.cat([pair, torch.zeros(62, dtype=torch.float16)])
    assert bnb_functional.quantize_4bit(full, blocksize=64, quant_type="fp4")[0][0].item() == 58
    zeros = torch.zeros(100)
    packed, state = quantize_4bit(zeros, 64, double_quant=False)
    ref_packed, ref = bnb_functional.quantize_4bit(zeros, blocksize=64, quant_type="nf4")
    assert state.absmax.tolist() == [0.0, 0.0] and ref.absmax[1].item() == pytest.approx(1e-38)
    assert torch.equal(packed, ref_packed.reshape(-1)) and (packed == 0x77).all()
    assert (decode_4bit(packed, state) == 0).all()


def test_quant_state_equality_is_format_and_bytes():
    """Item 16: == raised 'Boolean value of Tensor ... is ambiguous'. Equal: same format and
    the same bytes in every tensor (wherever they are); otherwise not equal; never an error."""
    x = gaussian((33, 64))
    (_, a), (_, b) = quantize_4bit(x), quantize_4bit(x.clone())
    assert a == b and a.to("cpu") == b and not (a != b)
    assert a != quantize_4bit(x * 2)[1]                               # other bytes
    assert a != quantize_4bit(x, quant_type="fp4")[1]                 # other format
    assert a != quantize_4bit(x, double_quant=False)[1] and a != None  # noqa: E711
    assert a != tampered(a, offset=a.offset.double())                  # same value, other dtype
    assert tampered(a, offset=torch.tensor(-0.0)) != tampered(a, offset=torch.tensor(0.0))
    assert a.to("meta") != b.to("meta")                               # no bytes to compare
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)


def quantize_step_by_step(x, blocksize, code):
    """quantize_4bit's bytes and float32 absmax as lessons 02-03 write them, in one piece:
    absmax, s = clamp(x * (1/absmax), -1, 1), bucketize on the sorted code's midpoints, back to
    code order, pack (the library's chunks and its grid lookup must give exactly this)."""
    flat = x.reshape(-1).float()
    n, pad = flat.numel(), -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    s = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    sorted_code, index_of = torch.sort(code, stable=True)
    q = index_of[torch.bucketize(s[: n + n % 2], (sorted_code[:-1] + sorted_code[1:]) / 2)]
    return ((q[0::2] << 4) | q[1::2]).to(torch.uint8), absmax


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), log2_bs=st.integers(1, 12), quant_type=st.sampled_from(list(CODES)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       on_midpoints=st.booleans())
def test_quantize_4bit_gives_the_step_by_step_bytes(n, log2_bs, quant_type, dtype, on_midpoints):
    """Random weights, or weights that sit exactly on the code's midpoints (times a block's
    absmax of 1), in every input dtype, every blocksize and code, odd and partial sizes."""
    code = get_code(quant_type)
    x = gaussian((n,), seed=n) * 3
    if on_midpoints and n:
        c = code.sort().values
        edges = torch.cat([(c[:-1] + c[1:]) / 2, torch.tensor([1.0])])
        x = edges[torch.arange(n) % edges.numel()]
    x = x.to(dtype)
    packed, state = quantize_4bit(x, 2 ** log2_bs, quant_type, double_quant=False)
    want_packed, want_absmax = quantize_step_by_step(x, 2 ** log2_bs, code)
    assert torch.equal(packed, want_packed)
    assert torch.equal(state.absmax.view(torch.int32), want_absmax.view(torch.int32))


def test_quantize_4bit_is_the_same_in_chunks_as_in_one_piece(monkeypatch):
    """QUANTIZE_CHUNK values per step: many chunks plus a partial one, a partial last block, an odd
    count, a blocksize larger than a chunk, FP4's unsorted table; double quantization too."""
    from minqlora import quant_state
    x = gaussian((7, 333), seed=5).bfloat16()
    for blocksize, quant_type in ((64, "nf4"), (64, "fp4"), (1024, "int4"), (2, "nf4")):
        whole = quantize_4bit(x, blocksize, quant_type)
        monkeypatch.setattr(quant_state, "QUANTIZE_CHUNK", 256)
        chunked = quantize_4bit(x, blocksize, quant_type)
        monkeypatch.undo()
        assert torch.equal(chunked[0], whole[0])
        for name in ("absmax", "offset"):
            assert torch.equal(getattr(chunked[1], name), getattr(whole[1], name))
        assert torch.equal(chunked[1].state2.absmax, whole[1].state2.absmax)
