"""bench section `kernel`: the 4-bit dequantization kernel (lesson 05) beside its references.

CPU: each backend by name (the torch path; kernels/dequant_nf4.cu run by the CPU emulation; the
C++ CPU decoder "cpp"; "cuda" needs a GPU) and bitsandbytes' CPU dequantize_4bit, on a 4096x4096
NF4 weight (double quantized, as QLoRA stores it, and plain) into bf16 and fp32, on all threads
and on one. The
row of the backend that backend="auto" picks here is marked. Memory traffic = (bytes read +
bytes written) / time, beside a copy of as many bytes in the same run: torch.empty_like(src)
.copy_(src) (a new tensor, as a decode returns: its first writes fault its pages in) and a copy
into an existing tensor (the memory's own speed). Then the time per million weights from 1M to
64M (--quick: 1M and 2M), to show that the cost grows linearly. Goal: auto <= 1.0x bitsandbytes.
GPU (only where CUDA is available): the kernel through CuPy, the torch path and bitsandbytes,
as effective bandwidth = (bytes read + bytes written) / time and its fraction of the device's
peak (memory clock x bus width from the CUDA runtime), for 4096x4096 and 8192x8192.
Goal: the kernel at >= 70% of peak and at least as fast as bitsandbytes.
"""
import torch

import minqlora as mq
from minqlora.backends import auto_backend
from minqlora.bench import interleaved_best, optional, print_table, thread_counts, threads
from minqlora.double_quant import constants_nbytes
from minqlora.cpu_decode import build_decoder
from minqlora.build import EmulationUnavailable
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


def _cases(w, nested, dtype, bnb, compiled):
    """{row name: fn} decoding w's NF4 bytes into dtype, plus the two copies of as many bytes."""
    packed, state = mq.quantize_4bit(w.to(dtype), 64, double_quant=nested)
    auto = auto_backend(packed.device)
    fns = {}
    for backend in ("torch",) + (("emulate", "cpp") if compiled else ()):
        name = backend + (" (= auto)" if backend == auto else "")
        fns[name] = lambda b=backend: mq.dequantize_4bit(packed, state, backend=b)
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
        build_emulation(), build_decoder()
        compiled = True
    except EmulationUnavailable as e:
        print(f"\n[kernel] emulation and C++ decoder skipped: {e}")
        compiled = False
    auto = auto_backend(w.device)
    rows, ratios, bandwidth = [], {}, {}
    for n in thread_counts():
        for nested in (True, False):
            for dtype in (torch.bfloat16, torch.float32):
                with threads(n):
                    times = interleaved_best(_cases(w, nested, dtype, bnb, compiled), rounds)
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
                f"rounds; auto = {auto}; GB/s = (bytes read + written) / time",
                ["threads", "backend", "absmax", "out", "ms", "GB/s", "x copy speed",
                 "time / bnb"], rows)
    print('[kernel] backend "cuda" needs a CUDA GPU (the GPU section below)')
    for n, (mine, fresh, existing) in bandwidth.items():
        print(f"[kernel] threads={n}: dequantize (auto, nested, bf16) moves {mine / 1e9:.1f} "
              f"GB/s: {mine / fresh:.2f}x a copy of as many bytes into a new tensor "
              f"({fresh / 1e9:.1f} GB/s), {mine / existing:.2f}x one into an existing tensor "
              f"({existing / 1e9:.1f} GB/s)")
    return {f"dequantize {size}x{size}, worst of nested/plain x bf16/fp32 (auto vs bnb)":
            (1.0, ratios)} if ratios else {}


