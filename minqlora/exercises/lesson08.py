"""Checks for lesson 08's exercises (paged AdamW); the library is the answer key.

>>> exercise_2(511.5)
Exercise 2: answer_2 should be a whole number, got 511.5.
False
"""
import torch

from ..paged_adam import PagedAdamW
from ..pager import OutOfBudget, Pager
from ._core import Stop, call, choice, close, exercise, number, whole


@exercise(1)
def exercise_1(answer):
    """answer = bytes of AdamW state (an int)."""
    expected = 32 * 2 * (16 * 4096 + 4096 * 16) * 8    # 32 layers x (q, v) x (A, B), 8 bytes each
    return whole(answer, lowest=0) == expected or [
        "per layer: two LoRA pairs (q and v), each A (16 x 4096) and B (4096 x 16); then 8 bytes "
        "of m and v per parameter, over 32 layers"]


def _step_fits(budget, page_bytes=256, numel=1000):
    """Can PagedAdamW step a numel-element parameter under this device budget?"""
    w = torch.nn.Parameter(torch.ones(numel))
    w.grad = torch.ones(numel)
    try:
        PagedAdamW([w], pager=Pager(budget, page_bytes=page_bytes, device="cpu")).step()
        return True
    except OutOfBudget:
        return False


@exercise(2)
def exercise_2(answer):
    """answer = the smallest device budget in bytes (an int)."""
    budget = whole(answer, lowest=1)
    if not _step_fits(budget):
        return ["too small: during the update of one range of elements, which pages must be on "
                "the device at the same time?"]
    return not _step_fits(budget - 1) or [
        "a smaller budget still steps: the whole state never needs to be on the device at once"]


@exercise(3, keys=["page_ins", "why"])
def exercise_3(answer):
    """answer = dict(page_ins=per step once under way, why="a", "b" or "c")."""
    why = choice(answer, "why", ["a", "b", "c"])
    w = torch.nn.Parameter(torch.ones(1000))
    pager = Pager(4000, page_bytes=256, device="cpu")         # half of the 8000 bytes of state
    opt = PagedAdamW([w], pager=pager)
    ins = []
    for _ in range(3):
        w.grad = torch.full((1000,), 0.1)
        before = pager.page_ins
        opt.step()
        ins.append(pager.page_ins - before)
    if whole(answer, "page_ins", lowest=0) != ins[-1]:
        yield ("page_ins: step a few times and read the difference of pager.page_ins "
               "around one opt.step() after the first")
    if why != "a":
        yield ("why: in which order does a step touch the pages, and which page does LRU "
               "evict when it needs room?")


@exercise(4, keys=["small", "large", "why"])
def exercise_4(answer):
    """answer = dict(small=..., large=..., why="a", "b" or "c"): how far the weights move."""
    why = choice(answer, "why", ["a", "b", "c"])
    for key, scale in (("small", 1e-3), ("large", 1e3)):
        w = torch.nn.Parameter(torch.zeros(5))
        w.grad = torch.randn(5, generator=torch.Generator().manual_seed(4)) * scale
        PagedAdamW([w], lr=0.1, weight_decay=0.0).step()
        if not close(number(answer, key), w.detach().abs().max().item()):
            yield (f"{key}: start from zeros, give gradients of size {scale:g}, take one "
                   "step with lr=0.1 and weight_decay=0, and read |w|")
    if why != "a":
        yield ("why: write m_hat and v_hat after one step from zero state, with the bias "
               "correction of section 1")


def _adamw(p, g, m, v, t, lr, beta1, beta2, eps, wd, mistake=None):
    """One AdamW step as the equations say, or with one typical `mistake`."""
    if mistake == "l2":
        g = g + wd * p
    elif wd:
        p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g.abs() if mistake == "no square" else g * g)
    tc = t + 1 if mistake == "t+1" else t
    fixed = mistake != "no bias correction"
    m_hat, v_hat = m / (1 - fixed * beta1 ** tc), v / (1 - fixed * beta2 ** tc)
    denom = (v_hat + eps).sqrt() if mistake == "eps inside" else v_hat.sqrt() + eps
    return p - lr * m_hat / denom, m, v


MISTAKES = {
    "no bias correction": "bias correction: divide m by 1 - beta1^t and v by 1 - beta2^t",
    "t+1": "the step count t starts at 1 on the first step (bias correction 1 - beta^1)",
    "l2": "AdamW decays the weight itself, p * (1 - lr * weight_decay), instead of adding "
          "weight_decay * p to the gradient (that would be Adam with L2)",
    "eps inside": "eps goes outside the square root: sqrt(v_hat) + eps",
    "no square": "v averages the squared gradient, g * g",
}


