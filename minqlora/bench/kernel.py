"""bench section `kernel`: the 4-bit dequantization kernel (lesson 05) beside its references.

CPU: each backend by name (the torch path; kernels/dequant_nf4.cu run by the CPU emulation; the
C++ CPU decoder "cpp", and each of its paths this CPU runs by name: the scalar loop, AVX2,
AVX-512) and bitsandbytes' CPU dequantize_4bit, on a 4096x4096 NF4 weight (double quantized,
as QLoRA stores it, and plain) into bf16 and fp32, on all threads and on one. The row of the
backend that backend="auto" picks here is marked. Memory traffic = (bytes read + bytes
written) / time, beside a copy of as many bytes in the same run: torch.empty_like(src)
.copy_(src) (a new tensor, as a decode returns: its first writes fault its pages in) and a copy
into an existing tensor (the memory's own speed). Then the time per million weights from 1M to
64M (--quick: 1M and 2M) on auto, each "cpp" path, bitsandbytes and a copy, and auto's
fraction of the copy's speed. Goals: auto <= 1.0x bitsandbytes (4096x4096; 1M, 4M, 16M weights
on 1 thread, 16M on 2) and >= 0.5 of a same-size copy's speed at 4M weights on 1 thread.
GPU (only where CUDA is available): kernel_gpu.py.
"""
import torch

import minqlora as mq
from minqlora.backends import auto_backend, empty_output
from minqlora.bench import interleaved_best, load, optional, print_table, thread_counts, threads
from minqlora.build import CompilerUnavailable
from minqlora.cpu_decode import cpu_paths, decode_cpp
from minqlora.double_quant import constants_nbytes
from minqlora.emulate import build_emulation


def traffic(n: int, nested: bool, dtype: torch.dtype) -> int:
    """Bytes a dequantization moves for n weights at blocksize 64: packed + constants + output.

    >>> traffic(4096 * 4096, True, torch.bfloat16)   # 8 MiB + 256 KiB + 4 KiB + 4 B + 32 MiB
    42209284
    """
    return (n + 1) // 2 + constants_nbytes(n, 64, nested) + n * torch.finfo(dtype).bits // 8


def _bnb_pair(bnb, w, nested):
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                 compress_statistics=nested)
    return lambda: bnb.functional.dequantize_4bit(packed, state)


def alternating_best(cases: dict, rounds: int) -> dict:
    """bench.interleaved_best, every other round in reverse order: a case run right after a copy
    of tens of MB finds its input evicted from the caches; reversed, it runs after its other
    neighbour, so each case has a round where a decode, not a copy, ran before it."""
    names, best = list(cases), dict.fromkeys(cases, float("inf"))
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        times = interleaved_best({k: cases[k] for k in order}, rounds=1, warmup=r == 0)
        best = {k: min(best[k], times[k]) for k in names}
    return best


def _cpp_paths() -> list:
    """The paths of backend "cpp" this CPU runs (cpu_decode.cpu_paths), none without a compiler."""
    try:
        return cpu_paths()
    except CompilerUnavailable:                     # the decoder's: CppDecoderUnavailable
        return []


def _path_case(packed, state, dtype, path):
    """A decode as dequantize_4bit makes it (into a new tensor), on one path of backend "cpp"."""
    return lambda: decode_cpp(packed, state, empty_output(state.shape.numel(), dtype, "cpu"),
                              path=path)


