"""Property-based fuzzing of every public quantize / dequantize pair and every CPU backend
(issue 10): random shapes, dtypes, scales, blocksizes, codes and tampered states. The one
property: a correct result or a clear error (ValueError / TypeError, or the project's own
exceptions), never an IndexError, RuntimeError, ZeroDivisionError or AttributeError from
inside, and never a wrong answer. "Correct" is checked against references written here, apart
from the library: the error bound of nearest-code rounding, and the format's definition,
code[nibble] * absmax[block], decoded by hand.

The cuda backend runs only on a GPU (tests/test_cuda.py); "emulate" runs its kernel source, "cpp" the CPU decoder."""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minqlora.absmax import absmax_dequantize, absmax_quantize
from minqlora.backends import dequantize_4bit
from minqlora.blockwise import dequantize_blockwise, quantize_blockwise
from minqlora.double_quant import DYNAMIC, double_dequantize, double_quantize
from minqlora.nf4 import CODES, pack_4bit, unpack_4bit
from minqlora.quant_state import QuantState, decode_4bit, quantize_4bit

CLEAR = (ValueError, TypeError)
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NOT_FLOATS = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BLOCKSIZES = st.one_of(st.sampled_from([2, 4, 16, 32, 64, 128, 256, 4096]),
                       st.sampled_from([0, 1, -64, 48, 3, True, 64.0, "64", None]))
OUT_DTYPES = st.sampled_from([None, *FLOATS, torch.int32, "float32"])


@st.composite
def tensors(draw, finite_only=False):
    """A tensor of any rank up to 3 (some empty), of a float dtype (sometimes not), of
    magnitudes from subnormal to float32's maximum (float64: beyond), sometimes non-finite
    or non-contiguous."""
    shape = draw(st.one_of(st.lists(st.integers(0, 12), max_size=3),
                           st.tuples(st.integers(0, 3000))))
    seed = draw(st.integers(0, 2 ** 16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x * draw(st.sampled_from([1e-42, 1e-6, 1.0, 1e4, 1e38, 1e300]))
    if x.numel() and not finite_only and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(
            [math.nan, math.inf, -math.inf]))
    dtype = draw(st.sampled_from(FLOATS * 3 + [torch.float8_e4m3fn] + NOT_FLOATS))
    x = x.to(dtype) if dtype != torch.bool else x > 0
    if x.dim() == 2 and draw(st.booleans()):
        x = x.t()                                        # non-contiguous
    return x


def valid_input(x) -> bool:
    """What the quantizers promise to take: finite floats within float32's range."""
    if not x.is_floating_point():
        return False
    xf = x.double()
    return bool(torch.isfinite(xf).all()) and bool((xf.abs() <= torch.finfo(torch.float32).max)
                                                   .all())


def outcome(fn):
    """('ok', result) or ('error', exception) for a clear error; anything else fails the test."""
    try:
        return "ok", fn()
    except CLEAR as e:
        assert str(e), "an error must say what was wrong"
        return "error", e


def bound(x, absmax_hat, code, blocksize, out_dtype):
    """|x - x_hat| allowed for nearest-code rounding with block constants absmax_hat (decoded):
    half the widest gap of the code (or the distance from [-1, 1] to its ends), times the block's
    absmax, plus what absmax_hat misses of the true absmax, plus the output dtype's rounding. A
    block whose absmax is below TINY = 1e-38 is scaled by 1/TINY, as bitsandbytes does, so it
    may decode to about 0: up to its absmax is allowed there."""
    c = code.double().sort().values
    half_gap = max(((c[1:] - c[:-1]) / 2).max().item(), 1 - c[-1].item(), 1 + c[0].item())
    flat = x.double().reshape(-1)
    n = flat.numel()
    absmax = torch.nn.functional.pad(flat.abs(), (0, -n % blocksize)).view(-1, blocksize).amax(1)
    per = lambda t: t.double().repeat_interleave(blocksize)[:n]          # noqa: E731
    info = torch.finfo(out_dtype)                 # its rounding: relative, and subnormal steps
    eps = info.eps + info.eps * info.tiny / flat.abs().clamp(min=1e-300)
    return (half_gap * per(absmax) * (1 + 1e-6) + (per(absmax) - per(absmax_hat)).abs()
            + flat.abs() * 2 * eps + 1e-44 + per(absmax) * (per(absmax) < 1e-38))


def by_hand(packed, state, dtype):
    """The format, decoded here: code[nibble] * absmax[i // blocksize] in float32, cast once;
    None where a nibble has no code entry (a hand-made state can hold one)."""
    n = state.shape.numel()
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[:n]
    if n and int(nibbles.max()) >= state.code.numel():
        return None
    if state.state2 is not None:
        inner = state.state2
        scale = inner.absmax.float().repeat_interleave(inner.blocksize)[:state.absmax.numel()]
        absmax = inner.code.float()[state.absmax.long()] * scale + state.offset.float()
    else:
        absmax = state.absmax.float()
    values = state.code.float()[nibbles.long()] * absmax.repeat_interleave(state.blocksize)[:n]
    return values.to(dtype or state.dtype).reshape(state.shape)


def bits(t):
    return t.reshape(-1).contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                            8: torch.int64}[t.element_size()])


