"""Checks for lesson 11's exercises (is NF4 optimal?); the library is the answer key.

>>> exercise_3(dict(blocksize=63.02, lower_error="NF4+DQ"))
Exercise 3: answer_3['blocksize'] should be a whole number, got 63.02.
False
"""
import numpy as np
import torch

from ..backends import dequantize_4bit
from ..codebooks import _below, expected_mse, lloyd_max_code
from ..compare import compare
from ..nf4 import NF4
from ..quant_state import quantize_4bit
from ._core import Stop, call, choice, exercise, no_answer, numbers, whole


@exercise(1, keys=["code", "closer_at"])
def exercise_1(answer):
    """answer = dict(code=[16 sorted values], closer_at=64 or 256)."""
    closer_at = choice(answer, "closer_at", [64, 256])
    code = numbers(answer["code"] if not isinstance(answer["code"], torch.Tensor)
                   else answer["code"].reshape(-1))
    if code is None or len(code) != 16 or any(b <= a for a, b in zip(code, code[1:])):
        return ["code: a 4-bit code has 16 values, sorted from lowest to highest (section 3's "
                "lloyd returns them sorted)"]
    hints = []
    gap = (torch.tensor(code) - lloyd_max_code(256)).abs().max().item()
    if gap >= 1e-3:
        near_64 = (torch.tensor(code) - lloyd_max_code(64)).abs().max().item() < 1e-3
        hints.append("code: that is the limit for blocks of 64; build the tables for blocksize 256 "
                     "(weighted_tables(256))" if near_64 else
                     "code: build the tables for blocksize 256 (each value counts M^2) and run "
                     "Lloyd's iteration for enough steps")
    gaps = {b: expected_mse(NF4, b) / expected_mse(lloyd_max_code(b), b) for b in (64, 256)}
    if closer_at != min(gaps, key=gaps.get):
        hints.append("closer_at: compare mq.expected_mse(mq.NF4, B) / mq.expected_mse(your "
                     "Lloyd-Max code, B) at B = 64 and at B = 256")
    return hints


@exercise(2)
def exercise_2(answer):
    """answer = a weight tensor (at least 64 x 64) on which INT4 beats NF4 at blocksize 64."""
    no_answer(answer)
    if not (isinstance(answer, torch.Tensor) and answer.is_floating_point()):
        raise Stop(f"answer_{{n}} should be a floating-point tensor, got {type(answer).__name__}.")
    if answer.numel() < 64 * 64 or not bool(torch.isfinite(answer).all()):
        raise Stop("answer_{n} should hold at least 64 x 64 finite values (the exercise asks for "
                   "1024 x 1024).")
    w = answer.detach().float()
    errors = {}
    for quant_type in ("int4", "nf4"):
        packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
        errors[quant_type] = (dequantize_4bit(packed, state).float() - w).pow(2).mean().item()
    if errors["int4"] < errors["nf4"]:
        return True
    return ["NF4 still wins: it wins when the scaled values pile up near 0. Try values that do "
            "not (spread evenly over an interval)"]


@exercise(3, keys=["blocksize", "lower_error"])
def exercise_3(answer):
    """answer = dict(blocksize=a power of two, lower_error="NF4+DQ" or "NVFP4")."""
    blocksize = whole(answer, "blocksize", lowest=2, power_of_two=True)
    lower = choice(answer, "lower_error", ["NF4+DQ", "NVFP4"])
    nf4_dq = 4 + 8 / 64 + 32 / (64 * 256)
    if abs(4 + 8 / blocksize - nf4_dq) >= 0.01:
        yield ("blocksize: both spend one byte per block; solve 8 / B = 8/64 + 32/(64 * 256) "
               "and take the power of two nearest the answer")
    gauss = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    errors = compare(gauss, blocksizes=(64,), formats=("NF4+DQ", "NVFP4"))
    if lower != min(("NF4+DQ", "NVFP4"), key=lambda f: errors[f, 64][0]):
        yield ("lower_error: compare(gauss, blocksizes=(64,), formats=('NF4+DQ', 'NVFP4')) "
               "and read the two relative errors")


