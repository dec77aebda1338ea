"""Checks for lesson 02's exercises (blockwise quantization); the library is the answer key.

>>> exercise_2(dict(bits=4.5, blocksize=48, mb=437.5))
Exercise 2: answer_2['blocksize'] should be a power of two (1, 2, 4, 8, ...), got 48.
False
"""
import torch

from ..blockwise import dequantize_blockwise, quantize_blockwise
from ._core import Stop, all_close, call, close, exercise, number, numbers, whole

SMALL = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])         # section 3's uneven codebook
INT4 = torch.arange(-7, 8, dtype=torch.float32) / 7         # mq.INT4 (lesson 03 names it)


def _with_outliers(n, seed):
    """Section 8's tensor: n Gaussian weights, 0.1% of them outliers of magnitude 8 to 16."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    k = n // 1000
    idx = torch.randperm(n, generator=gen)[:k]
    w[idx] = torch.randn(k, generator=gen).sign() * (8 + 8 * torch.rand(k, generator=gen))
    return w


def _rmse(a, b):
    return (a - b).double().pow(2).mean().sqrt().item()


def _reconstruct(x, blocksize, code=INT4):
    q, absmax = quantize_blockwise(x, code, blocksize=blocksize)
    return dequantize_blockwise(q, absmax, code, blocksize)


@exercise(1, keys=["absmax", "q", "x_hat"])
def exercise_1(answer):
    """answer = dict(absmax=[2 values], q=[8 indices], x_hat=[8 values])."""
    x1 = torch.tensor([0.3, -0.6, 0.15, 0.0, 2.0, -0.5, 1.1, 0.9])
    q, absmax = quantize_blockwise(x1, SMALL, blocksize=4)
    scaled = (x1.view(2, 4) * (1 / absmax)[:, None]).reshape(-1)
    q_up = (scaled[:, None] >= (SMALL[:-1] + SMALL[1:]) / 2).sum(dim=1)   # ties sent up instead
    if not all_close(answer["absmax"], absmax.tolist()):
        yield "absmax: one per block of 4 values, the largest |x| of that block"
    mine = numbers(answer["q"])
    if mine != q.float().tolist():
        yield ("q: look again at the value that lands exactly on a midpoint: a tie goes to "
               "the lower index" if mine == q_up.float().tolist() else
               "q: scale each block by 1/absmax, then count the midpoints of `small` "
               "strictly below each scaled value")
    if not all_close(answer["x_hat"], dequantize_blockwise(q, absmax, SMALL, 4).tolist()):
        yield "x_hat: small[q] times the absmax of the value's own block"


@exercise(2, keys=["bits", "blocksize", "mb"])
def exercise_2(answer):
    """answer = dict(bits=..., blocksize=a power of two, mb=...)."""
    smallest = min(2**i for i in range(1, 20) if 32 / 2**i <= 0.1)
    if not close(number(answer, "bits"), 4 + 32 / 64):
        yield ("bits: a 4-bit index per value, plus one float32 absmax (32 bits) shared by "
               "the 64 values of a block")
    if whole(answer, "blocksize", lowest=1, power_of_two=True) != smallest:
        yield ("blocksize: the constants cost 32 / blocksize bits per parameter; try the "
               "powers of two in turn")
    if not close(number(answer, "mb"), 7e9 / 64 * 4 / 1e6):
        yield "mb: 7e9 / 64 absmaxes of 4 bytes each, in units of 1e6 bytes"


@exercise(3, keys=["midpoint", "at_midpoint", "just_above"])
def exercise_3(answer):
    """answer = dict(midpoint=..., at_midpoint=index, just_above=index)."""
    m = (INT4[7] + INT4[8]) / 2
    above = torch.nextafter(m, torch.tensor(1.0))
    q, _ = quantize_blockwise(torch.stack([torch.tensor(1.0), m, above]), INT4, blocksize=4)
    if not close(number(answer, "midpoint"), m.item(), rel=1e-6, abs_tol=0):
        yield "midpoint: half-way between mq.INT4[7] (0) and mq.INT4[8] (1/7), in float32"
    if whole(answer, "at_midpoint", lowest=0) != q[1].item():
        yield ("at_midpoint: quantize a block such as [1.0, m] (absmax 1) and read m's "
               "index; section 3 says which way a tie goes")
    if whole(answer, "just_above", lowest=0) != q[2].item():
        yield ("just_above: torch.nextafter(m, torch.tensor(1.0)) is the next float32 above "
               "m; which code is it nearer to?")


@exercise(4, keys=["changed", "blocks"])
def exercise_4(answer):
    """answer = dict(changed=..., blocks=[block indices])."""
    g = torch.randn(4096, generator=torch.Generator().manual_seed(4))  # = manual_seed(4); randn
    g_out = g.clone()
    g_out[1000] = 100.0
    changed = (_reconstruct(g, 64) != _reconstruct(g_out, 64)).nonzero().flatten()
    if numbers(answer["blocks"]) != sorted(set((changed // 64).float().tolist())):
        yield ("blocks: value 1000 lies in block 1000 // 64; does any other block's absmax "
               "change?")
    if whole(answer, "changed", lowest=0) != changed.numel():
        yield ("changed: count the positions where the two reconstructions differ, "
               "(before != after).sum(); not every value of the block has to move")


@exercise(5, keys=["plain", "outliers", "why"])
def exercise_5(answer):
    """answer = dict(plain=..., outliers=..., why="a", "b" or "c"): RMSE growth from 64 to 4096."""
    if answer["why"] not in ("a", "b", "c"):
        raise Stop(f"answer_{{n}}['why'] should be 'a', 'b' or 'c', got {answer['why']!r}.")
    tensors = {"plain": torch.randn(2**20, generator=torch.Generator().manual_seed(5)),
               "outliers": _with_outliers(2**20, seed=8)}                  # section 8's w
    for name, t in tensors.items():
        growth = _rmse(t, _reconstruct(t, 4096)) / _rmse(t, _reconstruct(t, 64))
        if not close(number(answer, name), growth, rel=0.03):
            yield (f"{name}: the RMSE at blocksize 4096 divided by the RMSE at blocksize 64, "
                   "on " + ("torch.randn(2**20) after torch.manual_seed(5)"
                            if name == "plain" else "section 8's w"))
    if answer["why"] != "b":
        yield ("why: compare the plain Gaussian's mean block absmax at 64 and at 4096 (the "
               "second output of mq.quantize_blockwise), and count the blocks of 4096 in w "
               "that hold a value of 8 or more")


def _cases():
    """(hint if wrong here, x, code, blocksize): each input tests one thing."""
    gen = torch.Generator().manual_seed(6)
    m = ((INT4[7] + INT4[8]) / 2).item()
    matrix = torch.randn(37, 29, generator=gen)
    return [
        ("each block of `blocksize` values gets its own absmax, max |x| over the block, and each "
         "value the index of its nearest code", torch.tensor([-0.976, 0.187, 0.886, 0.52, 12.0,
                                                             0.3, -0.4, 0.05]), INT4, 4),
        ("an uneven codebook: the midpoints are (code[i] + code[i+1]) / 2 of the code you are "
         "given", torch.randn(256, generator=gen), SMALL, 64),
        ("a value exactly on a midpoint goes to the lower index: count the midpoints strictly "
         "below it (>, not >=)", torch.tensor([1.0, m, -m, 0.5 / 7, 2.0, -0.5, 1.5, 0.25]),
         INT4, 4),
        ("a partial last block: pad with zeros to a whole block (10 values in blocks of 4 give "
         "3 absmaxes), and drop the padding at the end", torch.arange(1.0, 11.0), SMALL, 4),
        ("an all-zero block has absmax 0: scale by 1 / max(absmax, 1e-38), so its zeros stay 0 "
         "(never NaN) and it stores absmax 0", torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, -1.0,
                                                            0.25, 0.1]), INT4, 4),
        ("a 2-D tensor: flatten it row by row (reshape(-1)), and return q in x's shape",
         matrix, SMALL, 64),
    ]


@exercise(6)
def exercise_6(quantize, dequantize):
    """Your quantize(x, code, blocksize) -> (q, absmax) and dequantize(q, absmax, code, blocksize)
    -> x_hat, checked against mq.quantize_blockwise / mq.dequantize_blockwise."""
    for hint, x, code, blocksize in _cases():           # basic first: the first failure's hint
        q_ref, absmax_ref = quantize_blockwise(x, code, blocksize=blocksize)
        out = call(quantize, "quantize", x.clone(), code.clone(), blocksize)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Stop("not yet.\n  hint: quantize should return a pair (q, absmax)")
        q, absmax = (torch.as_tensor(t) for t in out)
        if absmax.shape != absmax_ref.shape or q.shape != x.shape:
            return [hint + f" (expected q of shape {tuple(x.shape)} and "
                           f"{absmax_ref.numel()} absmaxes)"]
        if not (torch.equal(absmax.float(), absmax_ref) and torch.equal(q.long(), q_ref.long())):
            return [hint]
    for hint, x, code, blocksize in _cases():
        q_ref, absmax_ref = quantize_blockwise(x, code, blocksize=blocksize)
        x_hat = torch.as_tensor(call(dequantize, "dequantize", q_ref.clone(), absmax_ref.clone(),
                                     code.clone(), blocksize))
        x_ref = dequantize_blockwise(q_ref, absmax_ref, code, blocksize)
        if x_hat.shape != x_ref.shape or not torch.allclose(x_hat.float(), x_ref):
            return ["dequantize: x_hat = code[q] times the absmax of the value's own block, in "
                    "q's shape (pad the last block as in quantize)"]
    return True