@SETTINGS
@given(x=tensors(), bits_=st.one_of(st.integers(-1, 18), st.sampled_from([8.0, "8", None])),
       dtype=OUT_DTYPES)
def test_absmax_pair(x, bits_, dtype):
    got = outcome(lambda: absmax_quantize(x, bits_))
    good_bits = isinstance(bits_, int) and 2 <= bits_ <= 16
    assert (got[0] == "ok") == (valid_input(x) and good_bits), got
    if got[0] == "error":
        return
    q, absmax = got[1]
    levels = 2 ** (bits_ - 1) - 1
    assert q.shape == x.shape and not q.is_floating_point() and (q.abs() <= levels).all()
    assert absmax.item() == x.double().abs().max().float().item() if x.numel() else True
    back = outcome(lambda: absmax_dequantize(q, absmax, bits_, dtype))
    if back[0] == "error":
        assert not (dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point)
        return
    x_hat, x32 = back[1], absmax_dequantize(q, absmax, bits_)
    assert x_hat.dtype == (dtype or torch.float32)
    assert torch.equal(bits(x_hat), bits(x32.to(x_hat.dtype)))        # float32, cast once
    err = (x32.double() - x.double()).abs()
    eps32, step = torch.finfo(torch.float32).eps, 2.0 ** -149     # float32: relative, subnormal
    assert (err <= absmax.double() / levels / 2 * (1 + 1e-6) + x.double().abs() * 4 * eps32
            + (q.double().abs() + 1) * step).all()


CODE_CHOICES = st.sampled_from(["dynamic", "nf4", "int4", "ternary", "unsorted", "outside",
                                "nan", "2-D", "int", "one", "list"])


def make_code(name):
    return {"dynamic": DYNAMIC, "nf4": CODES["nf4"], "int4": CODES["int4"],
            "ternary": torch.tensor([-1.0, 0.0, 1.0]), "unsorted": torch.tensor([0.0, -1.0, 1.0]),
            "outside": torch.tensor([-2.0, 0.0, 1.0]), "nan": torch.tensor([-1.0, math.nan, 1.0]),
            "2-D": torch.tensor([[-1.0, 1.0]]), "int": torch.tensor([-1, 0, 1]),
            "one": torch.tensor([0.5]), "list": [-1.0, 0.0, 1.0]}[name]