def _grid(blocksize, cells=4000):
    """The M^2-weighted block distribution as weighted points: each of `cells` grid cells of
    [-1, 1] at its mean, with its mass, and the two point masses at -1 and +1."""
    edges = np.linspace(-1, 1, cells + 1)
    p0, p1, _, tip = _below(edges, blocksize, 2)
    mass, first = np.diff(p0), np.diff(p1)
    s = np.r_[-1.0, first / mass, 1.0]
    return torch.tensor(s), torch.tensor(np.r_[tip, mass, tip])


def _small_cases():
    """(hint if wrong here, code, s, weight, the step's result)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)                  # noqa: E731
    return [
        ("edges at the midpoints between neighbouring codes; each code moves to the mean of the "
         "values in its cell", t(-0.5, 0.5), t(-1.0, -0.2, 0.1, 0.9), t(1, 1, 1, 1), t(-0.6, 0.5)),
        ("each value counts by its weight: a code moves to sum(w * s) / sum(w) over its cell",
         t(-0.5, 0.5), t(-1.0, -0.2, 0.1, 0.9), t(3, 1, 1, 1), t(-0.8, 0.5)),
        ("a value exactly on a midpoint belongs to the lower cell (lesson 02's rule: count the "
         "midpoints strictly below it)", t(0.0, 1.0), t(0.0, 0.5, 1.0), t(1, 1, 1), t(0.25, 1.0)),
        ("a cell with no values keeps its code (no 0 / 0)", t(-0.9, 0.0, 0.9), t(-1.0, 1.0),
         t(1, 1), t(-1.0, 0.0, 1.0)),
    ]


def _lloyd_step(code, s, weight):
    """The definition: edges at midpoints (a tie goes down), each code to its cell's weighted
    mean, an empty cell's code unchanged."""
    cell = torch.bucketize(s, (code[:-1] + code[1:]) / 2)
    mass = torch.zeros(len(code), dtype=s.dtype).index_add_(0, cell, weight)
    first = torch.zeros(len(code), dtype=s.dtype).index_add_(0, cell, weight * s)
    return torch.where(mass > 0, first / mass.clamp(min=1e-300), code)


@exercise(4)
def exercise_4(lloyd_step):
    """Your lloyd_step(code, s, weight) -> the new code: on four small cases, then one step from
    NF4 on the M^2-weighted block distribution (B = 64 and 256), and mq.lloyd_max_code(B) must be
    a fixed point of your step (to the grid's resolution)."""
    for hint, code, s, weight, want in _small_cases():
        out = call(lloyd_step, "lloyd_step", code.clone(), s.clone(), weight.clone())
        got = numbers(out.reshape(-1) if isinstance(out, torch.Tensor) else out)
        if got is None or len(got) != len(code):
            return [f"lloyd_step returns one new value per code ({len(code)} here)"]
        if not np.allclose(got, want.tolist(), atol=1e-9):
            return [hint]
    for blocksize in (64, 256):
        s, weight = _grid(blocksize)
        for start in (NF4.double(), lloyd_max_code(blocksize).double()):
            out = call(lloyd_step, "lloyd_step", start.clone(), s, weight)
            got = torch.as_tensor(out, dtype=torch.float64).reshape(-1)
            if got.shape != start.shape or not torch.allclose(got, _lloyd_step(start, s, weight),
                                                              atol=1e-9):
                return [f"one step from a 16-value code on blocks of {blocksize} differs from "
                        "Lloyd's: edges at midpoints, each code to its cell's weighted mean"]
        lm = lloyd_max_code(blocksize).double()
        assert (_lloyd_step(lm, s, weight) - lm).abs().max() < 1e-3     # the library's fixed point
    return True
