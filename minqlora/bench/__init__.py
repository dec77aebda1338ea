"""`python -m minqlora bench`: speed checks, one small module per lesson's hot path.

Each section module has `run(quick: bool)` that prints a table and may return its goals,
{goal: (goal ratio, {threads: measured ratio})}, which run_bench sums up at the end; ratios come
from one run on this machine, so read them as "about", not as a contract. Optional references
(bitsandbytes, torchao) are imported inside the sections, guarded, never by the library.
"""
import contextlib
import importlib
import os
import time

import torch

SECTIONS = ("quant", "kernel", "lora", "paged", "limit")


def best_time(fn, repeat: int = 3, warmup: int = 1) -> float:
    """The best of `repeat` wall-clock runs of fn() in seconds, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(cases: dict, rounds: int = 7, warmup: bool = True) -> dict:
    """{name: best seconds} of each zero-argument function, over `rounds` rounds in which every
    case runs once (after one untimed warmup each, unless warmup=False: for cases of seconds).
    Interleaving means a busy machine slows all cases alike, so their ratios stay meaningful."""
    for fn in cases.values() if warmup else ():
        fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def print_table(title: str, headers, rows) -> None:
    """Print rows (lists of str) under headers as an aligned text table."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(f"\n{title}\n" + line(headers) + "\n" + line("-" * w for w in widths))
    for r in rows:
        print(line(r))


def optional(module: str):
    """Import an optional reference (bitsandbytes, torchao) or return None if it is absent."""
    if module == "bitsandbytes":
        from .references import import_bitsandbytes
        return import_bitsandbytes()
    try:
        return importlib.import_module(module)
    except Exception:  # absent, or present but broken on this machine
        return None


def thread_counts() -> list:
    """All of torch's threads, then one (which a busy, shared machine disturbs least)."""
    return list(dict.fromkeys((torch.get_num_threads(), 1)))


@contextlib.contextmanager
def threads(n: int):
    """torch.set_num_threads(n) inside the block, the old count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load() -> str:
    """The machine's 1-minute load average beside its CPU count (a busy machine: noisier)."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def run_bench(sections=None, quick: bool = False) -> None:
    """Run the named sections (default: all of SECTIONS), checked before any runs."""
    unknown = [name for name in sections or () if name not in SECTIONS]
    if unknown:
        raise ValueError(f"run_bench: unknown section(s) {unknown}; choose from {SECTIONS}")
    print(f"[bench] {load()}, torch threads {torch.get_num_threads()}")
    from .references import describe
    print(f"[bench] {describe(optional('bitsandbytes'))}")
    goals = {}
    for name in sections or SECTIONS:
        try:
            section = importlib.import_module(f"minqlora.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"minqlora.bench.{name}":
                raise
            print(f"\n[{name}] not built yet")
            continue
        goals.update(section.run(quick=quick) or {})
    if goals:
        counts = sorted({n for _, measured in goals.values() for n in measured}, reverse=True)
        rows = [[name] + [f"{measured[n]:.2f}x" if n in measured else "-" for n in counts]
                + [f"<= {goal:.1f}x", "met" if all(r <= goal for r in measured.values())
                   else "NOT met"] for name, (goal, measured) in goals.items()]
        print_table(f"[goals] minqlora's time / the reference's, same run ({load()} at the end)",
                    ["goal", *[f"threads={n}" for n in counts], "goal", ""], rows)