@SETTINGS
@given(x=tensors(), code=CODE_CHOICES, blocksize=BLOCKSIZES, dtype=OUT_DTYPES)
def test_blockwise_pair(x, code, blocksize, dtype):
    table = make_code(code)
    got = outcome(lambda: quantize_blockwise(x, table, blocksize))
    good_block = type(blocksize) is int and blocksize >= 2 and not blocksize & (blocksize - 1)
    good_code = code in ("dynamic", "nf4", "int4", "ternary")
    assert (got[0] == "ok") == (valid_input(x) and good_block and good_code), got
    if got[0] == "error":
        return
    q, absmax = got[1]
    assert q.dtype == torch.uint8 and q.shape == x.shape and (q.long() < table.numel()).all()
    back = outcome(lambda: dequantize_blockwise(q, absmax, table, blocksize, dtype))
    if back[0] == "error":
        assert dtype is not None and not (isinstance(dtype, torch.dtype)
                                          and dtype.is_floating_point)
        return
    x_hat, x32 = back[1], dequantize_blockwise(q, absmax, table, blocksize)
    assert x_hat.shape == x.shape and torch.equal(bits(x_hat), bits(x32.to(x_hat.dtype)))
    err = (x32.double() - x.double()).abs().reshape(-1)
    assert (err <= bound(x, absmax, table, blocksize, torch.float32)).all()


@SETTINGS
@given(n=st.integers(0, 600), blocksize=st.sampled_from([2, 16, 64]),
       tamper=st.sampled_from(["none", "negative", "too big", "float", "bool", "absmax short",
                               "absmax list", "blocksize 0", "code int"]),
       seed=st.integers(0, 1000))