def run_sizes(quick: bool = False) -> dict:
    """Dequantize time per million weights, 1M .. 64M weights (NF4 nested -> bf16)."""
    bnb = optional("bitsandbytes")
    sizes = [1 << k for k in range(20, 22 if quick else 27)]
    gen = torch.Generator().manual_seed(0)
    auto, rows, ratios = None, [], {}
    for numel in sizes:
        w = torch.randn(numel // 4096, 4096, generator=gen).bfloat16()
        packed, state = mq.quantize_4bit(w)
        auto = auto_backend(packed.device)
        cases = {"auto": lambda: mq.dequantize_4bit(packed, state),
                 "torch": lambda: mq.dequantize_4bit(packed, state, backend="torch")}
        if bnb is not None:
            cases["bitsandbytes"] = _bnb_pair(bnb, w, True)
        src = torch.ones(traffic(numel, True, torch.bfloat16) // 2, dtype=torch.uint8)
        cases["copy, new tensor"] = lambda: torch.empty_like(src).copy_(src)
        for n in thread_counts():
            with threads(n):
                times = interleaved_best(cases, rounds=3)
            per_m = {name: t / (numel / 2**20) * 1e6 for name, t in times.items()}  # us per M
            ref = per_m.get("bitsandbytes")
            if ref:
                ratios[n] = max(ratios.get(n, 0.0), per_m["auto"] / ref)
            rows.append([n, f"{numel // 2**20}M", *[f"{per_m[c]:.0f}" for c in cases],
                         f"{per_m['auto'] / ref:.2f}x" if ref else "-"])
    print_table(f"[kernel] dequantize time per million weights (us / M), NF4 nested -> bf16, "
                f"auto = {auto}, best of 3 interleaved rounds (flat rows: linear cost)",
                ["threads", "weights", *cases, "auto / bnb"],
                sorted(rows, key=lambda r: -r[0]))
    return {"dequantize 1M..64M weights, worst size (auto vs bnb)": (1.0, ratios)} if ratios else {}


def _cuda_time(fn, repeat: int) -> float:
    """Best of `repeat` CUDA-event timings of fn() in seconds, after a warmup."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def peak_bandwidth() -> float:
    """The device's peak memory bandwidth in bytes/s from the CUDA runtime (via CuPy), or nan."""
    cupy = optional("cupy")
    if cupy is None:
        return float("nan")
    try:       # cudaDevAttrMemoryClockRate (kHz) = 36, cudaDevAttrGlobalMemoryBusWidth (bits) = 37
        clock_khz, bus_bits = (cupy.cuda.runtime.deviceGetAttribute(a, torch.cuda.current_device())
                               for a in (36, 37))
    except Exception:
        return float("nan")
    return 2 * clock_khz * 1e3 * bus_bits / 8                  # double data rate: 2 per clock


def run_gpu(quick: bool = False) -> None:
    if not torch.cuda.is_available():
        print("\n[kernel] GPU section: no CUDA GPU on this machine, skipped")
        return
    bnb, peak, repeat = optional("bitsandbytes"), peak_bandwidth(), 10 if quick else 50
    rows, verdicts = [], []
    has_cupy = optional("cupy") is not None
    for side in (4096, 8192):
        w = torch.randn(side, side, device="cuda", dtype=torch.bfloat16)
        packed, state = mq.quantize_4bit(w, 64, double_quant=True)
        fns = {"torch": lambda: mq.dequantize_4bit(packed, state, backend="torch")}
        if has_cupy:
            fns["cuda kernel"] = lambda: mq.dequantize_4bit(packed, state, backend="cuda")
        if bnb is not None:
            fns["bitsandbytes"] = _bnb_pair(bnb, w, True)
        moved = traffic(w.numel(), True, torch.bfloat16)               # bytes read + written
        copy_src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        fns["copy (same bytes)"] = lambda: copy_src.clone()            # reads + writes as many
        times = {name: _cuda_time(fn, repeat) for name, fn in fns.items()}
        for name, t in times.items():
            gbs = moved / t
            rows.append([name, f"{side}x{side}", f"{t * 1e6:.1f}", f"{gbs / 1e9:.0f}",
                         f"{gbs / peak:.0%}"])
        if "cuda kernel" in times:
            t = times["cuda kernel"]
            fraction = moved / t / peak
            speed = times["bitsandbytes"] / t if "bitsandbytes" in times else None  # > 1: faster
            met = fraction >= 0.7 and (speed is None or speed >= 1)
            versus = "no bitsandbytes" if speed is None else f"{speed:.2f}x bitsandbytes' speed"
            verdicts.append(f"{side}x{side}: {fraction:.0%} of peak, {versus}: "
                            f"{'met' if met else 'NOT met'}")
    name = torch.cuda.get_device_name()
    print_table(f"kernel (GPU, {name}, peak {peak / 1e9:.0f} GB/s): NF4 nested -> bf16",
                ["backend", "shape", "us", "GB/s", "of peak"], rows)
    for verdict in verdicts:
        print(f"[kernel] goal (>= 70% of peak, >= bitsandbytes) {verdict}")
    if not has_cupy:
        print('[kernel] CuPy is not installed: the cuda kernel row needs `pip install -e ".[gpu]"`')


def run(quick: bool = False) -> dict:
    goals = run_cpu(quick)
    goals.update(run_sizes(quick))
    run_gpu(quick)
    return goals
