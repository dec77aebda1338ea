"""`python -m minqlora bench`: speed checks, one small module per lesson's hot path.

Each section module has `run(quick: bool) -> None` that prints a table; ratios come from one
run on this machine, so read them as "about", not as a contract. Optional references
(bitsandbytes, torchao) are imported inside the sections, guarded, never by the library.
"""
import importlib
import time

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


def interleaved_best(cases: dict, rounds: int = 7) -> dict:
    """{name: best seconds} of each zero-argument function, over `rounds` rounds in which every
    case runs once (after one untimed warmup each). Interleaving means a busy machine slows all
    cases alike, so their ratios stay meaningful."""
    for fn in cases.values():
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
    try:
        return importlib.import_module(module)
    except Exception:  # absent, or present but broken on this machine
        return None


def run_bench(sections=None, quick: bool = False) -> None:
    """Run the named sections (default: all of SECTIONS), checked before any runs."""
    unknown = [name for name in sections or () if name not in SECTIONS]
    if unknown:
        raise ValueError(f"run_bench: unknown section(s) {unknown}; choose from {SECTIONS}")
    for name in sections or SECTIONS:
        try:
            section = importlib.import_module(f"minqlora.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"minqlora.bench.{name}":
                raise
            print(f"\n[{name}] not built yet")
            continue
        section.run(quick=quick)