def test_dequantize_blockwise_with_tampered_inputs(n, blocksize, tamper, seed):
    """Indices, absmax and code as a caller may pass them: right, or refused; never index -1
    read as the last code or a float index truncated."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 256, (n,), generator=g)
    absmax = torch.rand(-(-n // blocksize), generator=g)
    code, bs = DYNAMIC, blocksize
    if tamper == "negative" and n:
        indices[n // 2] = -1
    elif tamper == "too big" and n:
        indices[0] = 256
    elif tamper == "float":
        indices = indices.float()
    elif tamper == "bool":
        indices = indices > 100
    elif tamper == "absmax short":
        absmax = absmax[:-1] if absmax.numel() else torch.ones(1)
    elif tamper == "absmax list":
        absmax = absmax.tolist()
    elif tamper == "blocksize 0":
        bs = 0
    elif tamper == "code int":
        code = torch.arange(256)
    got = outcome(lambda: dequantize_blockwise(indices, absmax, code, bs))
    harmless = tamper == "none" or (not n and tamper in ("negative", "too big"))
    assert (got[0] == "ok") == harmless, (tamper, got)
    if got[0] == "ok":
        want = DYNAMIC[indices.long()] * absmax.repeat_interleave(blocksize)[:n]
        assert torch.equal(got[1], want)


@pytest.fixture(scope="module")
def backends(request):
    """decode_4bit and the CPU backends; "emulate" and "cpp" only where a C++ compiler builds
    them."""
    names = {"decode_4bit": lambda p, s, d: decode_4bit(p, s, d),
             "torch": lambda p, s, d: dequantize_4bit(p, s, d, backend="torch")}
    for backend, fixture in (("emulate", "emulation"), ("cpp", "decoder")):
        try:
            request.getfixturevalue(fixture)
            names[backend] = lambda p, s, d, b=backend: dequantize_4bit(p, s, d, backend=b)
        except pytest.skip.Exception:
            pass
    return names


@SETTINGS
@given(x=tensors(), blocksize=BLOCKSIZES,
       quant_type=st.sampled_from(["nf4", "fp4", "int4", "nf5", None]),
       double_quant=st.booleans(), dtype=OUT_DTYPES)
def test_quantize_4bit_and_every_decoder(backends, x, blocksize, quant_type, double_quant, dtype):
    got = outcome(lambda: quantize_4bit(x, blocksize, quant_type, double_quant))
    good_block = type(blocksize) is int and blocksize >= 2 and not blocksize & (blocksize - 1)
    expect_ok = valid_input(x) and good_block and quant_type in CODES
    if got[0] == "error" and expect_ok:                   # the one refusal of a valid input:
        assert "double quantized" in str(got[1])           # a double-quantized constant near
        return                                             # float32's max would overflow
    assert (got[0] == "ok") == expect_ok, got
    if got[0] == "error":
        return
    packed, state = got[1]
    assert packed.dtype == torch.uint8 and packed.numel() == -(-x.numel() // 2)
    assert state.shape == x.shape and state.dtype == x.dtype
    assert not any(t.requires_grad for t in (state.absmax, state.code))
    out_ok = dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point
    want = by_hand(packed, state, dtype) if out_ok else None
    for name, decode in backends.items():
        result = outcome(lambda: decode(packed, state, dtype))
        assert (result[0] == "ok") == out_ok, (name, result)
        if out_ok:
            assert result[1].shape == x.shape and torch.equal(bits(result[1]), bits(want)), name
    if out_ok:                      # the bound on a float32 decode (want: it, cast once)
        want32 = by_hand(packed, state, torch.float32)
        assert torch.equal(bits(want), bits(want32.to(want.dtype)))
        err = (want32.double() - x.double()).abs().reshape(-1)
        assert (err <= bound(x, state.absmax_fp32(), state.code, blocksize, torch.float32)).all()


MUTATIONS = st.lists(st.sampled_from([
    "blocksize", "shape", "dtype", "code", "absmax", "offset", "state2", "state2_blocksize",
    "state2_absmax", "state2_code", "packed", "absmax_values"]), min_size=1, max_size=3)


@SETTINGS
@given(n=st.integers(1, 700), blocksize=st.sampled_from([2, 32, 64]), nested=st.booleans(),
       quant_type=st.sampled_from(list(CODES)), mutations=MUTATIONS, data=st.data())
def test_tampered_states_are_refused_alike_or_decoded_right(backends, n, blocksize, nested,
                                                           quant_type, mutations, data):
    """A valid state, changed in one to three ways. Every decoder refuses it with a clear error
    (the same check_state runs first in each), or every decoder returns the same bits as the
    format decoded by hand. The one exception: a hand-made nibble with no code entry (a code of
    fewer than 16 values), which the definition refuses and the fast backends, reading no
    values, decode as a code padded with zeros to 16."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, state = quantize_4bit(x, blocksize, quant_type, double_quant=nested)
    fields = dict(state.__dict__)
    inner = dict(state.state2.__dict__) if nested else None
    draw = data.draw
    for m in mutations:
        if m == "blocksize":
            fields["blocksize"] = draw(st.sampled_from([0, -2, 3, 48, 2 * blocksize, 1024, 2.0]))
        elif m == "shape":
            fields["shape"] = draw(st.sampled_from([(n,), [n], (n + 1,), (1, n), (n - 1,),
                                                    (-n,), "n", torch.Size([2 * n])]))
        elif m == "dtype":
            fields["dtype"] = draw(st.sampled_from([torch.int32, torch.bool, "float32", None,
                                                    torch.float64, torch.bfloat16]))
        elif m == "code":
            c = state.code
            fields["code"] = draw(st.sampled_from([c[:-1], torch.cat([c, torch.zeros(1)]),
                                                   c.long(), c[None], torch.zeros(1), [0.0] * 16,
                                                   c.double(), c[:8]]))
        elif m == "absmax":
            a = state.absmax
            fields["absmax"] = draw(st.sampled_from([a[:-1], torch.cat([a, a[:1]]), a.float(),
                                                     a.to(torch.uint8), None, a.tolist()]))
        elif m == "absmax_values":
            a = state.absmax
            fields["absmax"] = (torch.randint_like(a, 0, 256) if a.dtype == torch.uint8
                                else a * draw(st.sampled_from([0.0, -1.0, 1e30, 1e-30])))
        elif m == "offset":
            fields["offset"] = draw(st.sampled_from([None, torch.zeros(2), torch.tensor(1),
                                                     torch.tensor([0.5]), torch.tensor(1e38)]))
        elif m == "state2":
            inner = None if inner is not None else dict(absmax=torch.ones(1), code=DYNAMIC,
                                                        blocksize=256, shape=torch.Size([1]),
                                                        dtype=torch.float32)
        elif inner is not None and m == "state2_blocksize":
            inner["blocksize"] = draw(st.sampled_from([0, 3, 128, 512, 256.0]))
        elif inner is not None and m == "state2_absmax":
            a2 = state.state2.absmax if nested else torch.ones(1)
            inner["absmax"] = draw(st.sampled_from([a2[:0], a2.half(), a2.int(), a2 * 2]))
        elif inner is not None and m == "state2_code":
            inner["code"] = draw(st.sampled_from([DYNAMIC[:128], DYNAMIC.double(), DYNAMIC[None],
                                                  DYNAMIC.flip(0), DYNAMIC.long()]))
        elif m == "packed":
            packed = draw(st.sampled_from([packed[:-1], torch.cat([packed, packed[:1]]),
                                           packed.int(), packed.float(), packed[None],
                                           torch.stack([packed, packed], 1)[:, 0],
                                           torch.randint_like(packed, 0, 256)]))
    try:
        tampered = QuantState(**{**fields, "state2": None if inner is None
                                 else QuantState(**inner)})
    except CLEAR:
        return                                             # refused when made: fine
    dtype = data.draw(st.sampled_from([None, torch.float32, torch.bfloat16]))
    results = {name: outcome(lambda: decode(packed, tampered, dtype))
               for name, decode in backends.items()}
    kinds = {name: r[0] for name, r in results.items()}
    if all(k == "error" for k in kinds.values()):
        return
    fast = {name: r for name, r in results.items() if name != "decode_4bit"}
    assert all(r[0] == "ok" for r in fast.values()), kinds
    want = by_hand(packed, tampered, dtype)
    if want is None:                                        # a nibble without a code entry
        assert kinds["decode_4bit"] == "error" and "outside" in str(results["decode_4bit"][1])
        outs = [r[1] for r in fast.values()]
        assert all(torch.equal(bits(o), bits(outs[0])) for o in outs)
        return
    for name, (kind, out) in results.items():
        assert kind == "ok", (name, out)
        assert out.shape == tampered.shape and torch.equal(bits(out), bits(want)), name


