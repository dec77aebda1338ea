"""Checks for lesson 06's exercises (LoRA); the library is the answer key.

>>> exercise_3(dict(trend="up", steadier="alpha/r"))
Exercise 3: answer_3['trend'] should be 'grows', 'stays' or 'shrinks', got 'up'.
False
"""
import math

import torch
from torch import nn

from ..lora import LoRALinear
from ._core import Stop, call, choice, exercise, number, whole

RANKS = [8, 32, 128]                                  # section 4's ranks


def _first_step_change(r, scaling, batch, trials=16, lr=1e-3):
    """Section 4: relative change of the output after one Adam step, mean over `trials` layers."""
    changes = []
    for seed in range(trials):
        torch.manual_seed(seed)
        layer = LoRALinear(nn.Linear(128, 128).requires_grad_(False), r=r, alpha=16)
        layer.scaling = scaling(r)
        xb, tb = torch.randn(batch, 128), torch.randn(batch, 128)
        h0 = layer(xb).detach()
        opt = torch.optim.Adam([layer.lora_A.weight, layer.lora_B.weight], lr=lr)
        (layer(xb) - tb).pow(2).mean().backward()
        opt.step()
        changes.append(((layer(xb).detach() - h0).norm() / h0.norm()).item())
    return sum(changes) / trials


@exercise(1, keys=["trainable", "fraction"])
def exercise_1(answer):
    """answer = dict(trainable=..., fraction=...): LoRA r=64 on a Llama-7B block's seven linears."""
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    layers = [LoRALinear(nn.Linear(i, o, bias=False, device="meta"), r=64) for i, o in shapes]
    trainable = sum(p.numel() for m in layers for p in m.parameters() if p.requires_grad)
    block = sum(i * o for i, o in shapes)
    if whole(answer, "trainable", lowest=0) != trainable:
        yield ("each linear (in -> out) gets r * (in + out) adapter numbers; sum over all "
               "seven")
    fraction = number(answer, "fraction")
    if not 0 <= fraction <= 1:
        raise Stop(f"answer_{{n}}['fraction'] should be between 0 and 1 (not a percentage), "
                   f"got {fraction}.")
    if abs(fraction - trainable / block) > 0.01 * trainable / block:
        yield ("fraction: trainable numbers / the block's weights (sum of in * out), as a "
               "number between 0 and 1, not a percentage")


@exercise(2, keys=["A_moved", "B_moved", "why"])
def exercise_2(answer):
    """answer = dict(A_moved=True/False, B_moved=True/False, why="a", "b" or "c")."""
    g = torch.Generator().manual_seed(20)
    x_, t_ = torch.randn(8, 16, generator=g), torch.randn(8, 12, generator=g)
    A_, B_ = torch.zeros(4, 16, requires_grad=True), torch.zeros(12, 4, requires_grad=True)
    opt_ = torch.optim.Adam([A_, B_], lr=1e-2)
    for _ in range(5):                                    # both start at zero; train a little
        opt_.zero_grad()
        (x_ @ A_.T @ B_.T - t_).pow(2).mean().backward()
        opt_.step()
    for key in ("A_moved", "B_moved"):
        choice(answer, key, [True, False])
    if (answer["A_moved"] != bool(A_.abs().max() > 0)
            or answer["B_moved"] != bool(B_.abs().max() > 0)):
        yield "run a few Adam steps with A = B = 0 and look at A.abs().max(), B.abs().max()"
    if choice(answer, "why", ["a", "b", "c"]) != "a":
        yield "why: write out dL/dA and dL/dB from section 2: what does each depend on?"


