"""Checks for lesson 01's exercises (absmax quantization); the library is the answer key.

>>> exercise_1(None)
Exercise 1: no answer yet. Set answer_1 as the exercise says and run the cell again.
False
"""
import torch

from ..absmax import absmax_dequantize, absmax_quantize
from ._core import Stop, all_close, call, close, diagnose, exercise, number, numbers, whole


@exercise(1, keys=["absmax", "q", "x_hat"])
def exercise_1(answer):
    """answer = dict(absmax=..., q=[4 integers], x_hat=[4 values to 4 decimals])."""
    x = torch.tensor([0.3, -1.2, 0.75, 0.05])
    q, absmax = absmax_quantize(x, bits=4)
    if not close(number(answer, "absmax"), absmax.item()):
        yield "absmax is the largest magnitude |x| in the tensor (a positive number)"
    if numbers(answer["q"]) != q.float().tolist():
        yield ("q = round(x / absmax * 7): scale so that absmax lands on 7, then round each "
               "value to the nearest integer")
    if not all_close(answer["x_hat"], absmax_dequantize(q, absmax, bits=4).tolist(), abs_tol=6e-5):
        yield "x_hat = q * absmax / 7, for each of the four values, to 4 decimals"


@exercise(2, keys=["lowest", "highest", "count"])
def exercise_2(answer):
    """answer = dict(lowest=..., highest=..., count=...): the int4 integers the 1000 weights use."""
    w1 = torch.randn(1000, generator=torch.Generator().manual_seed(1))   # = manual_seed(1); randn
    q, _ = absmax_quantize(torch.cat([w1, torch.tensor([10.0])]), bits=4)
    used = q[:-1].unique()
    if (whole(answer, "lowest") != used.min().item()
            or whole(answer, "highest") != used.max().item()):
        yield ("the outlier 10.0 is the absmax, so a weight w gets round(w * 7 / 10); apply "
               "that to the smallest and the largest of the 1000 weights")
    if whole(answer, "count", lowest=0) != used.numel():
        yield "count the distinct integers of q without the outlier's own slot"


@exercise(3, keys=["choice", "worst_int8", "worst_int4"])
def exercise_3(answer):
    """answer = dict(choice="a".."d", worst_int8=..., worst_int4=...) for x in [-1, 1]."""
    if answer["choice"] not in ("a", "b", "c", "d"):
        raise Stop(f"answer_{{n}}['choice'] should be one of 'a', 'b', 'c', 'd', "
                   f"got {answer['choice']!r}.")
    bound = {bits: 1 / (2 * (2 ** (bits - 1) - 1)) for bits in (8, 4)}   # absmax = 1
    if answer["choice"] != "b":
        yield ("the grid points are absmax / levels apart; how far can a value be from the "
               "nearer of its two neighbours?")
    for bits in (8, 4):
        if not 0.99 * bound[bits] <= number(answer, f"worst_int{bits}") <= bound[bits] * (1 + 1e-5):
            yield (f"worst_int{bits}: measure max |x - x_hat| over torch.linspace(-1, 1, "
                   f"100_001) quantized with bits={bits}")


@exercise(4, keys=["predicted", "measured"])
def exercise_4(answer):
    """answer = dict(predicted=..., measured=...): the RMSE of int4 on uniform values in [-1, 1]."""
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(4)) * 2 - 1
    q, absmax = absmax_quantize(u, bits=4)
    measured = (u - absmax_dequantize(q, absmax, bits=4)).double().pow(2).mean().sqrt().item()
    predicted = (absmax.item() / 7) / 12 ** 0.5            # step s = absmax / levels
    if not close(number(answer, "predicted"), predicted, rel=0.01):
        yield ("a uniform error on [-s/2, s/2] has variance s^2 / 12; the step s is "
               "absmax / 7")
    if not close(number(answer, "measured"), measured, rel=0.03):
        yield ("measured: quantize torch.rand(100_000) * 2 - 1 to int4 and take "
               "sqrt(mean((u - u_hat)^2))")


