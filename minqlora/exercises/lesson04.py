"""Checks for lesson 04's exercises (double quantization); the library is the answer key.

>>> exercise_3(dict(rmse_256=1e-3, rmse_64_dq=1e-3, smaller="c"))
Exercise 3: answer_3['smaller'] should be 'a' or 'b', got 'c'.
False
"""
import torch

from ..blockwise import dequantize_blockwise, quantize_blockwise
from ..double_quant import DYNAMIC, double_dequantize, double_quantize
from ..quant_state import decode_4bit, quantize_4bit
from ._core import Stop, call, choice, close, exercise, number, whole


def _section2_weight():
    """Section 2's W again: torch.manual_seed(1); torch.randn(4096, 4096) * 0.02."""
    return torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)) * 0.02


def _rmse(a, b):
    return (a - b).pow(2).mean().sqrt().item()


@exercise(1, keys=["b128", "b128_dq", "b32", "b32_dq"])
def exercise_1(answer):
    """answer = dict(b128=..., b128_dq=..., b32=..., b32_dq=...): bits per weight."""
    w_ = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(2))
    for key in ["b128", "b128_dq", "b32", "b32_dq"]:
        blocksize, dq = int(key[1:].split("_")[0]), key.endswith("_dq")
        bits = quantize_4bit(w_, blocksize=blocksize, double_quant=dq)[1].bits_per_param()
        if not close(number(answer, key), bits, rel=0, abs_tol=6e-5):
            parts = (f"an 8-bit qabsmax per block of {blocksize} and a float32 absmax2 per 256 "
                     "blocks" if dq else f"a float32 absmax per block of {blocksize}")
            yield (f"{key}: 4 bits of index plus {parts}, spread over the weights (to 4 "
                   "decimals or more)")


@exercise(2, keys=["used", "ratio", "why"])
def exercise_2(answer):
    """answer = dict(used=..., ratio=..., why="a", "b" or "c")."""
    absmax_ = _section2_weight().reshape(-1, 64).abs().amax(dim=1)
    q_raw, absmax2_raw = quantize_blockwise(absmax_, DYNAMIC, blocksize=256)
    raw = dequantize_blockwise(q_raw, absmax2_raw, DYNAMIC, 256)
    with_offset = double_dequantize(*double_quantize(absmax_))
    if whole(answer, "used", lowest=0) != len(torch.unique(q_raw)):
        yield ("used: quantize section 2's absmax with quantize_blockwise(absmax, "
               "DYNAMIC, 256) and count the distinct indices (torch.unique)")
    ratio = _rmse(raw, absmax_) / _rmse(with_offset, absmax_)
    if not close(number(answer, "ratio"), ratio, rel=0.05):
        yield ("ratio: the absmaxes' RMSE without the offset divided by their RMSE with it "
               "(section 4's absmax_hat)")
    if choice(answer, "why", ["a", "b", "c"]) != "a":
        yield ("why: look at where the scaled absmaxes land in [-1, 1] without the offset, "
               "and at the gaps of the dynamic map there (section 3)")


@exercise(3, keys=["rmse_256", "rmse_64_dq", "smaller"])
def exercise_3(answer):
    """answer = dict(rmse_256=..., rmse_64_dq=..., smaller="a" or "b")."""
    choice(answer, "smaller", ["a", "b"])
    w_ = _section2_weight()
    errors = {}
    for key, blocksize, dq in [("rmse_256", 256, False), ("rmse_64_dq", 64, True)]:
        errors[key] = _rmse(w_, decode_4bit(*quantize_4bit(w_, blocksize=blocksize,
                                                                 double_quant=dq)))
        if not close(number(answer, key), errors[key], rel=0.01):
            yield (f"{key}: quantize W with quantize_4bit(W, blocksize={blocksize}, "
                   f"double_quant={dq}), decode with decode_4bit and take "
                   "sqrt(mean((W - W_hat)^2))")
    if answer["smaller"] != ("b" if errors["rmse_64_dq"] < errors["rmse_256"] else "a"):
        yield "smaller: put your two RMSEs side by side"

def _cases():
    """(what, absmax): the absmaxes the learner's double quantization must get right."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1000 * 64, generator=g) * 0.02
    return [("1000 absmaxes of a Gaussian weight (a partial last block of 256)",
             w.view(-1, 64).abs().amax(dim=1)),
            ("4096 absmaxes spread over [0.01, 3]", torch.rand(4096, generator=g) * 2.99 + 0.01),
            ("300 equal absmaxes (absmax - mean is all zeros)", torch.full((300,), 0.7)),
            ("a single absmax", torch.tensor([0.25]))]


@exercise(4)
def exercise_4(quantize, dequantize):
    """Your quantize(absmax) -> (qabsmax, absmax2, offset) and dequantize(qabsmax, absmax2, offset)
    -> absmax_hat, checked against mq.double_quantize / mq.double_dequantize."""
    for what, absmax in _cases():
        qabsmax, absmax2, offset = double_quantize(absmax)
        out = call(quantize, "quantize", absmax.clone())
        if not (isinstance(out, tuple) and len(out) == 3):
            raise Stop("not yet.\n  hint: quantize should return (qabsmax, absmax2, offset)")
        q, a2, off = (torch.as_tensor(t) for t in out)
        if off.numel() != 1 or not torch.allclose(off.float(), offset, rtol=1e-6, atol=0):
            if off.numel() == 1 and float(off) == 0.0:
                return ["subtract the offset first: offset = the mean of the absmaxes (they are "
                        "all positive, so without it half of the signed code goes unused)"]
            return ["offset: one float32 per tensor, the mean of the absmaxes"]
        if a2.numel() != absmax2.numel():
            return [f"absmax2: one per block of 256 absmaxes, a partial last block included "
                    f"({what} should give {absmax2.numel()})"]
        if not (torch.equal(q.long(), qabsmax.long()) and torch.allclose(a2.float(), absmax2)):
            plain = quantize_blockwise(absmax, DYNAMIC, 256)[0]
            if torch.equal(q.long(), plain.long()):
                return ["quantize absmax - offset, not absmax itself"]
            return ["qabsmax, absmax2: blockwise-quantize absmax - offset onto the dynamic 8-bit "
                    f"map (mq.DYNAMIC) in blocks of 256; wrong on {what}"]
        back = torch.as_tensor(call(dequantize, "dequantize", qabsmax.clone(), absmax2.clone(),
                                    offset.clone()))
        ref = double_dequantize(qabsmax, absmax2, offset)
        if back.shape != ref.shape or not torch.allclose(back.float(), ref, rtol=1e-6, atol=1e-7):
            no_offset = dequantize_blockwise(qabsmax, absmax2, DYNAMIC, 256)
            if back.shape == ref.shape and torch.allclose(back.float(), no_offset):
                return ["dequantize: add the offset back after decoding"]
            return ["dequantize: DYNAMIC[qabsmax] times the absmax2 of its block of 256, plus the "
                    f"offset; wrong on {what}"]
    return True