@exercise(3, keys=["trend", "steadier"])
def exercise_3(answer):
    """answer = dict(trend="grows", "stays" or "shrinks", steadier="alpha/r" or "alpha/sqrt(r)")."""
    choice(answer, "trend", ["grows", "stays", "shrinks"])
    if str(answer["steadier"]).replace(" ", "") not in ("alpha/r", "alpha/sqrt(r)"):
        raise Stop("answer_{n}['steadier'] should be 'alpha/r' or 'alpha/sqrt(r)', "
                   f"got {answer['steadier']!r}.")
    by_r = [_first_step_change(r_, lambda r_: 16 / r_, batch=64) for r_ in RANKS]
    by_sqrt = [_first_step_change(r_, lambda r_: 16 / math.sqrt(r_), batch=64) for r_ in RANKS]
    trend = ("grows" if by_r[-1] > 1.3 * by_r[0] else "shrinks" if by_r[-1] < by_r[0] / 1.3
             else "stays")
    steadier = "alpha/r" if max(by_r) / min(by_r) < max(by_sqrt) / min(by_sqrt) else "alpha/sqrt(r)"
    if answer["trend"] != trend:
        yield ("trend: run first_step_change(r, lambda r: 16 / r, batch=64) for r in "
               "ranks and compare r = 8 with r = 128")
    if str(answer["steadier"]).replace(" ", "") != steadier:
        yield "steadier: compare largest / smallest over the ranks for the two scalings"

def _cases():
    """(what, x, W, b, A, B, alpha, r): the layers the learner's LoRA must get right."""
    g = torch.Generator().manual_seed(60)
    rand = lambda *shape: torch.randn(*shape, generator=g)            # noqa: E731
    return [("a batch of 5 inputs, 16 -> 12, r = 4, alpha = 16",
             rand(5, 16), rand(12, 16), rand(12), rand(4, 16), rand(12, 4), 16, 4),
            ("a (2, 3, 16) input (batch, sequence, features)",
             rand(2, 3, 16), rand(12, 16), rand(12), rand(4, 16), rand(12, 4), 16, 4),
            ("no bias (b is None), r = 1, alpha = 2",
             rand(5, 16), rand(12, 16), None, rand(1, 16), rand(12, 1), 2, 1),
            ("B = 0, as at the start of training", rand(5, 8), rand(8, 8), rand(8), rand(2, 8),
             torch.zeros(8, 2), 16, 2)]


def _library(W, b, A, B, alpha, r):
    base = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    layer = LoRALinear(base, r=r, alpha=alpha)
    with torch.no_grad():
        base.weight.copy_(W)
        if b is not None:
            base.bias.copy_(b)
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    return layer


@exercise(4)
def exercise_4(forward, merge):
    """Your forward(x, W, b, A, B, alpha, r) -> y and merge(W, A, B, alpha, r) -> W_merged,
    checked against mq.LoRALinear(...)(x) and its .merge().weight."""
    for what, x, W, b, A, B, alpha, r in _cases():
        layer = _library(W, b, A, B, alpha, r)
        with torch.no_grad():
            want = layer(x)
            y = call(forward, "forward", x.clone(), W.clone(), b, A.clone(), B.clone(), alpha, r)
        y = torch.as_tensor(y).detach()
        if y.shape != want.shape:
            return [f"y has the shape of x with its last size in_features -> out_features: "
                    f"x @ W.T, x @ A.T @ B.T (wrong on {what})"]
        if not torch.allclose(y.float(), want, rtol=1e-4, atol=1e-5):
            base = x @ W.T + (0 if b is None else b)
            update = x @ A.T @ B.T
            for hint, bad in [("multiply the adapter's output by alpha / r", base + update),
                              ("the factor is alpha / r, not r / alpha", base + r / alpha * update),
                              ("add the base's bias b to x @ W.T", x @ W.T + alpha / r * update),
                              ("y = x @ W.T + b + (alpha / r) * x @ A.T @ B.T: keep the frozen "
                               "base's output", alpha / r * update)]:
                if torch.allclose(y.float(), bad, rtol=1e-4, atol=1e-5):
                    return [hint]
            return [f"y = x @ W.T + b + (alpha / r) * (x @ A.T) @ B.T; wrong on {what}"]
        merged = torch.as_tensor(call(merge, "merge", W.clone(), A.clone(), B.clone(), alpha, r))
        want_w = layer.merge().weight
        if merged.shape != want_w.shape:
            return ["merge returns a weight of W's shape (out, in): B @ A is (out, r) @ (r, in)"]
        if not torch.allclose(merged.float(), want_w, rtol=1e-4, atol=1e-5):
            if torch.allclose(merged.float(), W + B @ A, rtol=1e-4, atol=1e-5):
                return ["merge: scale B @ A by alpha / r, as in the forward pass"]
            return [f"merge: W + (alpha / r) * B @ A; wrong on {what}"]
    return True
