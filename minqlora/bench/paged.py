"""Bench: one optimizer step of PagedAdamW vs torch.optim.AdamW(foreach=False) on 10M fp32
parameters (10 tensors of 1000 x 1000), with no evictions and with every page evicted before
every step (so the step pages all 80 MB of state in, and the next eviction pages it out).
Goal: within 1.3x of torch without evictions. Ratio = our time / torch's time (< 1.3: goal
met). On a CPU-only machine "device" and "host" are both CPU memory: the paging is simulated,
so the eviction row measures memcpy, not PCIe. With CUDA present the bench runs there (a
path not yet run on a GPU).
"""
import torch

from ..paged_adam import PagedAdamW, Pager
from . import best_time, print_table


def _params(numel_each: int, count: int = 10, device="cpu"):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel_each, generator=g).to(device))
              for _ in range(count)]
    for p in params:
        p.grad = torch.randn(numel_each, generator=g).to(device) * 1e-3
    return params


def run(quick: bool = False) -> None:
    numel_each = 100_000 if quick else 1_000_000
    total, rounds = 10 * numel_each, (30 if quick else 6)
    device = "cuda" if torch.cuda.is_available() else "cpu"   # the CUDA run: never tried yet
    paged = lambda ps: PagedAdamW(ps, pager=Pager(None, device=device))  # noqa: E731
    cases = [("torch AdamW(foreach=False)", lambda ps: torch.optim.AdamW(ps, foreach=False), False),
             ("PagedAdamW is_paged=False", lambda ps: PagedAdamW(ps, is_paged=False), False),
             ("PagedAdamW, no evictions", paged, False),
             ("PagedAdamW, evict every step", paged, True)]
    setups = []
    for name, make, evict in cases:
        opt = make(_params(numel_each, device=device))
        opt.step()                                     # state exists before timing
        pager = getattr(opt, "pager", None)

        def step(opt=opt, pager=pager, evict=evict):
            if evict:
                pager.evict_all()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
        setups.append((name, step, pager, pager.stats() if pager else None))
    best = [float("inf")] * len(setups)
    for _ in range(rounds):          # interleaved, best of each: a busy machine hits all alike
        for i, (_, step, _, _) in enumerate(setups):
            best[i] = min(best[i], best_time(step, repeat=1, warmup=0))
    rows = []
    for (name, _, pager, before), seconds in zip(setups, best):
        paging = "-"
        if pager:
            ins = (pager.page_ins - before["page_ins"]) / rounds
            moved = (pager.bytes_moved - before["bytes_moved"]) / rounds / 2 ** 20
            paging = f"{ins:.0f} / {moved:.0f}"
        rows.append([name, f"{seconds * 1e3:.1f}", f"{seconds / best[0]:.2f}", paging])
    where = (f"threads={torch.get_num_threads()} (CPU: device simulated)" if device == "cpu"
             else "on CUDA")
    print_table(f"[paged] one AdamW step, {total / 1e6:.0f}M fp32 parameters, 2 MiB pages, {where}",
                ["optimizer", "ms/step", "ratio vs torch", "page-ins / MiB moved per step"], rows)
