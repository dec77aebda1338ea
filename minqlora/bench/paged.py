"""Bench: one optimizer step of PagedAdamW vs torch.optim.AdamW(foreach=False) on 10M fp32
parameters (10 tensors of 1M), with no evictions and with a spike before every step that
evicts all 80 MB of state (timed: the page-outs, then the step's page-ins). Goal: within 1.3x
of torch without evictions; ratio = our time / torch's.

On a CPU-only machine "device" and "host" are both CPU memory: the paging is simulated, so the
eviction row measures memcpy, not PCIe. With CUDA present the bench runs there. Made steady
for a busy 2-core machine: every optimizer steps the same parameters, on one thread, in
interleaved rounds (order rotated), best of each. And glibc is told to keep freed memory (for
the rest of the process): returning the step's big temporaries to the OS would make each step
page-fault them back in, a cost that depends on allocation order, not on the optimizer.
"""
import ctypes
import time

import torch

from ..paged_adam import PagedAdamW
from ..pager import Pager
from . import print_table, threads


def _keep_freed_memory() -> None:
    try:   # glibc mallopt: M_TRIM_THRESHOLD (-1) = 1 GiB, M_MMAP_THRESHOLD (-3) = its max 32 MiB
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30), libc.mallopt(-3, 32 << 20)
    except (OSError, AttributeError):   # not glibc: noisier timings, nothing else changes
        pass


def run(quick: bool = False) -> None:
    numel_each, seconds = (100_000, 1.0) if quick else (1_000_000, 20.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel_each, generator=g).to(device))
              for _ in range(10)]
    for p in params:
        p.grad = torch.randn(numel_each, generator=g).to(device) * 1e-3
    state_bytes = 8 * 10 * numel_each
    paged = lambda budget: PagedAdamW(params, pager=Pager(budget, device=device))  # noqa: E731
    cases = [("torch AdamW(foreach=False)", torch.optim.AdamW(params, foreach=False), False),
             ("PagedAdamW is_paged=False", PagedAdamW(params, is_paged=False), False),
             ("PagedAdamW, no evictions", paged(None), False),
             ("PagedAdamW, evict every step", paged(state_bytes), True)]   # room for the state
    for _, opt, _ in cases:
        opt.step()                                         # state exists before timing
    pagers = [getattr(opt, "pager", None) for _, opt, _ in cases]
    before = [pager and pager.stats() for pager in pagers]
    best, rounds, start = [float("inf")] * len(cases), 0, time.perf_counter()
    with threads(1):
        while rounds < 3 or (time.perf_counter() - start < seconds and rounds < 100):
            for i in [(rounds + j) % len(cases) for j in range(len(cases))]:   # rotated
                _, opt, spike = cases[i]
                t0 = time.perf_counter()
                if spike:                                  # every page goes out; the step
                    pagers[i].reserve(state_bytes)         # pages them all back in
                    pagers[i].release(state_bytes)
                opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                best[i] = min(best[i], time.perf_counter() - t0)
            rounds += 1
    rows = []
    for (name, _, _), pager, was, t in zip(cases, pagers, before, best):
        moved = "-" if pager is None else "{:.0f} / {:.0f}".format(
            (pager.page_ins - was["page_ins"]) / rounds,
            (pager.bytes_moved - was["bytes_moved"]) / rounds / 2**20)
        rows.append([name, f"{t * 1e3:.1f}", f"{t / best[0]:.2f}", moved])
    where = "CPU, 1 thread, device simulated" if device == "cpu" else "on CUDA"
    print_table(f"[paged] one AdamW step, {10 * numel_each / 1e6:.0f}M fp32 parameters, 2 MiB "
                f"pages, {where}, best of {rounds} interleaved rounds",
                ["optimizer", "ms/step", "ratio vs torch", "page-ins / MiB moved per step"], rows)
