"""The tour: the course's story in one run, section by section (lesson 09 and the README).

  1. quantization  error and bits per parameter of int4 / FP4 / NF4, without and with double
                   quantization, on a seeded Gaussian weight
  2. kernel        the CUDA dequantization kernel (on a GPU) or its CPU emulation, and the CPU
                   decoder, vs the torch path
  3. fine-tuning   a mini-LLaMA pretrained on addition, fine-tuned on subtraction five ways:
                   full, 16-bit LoRA, QLoRA with NF4 / FP4 / int4 (progress bars on stderr)
  4. paging        PagedAdamW's counters in the NF4 run, its state under a budget of half its size
  5. memory        the calculator's table for LLaMA 7B to 65B and the paper's headline
  6. limit         is NF4 optimal? error and bits of INT4 / FP4 / NF4 (+ DQ) / AF4 / Lloyd-Max /
                   MXFP4 / NVFP4 on Gaussian and toy-model weights; NF4's distance to the limit

Each section is a function that prints; `tour()` runs them in order. It only calls the public
pieces of the earlier lessons. What has run on a GPU: see the README's GPU section.
"""
import time

import torch

from .backends import dequantize_4bit
from .nf4 import CODES
from .quant_state import quantize_4bit


def quantization_table(seed: int = 0, size: int = 4096) -> list[tuple]:
    """Rows (type, double_quant, rmse, max_err, bits/param) for a seeded N(0, 0.02) weight."""
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(seed)) * 0.02
    rows = []
    for quant_type in CODES:
        for double_quant in (False, True):
            packed, state = quantize_4bit(weight, quant_type=quant_type, double_quant=double_quant)
            err = dequantize_4bit(packed, state) - weight
            bits = 8 * (packed.numel() + state.nbytes()) / weight.numel()
            rows.append((quant_type, double_quant, err.pow(2).mean().sqrt().item(),
                         err.abs().max().item(), bits))
    return rows


def print_quantization_table(seed: int = 0, size: int = 4096) -> None:
    print(f"Quantization of a seeded {size}x{size} Gaussian weight (std 0.02), blocksize 64")
    print(f"{'type':<6}{'double quant':<14}{'RMSE':>12}{'max error':>12}{'bits/param':>12}")
    for quant_type, dq, rmse, max_err, bits in quantization_table(seed, size):
        print(f"{quant_type:<6}{'yes' if dq else 'no':<14}{rmse:>12.3e}{max_err:>12.3e}"
              f"{bits:>12.4f}")


def kernel_check(seed: int = 0, size: int = 1024, device: str = "cpu") -> None:
    """The .cu kernel's output against the torch path, bit for bit, on the GPU or emulated."""
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(seed)) * 0.02
    packed, state = quantize_4bit(weight.to(device))
    backend = "cuda" if packed.is_cuda else "emulate"
    where = "on the GPU through CuPy" if backend == "cuda" else "emulated on the CPU (no GPU here)"
    try:
        start = time.perf_counter()
        out = dequantize_4bit(packed, state, torch.bfloat16, backend=backend)
        seconds = time.perf_counter() - start
    except (ImportError, RuntimeError) as e:       # no compiler (EmulationUnavailable), no CuPy
        print(f"kernel: skipped ({type(e).__name__}: {e})")
        return
    want = dequantize_4bit(packed, state, torch.bfloat16, backend="torch")
    same = torch.equal(out, want)
    print(f"kernels/dequant_nf4.cu {where}, {size}x{size} NF4 -> bf16: "
          f"{'bit-identical to' if same else 'DIFFERS from'} the torch path ({seconds:.2f} s, "
          "the first call may compile it)")
    if backend == "emulate":                       # what backend="auto" runs on this CPU
        same = torch.equal(dequantize_4bit(packed, state, torch.bfloat16, backend="cpp"), want)
        print(f"kernels/dequant_cpu.cpp (backend 'cpp', auto's pick on a CPU), same weight: "
              f"{'bit-identical to' if same else 'DIFFERS from'} the torch path")