@SETTINGS
@given(x=tensors(), blocksize=BLOCKSIZES)
def test_double_quantize_pair(x, blocksize):
    absmax = (x.abs() if x.is_floating_point() or x.is_complex() else x).reshape(-1)
    got = outcome(lambda: double_quantize(absmax, blocksize))
    good_block = type(blocksize) is int and blocksize >= 2 and not blocksize & (blocksize - 1)
    assert (got[0] == "ok") == (valid_input(absmax) and good_block), got
    if got[0] == "error":
        return
    qabsmax, absmax2, offset = got[1]
    assume(torch.isfinite(absmax2).all())
    back = double_dequantize(qabsmax, absmax2, offset, blocksize)
    flat = absmax.double().reshape(-1)
    err = (back.double() - flat).abs()
    assert (err <= bound(flat - offset.double(), absmax2, DYNAMIC, blocksize, torch.float32)
            + flat.abs() * 1e-6 + offset.double().abs() * 1e-6).all()


@SETTINGS
@given(values=st.lists(st.integers(-3, 20), max_size=41),
       dtype=st.sampled_from([torch.uint8, torch.int64, torch.int32, torch.float32, torch.bool]),
       n=st.integers(-2, 90))
def test_pack_unpack_pair(values, dtype, n):
    indices = torch.tensor(values, dtype=torch.int64).to(dtype)
    got = outcome(lambda: pack_4bit(indices))
    valid = dtype not in (torch.float32, torch.bool) and all(0 <= v <= 15 for v in
                                                             indices.long().tolist())
    assert (got[0] == "ok") == valid, got
    if got[0] == "ok":
        assert torch.equal(unpack_4bit(got[1], len(values)).long(), indices.long())
        back = outcome(lambda: unpack_4bit(got[1], n))
        assert (back[0] == "ok") == (0 <= n <= 2 * got[1].numel()), back
