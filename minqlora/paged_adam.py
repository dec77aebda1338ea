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
False) for float32 and float64 parameters (budgets, eviction, counters: pager.py's job).

Low-precision (float16, bfloat16) parameters keep float32 state by default, as bitsandbytes'
32-bit paged AdamW does: the update runs in float32 and is rounded once into the parameter. In
float16, v = (1 - beta2) * g^2 underflows to 0 for gradients below about 1e-2, and the first
step divides by eps, itself 0 in float16: inf. fp32_state=False keeps torch's policy (state in
the parameter's dtype) and is bit-identical to torch's AdamW for those parameters too.
"""
import contextlib
from collections import defaultdict

import torch

from ._checks import check_adamw_hyper, check_adamw_options, check_adamw_state
from .pager import OutOfBudget, Pager

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _adamw_update(param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
                  step_size, bias_correction2_sqrt) -> None:
    """torch's _single_tensor_adam (decoupled weight decay), op for op, on same-shape tensors."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _update(param, grad, exp_avg, exp_avg_sq, *scalars) -> None:
    """_adamw_update; a 16-bit parameter with float32 state is updated in float32, rounded once."""
    if exp_avg.dtype == param.dtype:
        return _adamw_update(param, grad, exp_avg, exp_avg_sq, *scalars)
    work = param.to(exp_avg.dtype)
    _adamw_update(work, grad.to(exp_avg.dtype), exp_avg, exp_avg_sq, *scalars)
    param.copy_(work)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with its state in pages of `pager` (None: a Pager without a budget on the
    parameters' device); is_paged=False keeps plain state tensors, with the same numerics.

    state_dict() has torch AdamW's layout, so it loads into torch.optim.AdamW and back. Float
    hyperparameters only; maximize as torch has it; amsgrad, fused, capturable and
    differentiable are refused (ValueError), at construction and when a checkpoint has them.
    fp32_state: float32 state for float16 / bfloat16 parameters (see the module docstring).
    On a CPU-only machine the pager's device is simulated with host memory (see pager.py); on
    CUDA the step prefetches the next page pair on a side stream.

    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = PagedAdamW([w], lr=0.1, weight_decay=0.0)
    >>> w.grad = torch.tensor([0.5, -3.0]); opt.step()
    >>> [round(x, 4) for x in w.tolist()]                  # each weight moves by lr
    [0.9, -1.9]
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, *, maximize=False, pager=None, is_paged=True, fp32_state=True):
        check_adamw_hyper(locals(), "PagedAdamW")       # lr, betas, eps, weight_decay
        self.fp32_state = fp32_state                    # (add_param_group: each group's)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))
        if pager is None and is_paged:
            pager = Pager(None, device=self.param_groups[0]["params"][0].device)
        self.pager, self.is_paged = pager, is_paged

    def add_param_group(self, param_group: dict) -> None:
        check_adamw_options({**self.defaults, **param_group}, "add_param_group")   # and values
        super().add_param_group(param_group)

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self.fp32_state and p.element_size() < 4 else p.dtype

    def _init_state(self, p: torch.Tensor) -> dict:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"PagedAdamW: parameters must be real floating point, got {p.dtype}")
        if self.is_paged and p.device != self.pager.device:
            raise ValueError(f"PagedAdamW: a parameter is on {p.device} but the pager's device "
                             f"is {self.pager.device}; build Pager(..., device={str(p.device)!r})")
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state, dtype = {"step": torch.tensor(0.0, dtype=scalar)}, self._state_dtype(p)  # step:
        if not self.is_paged:                                   # on CPU, as torch's AdamW keeps it
            return state | {k: torch.zeros_like(p, dtype=dtype) for k in STATE_KEYS}
        with self.pager.transaction():                          # both or neither
            return state | {k: self.pager.alloc(p.numel(), dtype) for k in STATE_KEYS}   # page ids

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient; returns closure's loss. If one
        page of m and one of v cannot fit beside the reserved bytes, it raises OutOfBudget
        before anything changes."""
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        updates = []   # (param, grad, its state, _adamw_update's scalars: lr ... )
        for group in self.param_groups:
            check_adamw_options(group, "step")
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in (p for p in group["params"] if p.grad is not None):
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW: sparse gradients are not supported")
                state = self.state[p] = self.state.get(p) or self._init_state(p)
                t = (state["step"] + 1).item()               # as torch: step_t += 1; .item()
                grad = -p.grad if group.get("maximize") else p.grad
                updates.append((p, grad, state, (lr, group["weight_decay"], beta1, beta2,
                                                 group["eps"], lr / (1 - beta1 ** t),
                                                 (1 - beta2 ** t) ** 0.5)))
        pager = self.pager
        if self.is_paged and pager.evict:   # room for a page of m and one of v, or no change
            need = max((2 * pager.nbytes(s["exp_avg"][0]) for *_, s, _ in updates if s["exp_avg"]),
                       default=0)
            if pager.reserved_bytes + need > pager.budget:
                raise OutOfBudget(f"PagedAdamW.step: a page of exp_avg and one of exp_avg_sq "
                                  f"({need} bytes) must fit on the device together, but the "
                                  f"budget is {pager.budget} bytes with {pager.reserved_bytes} "
                                  "reserved; nothing was updated")
        for p, grad, state, scalars in updates:
            state["step"] += 1
            if not self.is_paged:
                _update(p, grad, state["exp_avg"], state["exp_avg_sq"], *scalars)
        if self.is_paged:
            self._paged_update(updates)
        return loss

    def _paged_update(self, updates) -> None:
        """_adamw_update on one page of m and one of v at a time, with the same elements of
        theta and g; meanwhile the next pair is prefetched (on CUDA: on a side stream)."""
        pairs = iter([pair for *_, s, _ in updates for pair in zip(s["exp_avg"], s["exp_avg_sq"])])
        next(pairs, None)
        for p, grad, state, scalars in updates:
            flat, grad, start = p.reshape(-1), grad.reshape(-1), 0     # (numel,), views if
            for pages in zip(state["exp_avg"], state["exp_avg_sq"]):   # p is contiguous
                with self.pager.use(pages) as (m, v):                  # m, v: (n,) on device
                    self.pager.prefetch(next(pairs, ()))
                    n = m.numel()
                    _update(flat[start:start + n], grad[start:start + n], m, v, *scalars)
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
        """Load torch AdamW's (or PagedAdamW's) state_dict, checked as torch checks it and more
        (each state's keys, shape and values; options and hyperparameters as at construction);
        paged state goes into new pages. All or nothing: if anything fails, the optimizer and
        its pager stay exactly as they were."""
        old, params = (self.state, self.param_groups), [p for g in self.param_groups
                                                        for p in g["params"]]
        try:
            with self.pager.transaction() if self.is_paged else contextlib.nullcontext():
                super().load_state_dict({**state_dict, "state": {}})   # the groups' checks
                for group in self.param_groups:      # options and values, as at construction
                    check_adamw_options(group, "load_state_dict")
                ids = dict(zip([i for g in state_dict["param_groups"] for i in g["params"]],
                               params))
                new = {ids[i]: self._checked(ids, i, s) for i, s in state_dict["state"].items()}
                for s in old[0].values() if self.is_paged else ():
                    self.pager.free([pid for k in STATE_KEYS for pid in s[k]])
                for p, s in new.items():
                    for k in STATE_KEYS:
                        s[k] = (self.pager.alloc(p.numel(), s[k].dtype, data=s[k])
                                if self.is_paged else s[k])
                self.state = defaultdict(dict, new)
        except BaseException:
            self.state, self.param_groups = old
            raise

    def _checked(self, ids: dict, i, saved: dict) -> dict:
        """A copy of parameter i's saved state in this optimizer's dtype, or a ValueError."""
        where = f"PagedAdamW.load_state_dict: the state of parameter {i!r}"
        if i not in ids:
            raise ValueError(f"{where}: no such parameter in the state_dict's param_groups")
        return check_adamw_state(saved, ids[i], self._state_dtype(ids[i]), where)
