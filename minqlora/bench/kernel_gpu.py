"""bench section `kernel`, its GPU part (only where CUDA is available): the kernel through CuPy,
the torch path and bitsandbytes, as effective bandwidth = (bytes read + bytes written) / time and
its fraction of the device's peak (memory clock x bus width from the CUDA runtime), for
4096x4096 and 8192x8192. Goal: the kernel at >= 70% of peak and at least as fast as
bitsandbytes. (kernel.py runs it after the CPU part.)
"""
import torch

import minqlora as mq
from minqlora.bench import optional, print_table
from minqlora.bench.kernel import _bnb_pair, traffic


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