def _cases():
    """(what, x, bits): the inputs the learner's functions must get right."""
    g = torch.Generator().manual_seed(5)
    return [("x = [-0.976, 0.187, 0.886], bits=8", torch.tensor([-0.976, 0.187, 0.886]), 8),
            ("x = [-0.976, 0.187, 0.886], bits=4", torch.tensor([-0.976, 0.187, 0.886]), 4),
            ("a tensor whose absmax is a negative value, [-2.0, 0.5, 1.2], bits=4",
             torch.tensor([-2.0, 0.5, 1.2]), 4),
            ("1000 Gaussian weights, bits=8", torch.randn(1000, generator=g), 8),
            ("a (16, 8) matrix, bits=4", torch.randn(16, 8, generator=g), 4),
            ("an all-zero tensor (absmax 0), bits=8", torch.zeros(5), 8)]


def _wrong_quantize(x, bits):
    """{hint: (q, absmax) that mistake gives} for the usual mistakes of absmax quantization."""
    levels, a = 2 ** (bits - 1) - 1, x.abs().max()
    safe = a if a > 0 else torch.tensor(1.0)
    return {
        "q must be whole numbers: round x / absmax * levels to the nearest integer (torch.round)":
            (x / safe * levels, a),
        "round to the nearest integer, not down or towards zero (torch.round, not floor or int())":
            (torch.trunc(x / safe * levels), a),
        "levels = 2^(bits-1) - 1 (7 for int4, 127 for int8): the grid is symmetric about 0":
            (torch.round(x / safe * (2 ** (bits - 1))), a),
        "levels = 2^(bits-1) - 1, not 2^bits - 1: half the codes are negative":
            (torch.round(x / safe * (2 ** bits - 1)), a),
        "absmax is the largest magnitude, max |x|, not the largest value max x":
            (torch.round(x / x.max() * levels), x.max()),
    }


@exercise(5)
def exercise_5(quantize, dequantize):
    """Your quantize(x, bits) -> (q, absmax) and dequantize(q, absmax, bits) -> x_hat, checked
    against absmax_quantize / absmax_dequantize on several inputs, an all-zero tensor included."""
    hints = []
    for what, x, bits in _cases():
        out = call(quantize, "quantize", x.clone(), bits)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Stop("not yet.\n  hint: quantize should return a pair (q, absmax)")
        q, absmax = (torch.as_tensor(t, dtype=torch.float32) for t in out)
        q_ref, absmax_ref = absmax_quantize(x, bits)
        ok_absmax = absmax.numel() == 1 and close(absmax.item(), absmax_ref.item(), 1e-6, 0)
        if not (ok_absmax and q.shape == x.shape and torch.equal(q, q_ref.float())):
            same = lambda mine, bad: (mine[0].shape == bad[0].shape      # noqa: E731
                                      and torch.allclose(mine[0], bad[0].float(), atol=1e-4))
            found = diagnose((q, absmax), _wrong_quantize(x, bits), same)
            if not torch.isfinite(q).all():
                found.append("an all-zero tensor has absmax 0: do not divide by it, give q = 0 "
                             "there (torch.where(absmax > 0, ...))")
            if q.shape != x.shape:
                found.append("q should have the shape of x (quantize every value, keep the shape)")
            hints += found or [f"quantize differs from the library on {what}"]
            continue
        x_hat = torch.as_tensor(call(dequantize, "dequantize", q_ref.clone(), absmax_ref, bits))
        x_ref = absmax_dequantize(q_ref, absmax_ref, bits)
        if x_hat.shape != x.shape or not torch.allclose(x_hat.float(), x_ref, rtol=1e-5,
                                                        atol=1e-7):
            if not any(h.startswith("dequantize") for h in hints):
                hints.append("dequantize: x_hat = q * absmax / levels (levels = 2^(bits-1) - 1), "
                             f"wrong on {what}")
    return list(dict.fromkeys(hints))                       # each hint once
