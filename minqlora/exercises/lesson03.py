"""Checks for lesson 03's exercises (the NF4 codebook); the library is the answer key.

>>> exercise_3("0xF0")
Exercise 3: not yet.
  hint: three 4-bit indices fill two bytes: give a list of two integers
False
"""
import torch

from ..blockwise import dequantize_blockwise, quantize_blockwise
from ..nf4 import CODES, NF4_OFFSET, nf4_code, pack_4bit
from ._core import call, choice, exercise, no_answer, number

OFFSETS = [0.90, 0.93, 0.95, 0.9677083, 0.98, 0.99]


def _relative_rmse(w, quant_type):
    """RMSE / std of w on the code at blocksize 64 (= mq.quantize_4bit without double quant)."""
    q, absmax = quantize_blockwise(w, CODES[quant_type], blocksize=64)
    w_hat = dequantize_blockwise(q, absmax, CODES[quant_type], 64)
    return ((w - w_hat).pow(2).mean().sqrt() / w.std()).item()


@exercise(1, keys=["normal", "laplace", "uniform", "why"])
def exercise_1(answer):
    """answer = dict(normal=..., laplace=..., uniform=..., why=...): the winner ("nf4" or "int4")
    on each distribution, and the choice "a", "b" or "c" that explains it."""
    g = torch.Generator().manual_seed(40)                 # its own draws: your seed is not needed
    n = 512 * 512
    samples = {"normal": torch.randn(n, generator=g),
               "laplace": (torch.empty(n).exponential_(generator=g)
                           - torch.empty(n).exponential_(generator=g)),
               "uniform": torch.rand(n, generator=g) * 2 - 1}
    for dist, w in samples.items():
        winner = min(["nf4", "int4"], key=lambda qt: _relative_rmse(w, qt))
        if str(choice(answer, dist, ["nf4", "int4"])).lower() != winner:
            yield (f"{dist}: compare RMSE / std of the two codebooks again (the smaller "
                   "wins)")
    if choice(answer, "why", ["a", "b", "c"]) != "b":
        yield ("why: a codebook does well where its codes are dense where the values are "
               "dense")


_sweep = {}


def _offset_sweep():
    """RMSE of NF4 built with each offset, on the exercise's weight (computed once)."""
    if not _sweep:
        w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(5))  # = manual_seed(5)
        for off in OFFSETS:
            code = nf4_code(off)
            q, absmax = quantize_blockwise(w, code, blocksize=64)
            w_hat = dequantize_blockwise(q, absmax, code, 64)
            _sweep[off] = (w - w_hat).pow(2).mean().sqrt().item()
    return _sweep


@exercise(2, keys=["best_offset", "why"])
def exercise_2(answer):
    """answer = dict(best_offset=..., why=...): the offset of the sweep with the lowest RMSE,
    and the choice "a", "b" or "c" that explains it."""
    sweep = _offset_sweep()
    best = number(answer, "best_offset")
    if best not in sweep:
        yield "best_offset must be one of the six offsets of the sweep"
    elif sweep[best] != min(sweep.values()):
        yield ("best_offset: measure the RMSE for every offset on the seeded weight and take "
               "the smallest")
    if choice(answer, "why", ["a", "b", "c"]) != "a":
        yield ("why: what does NF4's construction make equal, and is that the same as a "
               "small squared error? What does a block of 64 map to 1?")


@exercise(3)
def exercise_3(answer):
    """answer = the two bytes, e.g. [0x12, 0x34]."""
    no_answer(answer)
    expected = pack_4bit(torch.tensor([15, 0, 7])).tolist()
    try:
        mine = [int(b) for b in answer] if not isinstance(answer, (str, bytes, dict)) else None
    except (TypeError, ValueError):
        mine = None
    if mine is None or len(mine) != 2:
        return ["three 4-bit indices fill two bytes: give a list of two integers"]
    if not all(0 <= b <= 255 for b in mine):
        return ["a byte holds an integer from 0 to 255 (0x00 to 0xFF)"]
    hints = []
    if mine[0] != expected[0]:
        hints.append("byte 0 holds indices 0 and 1; element 0 goes in the HIGH nibble: "
                     "(index[0] << 4) | index[1]")
    if mine[1] != expected[1]:
        hints.append("byte 1 holds index 2 and a padding index 0 (an odd count is padded)")
    return hints


def _diagnose(code):
    """The hint for a 16-value table that is not NF4."""
    if not bool(torch.isfinite(code).all()):
        return ("norm.ppf(1) is infinite: the outermost probability is the offset, not 1; "
                "and the probabilities run down to 0.5, never below")
    if not torch.equal(code, code.sort().values):
        return "sort the 16 values (index 0 is -1, index 15 is +1)"
    if not torch.isclose(code.abs().max(), torch.tensor(1.0)):
        return "divide by the largest value, so the table spans exactly [-1, 1]"
    if code.min() > -0.999 or code.max() < 0.999:
        return "both ends must be exactly -1 and +1: normalise by the largest value"
    if not (code == 0).any():
        return "NF4 holds one exact 0 (the quantile of p = 0.5), added separately"
    positives, negatives = int((code > 0).sum()), int((code < 0).sum())
    if (positives, negatives) != (8, 7):
        return (f"8 positive values, 7 negative ones and a zero; yours has {positives} positive "
                f"and {negatives} negative")
    return ("the positive half is norm.ppf at the 8 probabilities torch.linspace(offset, 0.5, 9)"
            "[:-1], the negative half minus norm.ppf at torch.linspace(offset, 0.5, 8)[:-1]")


@exercise(4)
def exercise_4(build):
    """Your build(offset) -> the 16 NF4 values, checked against mq.nf4_code at three offsets."""
    for offset in (NF4_OFFSET, 0.95, 0.99):
        out = call(build, "build", offset)
        try:
            code = torch.as_tensor(out, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            return ["return the 16 values as a tensor (or a list of numbers)"]
        if code.numel() != 16:
            return [f"NF4 has 16 values (8 positive, 7 negative, one zero); yours has "
                    f"{code.numel()}"]
        if not torch.allclose(code, nf4_code(offset), rtol=0, atol=1e-6):
            if offset != NF4_OFFSET and torch.allclose(code, nf4_code(), rtol=0, atol=1e-6):
                return [f"right at 0.9677083, but offset={offset} gives the same table: build "
                        "the probabilities from the offset argument"]
            return [_diagnose(code)]
    return True
