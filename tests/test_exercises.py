"""The lessons' exercise checks (minqlora/exercises/): each passes the reference solution, gives
its targeted hint for each typical wrong answer, says "no answer yet" for None and "not
implemented yet" for a stub, and never raises on a bad answer."""
import ast
import importlib
import inspect
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
        n = len(inspect.signature(check).parameters)
        if "answer" in inspect.signature(check).parameters:
            continue
        ok, out = verdict(capsys, check, *[stub] * n)
        assert ok is False and "not implemented yet" in out, (module, name, out)


@pytest.mark.parametrize("module", MODULES)
def test_bad_types_give_a_verdict_not_an_exception(module, capsys):
    for name, check in checks(module):
        n = len(inspect.signature(check).parameters)
        for bad in ("abc", 3, [1, 2], {"x": 1}, object()):
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