def _adam_cases():
    g = torch.Generator().manual_seed(80)
    rand = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale         # noqa: E731
    return [("one step from zero state", rand(6), [rand(6)], 1e-2, 0.0),
            ("five steps with weight_decay=0.1", rand(6), [rand(6) for _ in range(5)], 1e-2, 0.1),
            ("three steps, gradients of 1e-8", rand(6), [rand(6, scale=1e-8)] * 3, 1e-3, 0.0),
            ("two steps, zero gradients, decay", rand(6), [torch.zeros(6)] * 2, 1e-1, 0.5)]


@exercise(5)
def exercise_5(adamw_step):
    """Your adamw_step(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (param, m, v),
    stepped on four runs beside torch.optim.AdamW; a hint per known mistake."""
    betas, eps = (0.9, 0.999), 1e-8
    for what, p0, grads, lr, wd in _adam_cases():
        w = torch.nn.Parameter(p0.clone())
        ref = torch.optim.AdamW([w], lr=lr, betas=betas, eps=eps, weight_decay=wd)
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for t, grad in enumerate(grads, start=1):
            w.grad = grad.clone()
            ref.step()
            out = call(adamw_step, "adamw_step", p.clone(), grad.clone(), m.clone(), v.clone(), t,
                       lr, *betas, eps, wd)
            if not (isinstance(out, tuple) and len(out) == 3):
                raise Stop("not yet.\n  hint: adamw_step should return (param, m, v)")
            p, m, v = (torch.as_tensor(x).detach().float() for x in out)
        if p.shape != p0.shape or not torch.allclose(p, w.detach(), rtol=1e-5, atol=1e-7):
            for mistake, hint in MISTAKES.items():
                q, mq_, vq = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
                for t, grad in enumerate(grads, start=1):
                    q, mq_, vq = _adamw(q, grad, mq_, vq, t, lr, *betas, eps, wd, mistake)
                if p.shape == q.shape and torch.allclose(p, q, rtol=1e-5, atol=1e-7):
                    return [hint]
            return [f"adamw_step differs from torch.optim.AdamW on {what}"]
    return True


def _lru_cases():
    """(what, capacity, resident (LRU first), accesses)."""
    return [("a miss evicts the least recently used page", 3, [0, 1, 2], [3, 4]),
            ("a hit makes a page the most recently used", 3, [0, 1, 2], [0, 3, 4]),
            ("hits evict nothing", 3, [0, 1, 2], [2, 2, 1]),
            ("a cyclic sweep over twice the room", 4, [4, 5, 6, 7], list(range(8)) * 2)]


def _pager_evictions(capacity, resident, accesses):
    """What mq.Pager evicts, page by page, for these accesses (pages of 8 bytes)."""
    pager = Pager(capacity * 8, page_bytes=8, device="cpu")
    pager.alloc(2 * (max(resident + accesses) + 1))           # pages 0, 1, ... of 2 float32
    evicted = []
    for i, pid in enumerate(resident + accesses):
        before = pager.resident_pages
        with pager.use([pid]):
            pass
        evicted += [p for p in before if p not in pager.resident_pages] * (i >= len(resident))
    return evicted


def _fifo(resident, accesses, capacity):
    """First-in first-out: the usual slip, a hit that does not refresh the page."""
    order, out = list(resident), []
    for pid in (p for p in accesses if p not in order):      # misses only, as order changes
        if len(order) >= capacity:
            out.append(order.pop(0))
        order.append(pid)
    return out


@exercise(6)
def exercise_6(lru_evictions):
    """Your lru_evictions(resident, accesses, capacity) -> the evicted page ids, in order, beside
    what mq.Pager evicts."""
    for what, capacity, resident, accesses in _lru_cases():
        want = _pager_evictions(capacity, resident, accesses)
        out = call(lru_evictions, "lru_evictions", list(resident), list(accesses), capacity)
        try:
            mine = [int(p) for p in out]
        except (TypeError, ValueError):
            return ["lru_evictions returns the list of evicted page ids, in order"]
        if mine != want:
            if what == "hits evict nothing":
                return ["a page already on the device is a hit: nothing is evicted"]
            if mine == _fifo(resident, accesses, capacity):
                return ["on a hit, move the page to the most recently used end too (LRU, not "
                        "first-in first-out)"]
            return [f"evict the least recently used page (the front of the list) on each miss, "
                    f"and put every used page at the back; wrong where {what}"]
    return True