def finetune_comparison(seed: int = 0, quick: bool = False, device: str = "cpu", plot=None):
    """Pretrain the toy base, fine-tune it five ways, print the table and the pager's counters."""
    from .finetune import METHODS, finetune
    from .memory import estimate
    from .pager import Pager
    from .toy import CONFIG, make_data, pretrain
    from .training import evaluate
    base = pretrain(seed, steps=600 if quick else 1000, progress=True, device=device)
    add = evaluate(base, make_data("add", seed)["heldout"].to(device))
    sub = evaluate(base, make_data("sub", seed)["heldout"].to(device))
    print(f"base model: held-out addition accuracy {add[1]:.3f}; subtraction (the new task) "
          f"loss {sub[0]:.3f}, accuracy {sub[1]:.3f}")
    results, state_bytes = [], estimate(CONFIG, "qlora", r=16).optimizer    # finetune's r
    for method in METHODS:
        # the NF4 run keeps PagedAdamW's state under a budget of half its size (same numerics)
        paged = method == "qlora"
        pager = Pager(state_bytes // 2, page_bytes=4096, device=device) if paged else None
        results.append(finetune(base, method, seed=seed, pager=pager, progress=True,
                                device=device))                     # lesson 09's setting
    print(f"\nFine-tuning on subtraction, {len(results[0].losses)} steps each; "
          "held out: 1000 problems; accuracy: exact match of the 3-digit answer")
    print(f"{'method':<12}{'loss':>8}{'accuracy':>10}{'W error':>9}{'weights':>10}{'adapters':>10}"
          f"{'optimizer':>11}{'seconds':>9}")
    for r in results:
        b = r.bytes
        print(f"{r.method:<12}{r.heldout_loss:>8.4f}{r.accuracy:>10.3f}{r.weight_error:>9.4f}"
              f"{b['weights'] / 1e3:>8.1f}kB{b['adapters'] / 1e3:>8.1f}kB"
              f"{b['optimizer'] / 1e3:>9.1f}kB{r.seconds:>9.1f}")
    acc = {r.method: r.accuracy for r in results}
    close = abs(acc["qlora"] - acc["lora16"]) <= 0.05
    print(f"accuracy: QLoRA (NF4) {acc['qlora']:.3f}, 16-bit LoRA {acc['lora16']:.3f}: "
          + ("within 0.05, as the paper finds" if close else "more than 0.05 apart on this run")
          + " (lesson 09: every method\n>= 0.90 on the bases of seeds 0-4 and CPU kernel paths). "
          "W error: relative error of the stored\nlinear weights (NF4: lowest on seeds 0-4).")
    stats = results[2].pager_stats
    print(f"\nPagedAdamW in the NF4 run, budget {state_bytes // 2:,} bytes for "
          f"{results[2].bytes['optimizer']:,} bytes of state:\n"
          f"{stats['page_ins']:,} page-ins, {stats['page_outs']:,} page-outs, "
          f"{stats['bytes_moved'] / 1e6:.1f} MB moved, peak {stats['peak_bytes']:,} bytes resident")
    if plot:
        save_plot(results, plot)
    return results


def save_plot(results, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        steps, losses = zip(*r.heldout_curve)
        ax.plot(steps, losses, marker=".", label=f"{r.method} ({r.heldout_loss:.3f})")
    ax.set(yscale="log", xlabel="step", ylabel="held-out loss (subtraction)",
           title="Fine-tuning the toy model: QLoRA vs LoRA vs full")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def memory_table() -> None:
    from .llama_shapes import PRESETS
    from .memory import METHODS, estimate
    print("Memory to fine-tune LLaMA (GB; weights + constants + adapters + gradients + AdamW"
          " state + checkpointed activations at batch 1 x 512 tokens; r=64 on all linears)")
    print(f"{'model':<11}" + "".join(f"{m:>10}" for m in METHODS) + "   QLoRA fits one GPU of")
    for name in PRESETS:
        totals = [estimate(name, m).total / 1e9 for m in METHODS]
        fits = next((f"{g} GB" for g in (24, 48, 80) if totals[-1] < g), "more than 80 GB")
        print(f"{name:<11}" + "".join(f"{t:>10.1f}" for t in totals) + f"   {fits}")
    full, q = estimate("llama-65b", "full16"), estimate("llama-65b", "qlora")
    print(f"paper: 65B needs > 780 GB for 16-bit full fine-tuning (here {full.total / 1e9:.0f} GB)"
          f" and < 48 GB with QLoRA (here {q.total / 1e9:.1f} GB)")


def formats_comparison(seed: int = 0, quick: bool = False) -> None:
    """Lesson 11's comparison: Gaussian weights, the toy model's pretrained weights (those QLoRA
    quantizes; pretrained for fewer steps in quick mode), and the distance to the limit."""
    from .compare import compare, print_comparison, print_limit
    from .toy import pretrain
    rows = 256 if quick else 1024
    weight = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(seed))
    print_comparison(compare(weight), f"N(0, 1) weights, {rows} x 1024")
    steps = 200 if quick else 1000
    base = pretrain(seed, steps=steps)
    linears = [m.weight.detach() for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    n = sum(w.numel() for w in linears)
    print()
    print_comparison(compare(linears), f"the toy model's {len(linears)} linear weights "
                                       f"({n:,} values) after {steps} pretraining steps")
    print()
    print_limit()


def tour(seed: int = 0, quick: bool = False, device: str = "cpu", plot=None) -> None:
    size = 1024 if quick else 4096
    sections = [("1. Quantization", lambda: print_quantization_table(seed, size)),
                ("2. The dequantization kernel", lambda: kernel_check(seed, device=device)),
                ("3-4. Fine-tuning a toy model, paged optimizer",
                 lambda: finetune_comparison(seed, quick, device, plot)),
                ("5. Memory", memory_table),
                ("6. Is NF4 optimal? The 4-bit formats and the limit",
                 lambda: formats_comparison(seed, quick))]
    start = time.perf_counter()
    for title, run in sections:
        print(f"\n== {title} " + "=" * (60 - len(title)), flush=True)
        run()
    print(f"\ntour done in {time.perf_counter() - start:.0f} s")


