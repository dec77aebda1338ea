"""Bench `quant`: quantize_4bit and dequantize_4bit (NF4 + double quantization, backend "auto")
of a 4096 x 4096 bf16 weight beside bitsandbytes' CPU code (its quantize_4bit: PyTorch ops plus
a C++ quantize_blockwise for the constants; its dequantize_4bit: a C++ loop) and torchao's
NF4Tensor (pure PyTorch), interleaved round after round, best of each, on all threads and on
one; the quantize calls and the dequantize calls in two separate sets of rounds (a dequantize
right after a quantize writes its fresh 32 MiB output into memory the quantize just churned,
which on a virtual machine cost 10-35 ms more, at random). Ratio = minqlora's time / the
reference's (< 1: minqlora is faster).
Goal: <= 1.0x bitsandbytes for both. --quick: 1024 x 1024.
"""
import torch

from ..backends import auto_backend, dequantize_4bit
from ..quant_state import quantize_4bit
from . import interleaved_best, optional, print_table, thread_counts, threads


def _references(weight):
    """{name: (quantize fn, dequantize fn)} of each installed reference."""
    refs = {}
    bnb = optional("bitsandbytes.functional")
    if bnb is not None:
        def bnb_quantize():
            return bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                     compress_statistics=True)
        packed, state = bnb_quantize()
        refs["bitsandbytes (CPU)"] = (bnb_quantize, lambda: bnb.dequantize_4bit(packed, state))
    nf4_tensor = optional("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    if nf4_tensor is not None:
        nf4 = nf4_tensor.to_nf4(weight, block_size=64, scaler_block_size=256)
        refs["torchao NF4Tensor"] = (lambda: nf4_tensor.to_nf4(weight, 64, 256),
                                     nf4.get_original_weight)
    return refs


def run(quick: bool = False) -> dict:
    size = 1024 if quick else 4096
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).bfloat16()
    packed, state = quantize_4bit(weight)
    ours = f"minqlora (auto = {auto_backend(weight.device)})"
    impls = {ours: (lambda: quantize_4bit(weight), lambda: dequantize_4bit(packed, state))}
    impls.update(_references(weight))
    bnb = "bitsandbytes (CPU)"
    rows, goals = [], {}
    for n in thread_counts():
        best = {}
        for i in (0, 1):        # quantize calls apart from dequantize calls: each quantize
            with threads(n):    # frees big temporaries, and the memory a dequantize then gets
                best.update(interleaved_best({(name, i): fns[i] for name, fns in impls.items()},
                                             rounds=3 if quick else 5))   # for its output
        for name in impls:
            ratios = [f"{best[ours, i] / best[name, i]:.2f}x" for i in (0, 1)]
            rows.append([n, name, f"{best[name, 0] * 1e3:.1f}", ratios[0],
                         f"{best[name, 1] * 1e3:.2f}", ratios[1]])
        if bnb in impls:
            for i, what in enumerate(("quantize", "dequantize")):
                goal = goals.setdefault(f"{what} NF4+DQ {size}x{size} bf16 (vs bitsandbytes)",
                                        (1.0, {}))
                goal[1][n] = best[ours, i] / best[bnb, i]
    if len(impls) == 1:
        rows.append(["-", "(torchao, bitsandbytes not installed)", "-", "-", "-", "-"])
    print_table(f"[quant] NF4 + double quant, {size}x{size} bf16, best of {3 if quick else 5} "
                "interleaved rounds (ratio: minqlora's time / this row's; goal <= 1.0x bnb)",
                ["threads", "implementation", "quantize ms", "ratio", "dequantize ms", "ratio"],
                rows)
    return goals
