"""PagedAdamW: AdamW whose state lives in a Pager's pages, updated page by page (lesson 08).

AdamW keeps two numbers per trainable parameter, m (exp_avg) and v (exp_avg_sq): 8 bytes per
parameter in fp32. At step t, with gradient g, elementwise and in torch's order:

    theta <- theta * (1 - lr * weight_decay)
    m     <- m.lerp(g, 1 - beta1)                  # beta1 * m + (1 - beta1) * g
    v     <- v * beta2 + (1 - beta2) * g * g
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Worked example, lr 0.1, no weight decay, theta 1.0, g 0.5 at t = 1: m = 0.05, v = 0.00025,
theta = 1 - 0.1 / 0.1 * 0.05 / (0.0158 / 0.0316 + 1e-8) = 0.9 (the first step moves each
weight by lr, whatever the gradient's size). Every line is elementwise, so the step runs one
page at a time (a page of m and one of v, with the same elements of theta and g): a budget
smaller than one parameter's state still trains, bit-identical to torch.optim.AdamW(foreach=
False). Budgets, eviction, counters and the CPU simulation of the device are pager.py's job.
"""
import torch

from .pager import OutOfBudget, Pager


def _adamw_update(param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
                  step_size, bias_correction2_sqrt) -> None:
    """torch's _single_tensor_adam (decoupled weight decay), op for op, on same-shape tensors."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with its state in pages of `pager` (None: a Pager without a budget on the
    parameters' device); is_paged=False keeps plain state tensors, with the same numerics.

    state_dict() has torch AdamW's layout, so it loads into torch.optim.AdamW and back. Float
    hyperparameters only; no amsgrad, maximize, fused or capturable. On a CPU-only machine the
    pager's device is simulated with host memory (see pager.py); on CUDA the step prefetches the
    next page pair on a side stream.

    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = PagedAdamW([w], lr=0.1, weight_decay=0.0)
    >>> w.grad = torch.tensor([0.5, -3.0]); opt.step()
    >>> [round(x, 4) for x in w.tolist()]                  # each weight moves by lr
    [0.9, -1.9]
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 pager=None, is_paged=True):
        for name, value, ok in (("lr", lr, lr >= 0), ("eps", eps, eps >= 0),
                                ("weight_decay", weight_decay, weight_decay >= 0),
                                ("betas[0]", betas[0], 0 <= betas[0] < 1),
                                ("betas[1]", betas[1], 0 <= betas[1] < 1)):
            if not ok:
                bound = " and < 1" if name.startswith("betas") else ""
                raise ValueError(f"PagedAdamW: {name} must be >= 0{bound}, got {value!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        if pager is None and is_paged:
            pager = Pager(None, device=self.param_groups[0]["params"][0].device)
        self.pager, self.is_paged = pager, is_paged

    def _init_state(self, p: torch.Tensor) -> dict:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"PagedAdamW: parameters must be real floating point, got {p.dtype}")
        if self.is_paged and p.device != self.pager.device:
            raise ValueError(f"PagedAdamW: a parameter is on {p.device} but the pager's device "
                             f"is {self.pager.device}; build Pager(..., device={str(p.device)!r})")
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state = {"step": torch.tensor(0.0, dtype=scalar)}   # on CPU, as torch's AdamW keeps it
        if not self.is_paged:
            return state | {k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq")}
        state["exp_avg"] = self.pager.alloc(p.numel(), p.dtype)   # page ids
        try:
            state["exp_avg_sq"] = self.pager.alloc(p.numel(), p.dtype)
        except OutOfBudget:
            self.pager.free(state["exp_avg"])               # all or nothing
            raise
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient; returns closure's loss. If one
        page of m and one of v cannot fit beside the reserved bytes, it raises OutOfBudget
        before anything changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = []   # (param, its state, _adamw_update's scalars: lr ... bias_correction2_sqrt)
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in (p for p in group["params"] if p.grad is not None):
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW: sparse gradients are not supported")
                state = self.state[p] = self.state.get(p) or self._init_state(p)
                t = (state["step"] + 1).item()               # as torch: step_t += 1; .item()
                updates.append((p, state, (lr, group["weight_decay"], beta1, beta2, group["eps"],
                                           lr / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5)))
        pager = self.pager
        if self.is_paged and pager.evict:   # room for a page of m and one of v, or no change
            need = max((2 * pager.nbytes(s["exp_avg"][0]) for _, s, _ in updates if s["exp_avg"]),
                       default=0)
            if pager.reserved_bytes + need > pager.budget:
                raise OutOfBudget(f"PagedAdamW.step: a page of exp_avg and one of exp_avg_sq "
                                  f"({need} bytes) must fit on the device together, but the "
                                  f"budget is {pager.budget} bytes with {pager.reserved_bytes} "
                                  "reserved; nothing was updated")
        for p, state, scalars in updates:
            state["step"] += 1
            if not self.is_paged:
                _adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *scalars)
        if self.is_paged:
            self._paged_update(updates)
        return loss

    def _paged_update(self, updates) -> None:
        """_adamw_update on one page of m and one of v at a time, with the same elements of
        theta and g; meanwhile the next pair is prefetched (on CUDA: on a side stream)."""
        pairs = iter([pair for _, s, _ in updates for pair in zip(s["exp_avg"], s["exp_avg_sq"])])
        next(pairs, None)
        for p, state, scalars in updates:
            flat, grad, start = p.reshape(-1), p.grad.reshape(-1), 0   # (numel,), views if
            for pages in zip(state["exp_avg"], state["exp_avg_sq"]):   # p is contiguous
                with self.pager.use(pages) as (m, v):                  # m, v: (n,) on device
                    self.pager.prefetch(next(pairs, ()))
                    n = m.numel()
                    _adamw_update(flat[start:start + n], grad[start:start + n], m, v, *scalars)
                start += n
            if flat.data_ptr() != p.data_ptr():                        # flat was a copy
                p.copy_(flat.view_as(p))

    def state_dict(self) -> dict:
        """torch AdamW's layout, {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, ...}: a copy
        read from wherever the pages are, paging nothing in."""
        sd = super().state_dict()
        if self.is_paged:
            params = [p for group in self.param_groups for p in group["params"]]
            for i, s in sd["state"].items():
                sd["state"][i] = {"step": s["step"].clone()}   # a new dict: s is self.state[p]
                for k in ("exp_avg", "exp_avg_sq"):
                    sd["state"][i][k] = (self.pager.gather(s[k]).view_as(params[i]) if s[k]
                                         else torch.zeros_like(params[i]))   # s[k]: page ids
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch AdamW's (or PagedAdamW's) state_dict; paged state goes into new pages."""
        old = [s[k] for s in self.state.values() for k in ("exp_avg", "exp_avg_sq")]
        super().load_state_dict(state_dict)   # may raise: then nothing has changed
        for pids in old if self.is_paged else ():
            self.pager.free(pids)
        for state in self.state.values():
            state["step"] = state["step"].clone()   # not shared with the saved dict
            if self.is_paged:
                for k in ("exp_avg", "exp_avg_sq"):
                    state[k] = self.pager.alloc(state[k].numel(), state[k].dtype,
                                                data=state[k].reshape(-1))
