"""PagedAdamW: AdamW whose state lives in a Pager's pages, updated page by page (lesson 08).

AdamW keeps two numbers per trainable parameter, m (exp_avg) and v (exp_avg_sq): 8 bytes
per parameter in fp32. At step t, with gradient g, elementwise and in torch's order:

    theta <- theta * (1 - lr * weight_decay)
    m     <- m.lerp(g, 1 - beta1)                  # beta1 * m + (1 - beta1) * g
    v     <- v * beta2 + (1 - beta2) * g * g
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Because every line is elementwise, the step can run one page at a time (the pages of m and v
for elements a..b, with theta[a:b] and g[a:b]), so a budget smaller than one parameter's state
still trains. The results are bit-identical to torch.optim.AdamW(foreach=False), paged or not.
Worked example: one parameter 1.0 with gradient 0.5, lr 0.1, no weight decay: m = 0.05,
v = 0.00025, so theta = 1 - 0.1/0.1 * 0.05 / (0.0158.../0.0316... + 1e-8) = 0.9 (Adam's first
step moves each weight by lr, whatever the gradient's size).

Paging itself (budgets, eviction, counters, CUDA vs the CPU simulation) is pager.py's job.
"""
import torch

from .pager import OutOfBudget, Pager

__all__ = ["PagedAdamW", "Pager", "OutOfBudget"]


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
    """AdamW with its state in pages of `pager` (None: a Pager with no budget on the
    parameters' device, so nothing is ever evicted; pass one with a budget to page).

    is_paged=False keeps plain state tensors (same numerics). state_dict() has torch AdamW's
    layout (whole exp_avg / exp_avg_sq tensors, read from wherever the pages are), so it loads
    into torch.optim.AdamW and back. Float hyperparameters only; no amsgrad, maximize, fused
    or capturable. On CPU the device is simulated (see pager.py); on CUDA the step prefetches
    the next chunk's pages on a side stream, a path that has not been run on a GPU yet.

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
                raise ValueError(f"PagedAdamW: {name} must be >= 0" + (" and < 1" if "beta"
                                 in name else "") + f", got {value!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.is_paged = is_paged
        if pager is None and is_paged:
            pager = Pager(None, device=self.param_groups[0]["params"][0].device)
        self.pager = pager

    def _init_state(self, p: torch.Tensor) -> dict:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"PagedAdamW: parameters must be real floating point, got {p.dtype}")
        if self.is_paged and p.device != self.pager.device:
            raise ValueError(f"PagedAdamW: a parameter is on {p.device} but the pager's device "
                             f"is {self.pager.device}; build Pager(..., device={str(p.device)!r})")
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state = {"step": torch.tensor(0.0, dtype=scalar)}   # on CPU, as torch's AdamW keeps it
        try:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = (self.pager.alloc(p.numel(), p.dtype) if self.is_paged
                              else torch.zeros_like(p, memory_format=torch.preserve_format))
        except OutOfBudget:
            self.pager.free(state.get("exp_avg", ()))       # all or nothing
            raise
        self.state[p] = state
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient; returns closure's loss.

        If the budget cannot hold one page of m and one of v beside the reserved bytes, it
        raises OutOfBudget before anything is updated.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []   # (param, state, hyperparameters of _adamw_update)
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW: sparse gradients are not supported")
                state = self.state.get(p) or self._init_state(p)
                step = (state["step"] + 1).item()           # as torch: step_t += 1; .item()
                work.append((p, state, (lr, group["weight_decay"], beta1, beta2, group["eps"],
                                        lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5)))
        if self.is_paged:
            self._check_room([pair for _, s, _ in work
                              for pair in zip(s["exp_avg"], s["exp_avg_sq"])])
        for p, state, hyper in work:
            state["step"] += 1
            if not self.is_paged:
                _adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *hyper)
        if self.is_paged:
            self._paged_update(work)
        return loss

    def _check_room(self, pairs) -> None:
        pager = self.pager
        need = max((pager.nbytes(pm) + pager.nbytes(pv) for pm, pv in pairs), default=0)
        if pager.evict and pager.reserved_bytes + need > pager.budget:
            raise OutOfBudget(f"PagedAdamW.step: a page of exp_avg and one of exp_avg_sq ("
                              f"{need} bytes) must fit on the device together, but the budget "
                              f"is {pager.budget} bytes with {pager.reserved_bytes} reserved; "
                              "nothing was updated")

    def _paged_update(self, work) -> None:
        """Run _adamw_update chunk by chunk: elements a..b of one parameter = one page of m, v."""
        chunks = []   # (param, flat param, flat grad, start, page of m, page of v, hyper)
        for p, state, hyper in work:
            flat, grad = p.reshape(-1), p.grad.reshape(-1)   # (numel,) views if contiguous
            start = 0
            for pm, pv in zip(state["exp_avg"], state["exp_avg_sq"]):
                chunks.append((p, flat, grad, start, pm, pv, hyper))
                start += self.pager.nbytes(pm) // p.element_size()
        for i, (p, flat, grad, start, pm, pv, hyper) in enumerate(chunks):
            with self.pager.use((pm, pv)) as (m, v):         # m, v: (n,) on the device
                if i + 1 < len(chunks):                      # next chunk's pages, while this
                    self.pager.prefetch(chunks[i + 1][4:6])  # one updates (CUDA: side stream)
                n = m.numel()
                _adamw_update(flat[start:start + n], grad[start:start + n], m, v, *hyper)
            last_chunk_of_p = i + 1 == len(chunks) or chunks[i + 1][0] is not p
            if last_chunk_of_p and flat.data_ptr() != p.data_ptr():   # p not contiguous
                p.copy_(flat.view_as(p))

    def state_dict(self) -> dict:
        """torch AdamW's layout: {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, ...}, a copy."""
        sd = super().state_dict()
        if self.is_paged:
            params = [p for group in self.param_groups for p in group["params"]]
            sd["state"] = {i: {"step": s["step"].clone(),
                               "exp_avg": self._gather(s["exp_avg"], params[i]),
                               "exp_avg_sq": self._gather(s["exp_avg_sq"], params[i])}
                           for i, s in sd["state"].items()}
        return sd

    def _gather(self, pids, p):
        if not pids:
            return torch.zeros_like(p)
        return self.pager.gather(pids, p.device).view_as(p)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch AdamW's (or PagedAdamW's) state_dict; paged state goes into new pages."""
        if self.is_paged:
            for state in self.state.values():
                self.pager.free(state["exp_avg"] + state["exp_avg_sq"])
        super().load_state_dict(state_dict)
        for state in self.state.values():
            state["step"] = state["step"].clone()   # not shared with the saved dict
            if self.is_paged:
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = self.pager.alloc(state[key].numel(), state[key].dtype,
                                                  data=state[key].reshape(-1))