def _cases(w, nested, dtype, bnb, compiled):
    """{row name: fn} decoding w's NF4 bytes into dtype, plus the two copies of as many bytes."""
    packed, state = mq.quantize_4bit(w.to(dtype), 64, double_quant=nested)
    auto = auto_backend(packed.device)
    fns = {}
    for backend in ("torch",) + (("emulate", "cpp") if compiled else ()):
        name = backend + (" (= auto)" if backend == auto else "")
        fns[name] = lambda b=backend: mq.dequantize_4bit(packed, state, backend=b)
    paths = _cpp_paths() if compiled else []
    for path in paths:
        fns[f"cpp {path}" + (" (cpp's pick)" if path == paths[-1] else "")] = \
            _path_case(packed, state, dtype, path)
    if bnb is not None:
        fns["bitsandbytes"] = _bnb_pair(bnb, w.to(dtype), nested)
    src = torch.ones(traffic(w.numel(), nested, dtype) // 2, dtype=torch.uint8)   # read + write
    dst = torch.empty_like(src)                                                  # as many bytes
    fns["copy, new tensor"] = lambda: torch.empty_like(src).copy_(src)
    fns["copy, existing tensor"] = lambda: dst.copy_(src)
    return fns


def run_cpu(quick: bool = False) -> dict:
    bnb, rounds, size = optional("bitsandbytes"), 3 if quick else 7, 1024 if quick else 4096
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    try:
        build_emulation(), cpu_paths()
        compiled = True
    except CompilerUnavailable as e:                # either library's
        print(f"\n[kernel] emulation and C++ decoder skipped: {e}")
        compiled = False
    auto = auto_backend(w.device)
    rows, ratios, bandwidth = [], {}, {}
    for n in thread_counts():
        for nested in (True, False):
            for dtype in (torch.bfloat16, torch.float32):
                with threads(n):
                    times = alternating_best(_cases(w, nested, dtype, bnb, compiled), rounds)
                moved, ref = traffic(w.numel(), nested, dtype), times.get("bitsandbytes")
                mine = next(t for name, t in times.items() if name.endswith("(= auto)"))
                if ref:
                    ratios[n] = max(ratios.get(n, 0.0), mine / ref)
                if nested and dtype == torch.bfloat16:
                    bandwidth[n] = [moved / t for t in (mine, times["copy, new tensor"],
                                                        times["copy, existing tensor"])]
                for name, t in times.items():
                    rows.append([n, name, "nested" if nested else "plain", str(dtype)[6:],
                                 f"{t * 1e3:.2f}", f"{moved / t / 1e9:.1f}",
                                 f"{times['copy, new tensor'] / t:.2f}",
                                 f"{t / ref:.2f}x" if ref else "-"])
    print_table(f"kernel (CPU): dequantize {size}x{size} NF4, best of {rounds} interleaved "
                f"rounds; auto = {auto}; GB/s = (bytes read + written) / time; {load()}",
                ["threads", "backend", "absmax", "out", "ms", "GB/s", "x copy speed",
                 "time / bnb"], rows)
    print('[kernel] backend "cuda" needs a CUDA GPU (the GPU section below)')
    if compiled:
        print(f"[kernel] backend cpp's paths on this CPU: {', '.join(_cpp_paths())} (auto runs "
              f"the last); bitsandbytes {getattr(bnb, '__version__', '(absent)')}: its native "
              f"CPU dequantize, picked by torch's CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
    for n, (mine, fresh, existing) in bandwidth.items():
        print(f"[kernel] threads={n}: dequantize (auto, nested, bf16) moves {mine / 1e9:.1f} "
              f"GB/s: {mine / fresh:.2f}x a copy of as many bytes into a new tensor "
              f"({fresh / 1e9:.1f} GB/s), {mine / existing:.2f}x one into an existing tensor "
              f"({existing / 1e9:.1f} GB/s)")
    return {f"dequantize {size}x{size}, worst of nested/plain x bf16/fp32 (auto vs bnb)":
            (1.0, ratios)} if ratios else {}


def run_sizes(quick: bool = False) -> dict:
    """Dequantize time per million weights, 1M .. 64M weights (NF4 nested -> bf16), on auto, on
    each path of backend "cpp", bitsandbytes and a copy of as many bytes into a new tensor; and
    auto's speed as a fraction of the copy's (copy time / auto time)."""
    bnb, paths = optional("bitsandbytes"), _cpp_paths()
    sizes = [1 << k for k in range(20, 22 if quick else 27)]
    gen = torch.Generator().manual_seed(0)
    rows, times = [], {}                                   # times[threads, M][case]: us per M
    for numel in sizes:
        w = torch.randn(numel // 4096, 4096, generator=gen).bfloat16()
        packed, state = mq.quantize_4bit(w)
        cases = {"auto": lambda: mq.dequantize_4bit(packed, state)}
        cases.update({f"cpp {p}": _path_case(packed, state, torch.bfloat16, p) for p in paths})
        if bnb is not None:
            cases["bitsandbytes"] = _bnb_pair(bnb, w, True)
        src = torch.ones(traffic(numel, True, torch.bfloat16) // 2, dtype=torch.uint8)
        cases["copy, new tensor"] = lambda: torch.empty_like(src).copy_(src)
        for n in thread_counts():
            with threads(n):
                best = alternating_best(cases, rounds=3 if quick else 7)
            t = times[n, numel >> 20] = {c: s / (numel / 2**20) * 1e6 for c, s in best.items()}
            ref = t.get("bitsandbytes")
            rows.append([n, f"{numel >> 20}M", *[f"{t[c]:.0f}" for c in cases],
                         f"{t['auto'] / ref:.2f}x" if ref else "-",
                         f"{t['copy, new tensor'] / t['auto']:.2f}"])
    print_table(f"[kernel] dequantize time per million weights (us / M), NF4 nested -> bf16, "
                f"auto = {auto_backend(torch.device('cpu'))}, best of {3 if quick else 7} "
                f"interleaved rounds, {load()}",
                ["threads", "weights", *cases, "auto / bnb", "of a copy's speed"],
                sorted(rows, key=lambda r: -r[0]))
    return _size_goals(times)


def _size_goals(times: dict) -> dict:
    """The issue's goals from run_sizes' times: auto <= 1.0x bitsandbytes at 1M, 4M, 16M on 1
    thread and 16M on 2; auto >= 0.5 of a copy's speed (time <= 2.0x a copy's) at 4M, 1 thread."""
    vs_bnb, vs_copy = {}, {}
    for (n, size), t in times.items():
        if "bitsandbytes" in t and ((n == 1 and size in (1, 4, 16)) or (n > 1 and size == 16)):
            vs_bnb[n] = max(vs_bnb.get(n, 0.0), t["auto"] / t["bitsandbytes"])
        if n == 1 and size == 4:
            vs_copy[1] = t["auto"] / t["copy, new tensor"]
    goals = {}
    if vs_bnb:
        goals["dequantize 1M, 4M, 16M weights on 1 thread, 16M on 2 (auto vs bnb)"] = (1.0, vs_bnb)
    if vs_copy:
        goals["dequantize 4M weights, time / a copy's of as many bytes (>= 0.5 of its speed)"] = \
            (2.0, vs_copy)
    return goals


def run(quick: bool = False) -> dict:
    from minqlora.bench.kernel_gpu import run_gpu

    goals = run_cpu(quick)
    goals.update(run_sizes(quick))
    run_gpu(quick)
    return goals
