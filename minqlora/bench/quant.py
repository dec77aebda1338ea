"""Bench: quantize_4bit / dequantize_4bit (NF4 + double quantization) on a 4096 x 4096 bf16
weight, beside torchao's NF4Tensor (pure PyTorch) and bitsandbytes' CPU path when installed.
Goal: faster than torchao on both. Ratios are reference time / minqlora time (>1: we are faster).
"""
import torch

from ..backends import dequantize_4bit
from ..quant_state import quantize_4bit
from . import interleaved_best, optional, print_table


def references(weight):
    """(name, quantize fn, dequantize fn) for each installed reference."""
    refs = []
    nf4_tensor = optional("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    if nf4_tensor is not None:
        nf4 = nf4_tensor.to_nf4(weight, block_size=64, scaler_block_size=256)
        refs.append(("torchao NF4Tensor", lambda: nf4_tensor.to_nf4(weight, 64, 256),
                     nf4.get_original_weight))
    bnb = optional("bitsandbytes.functional")
    if bnb is not None:
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        refs.append(("bitsandbytes (CPU)",
                     lambda: bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True),
                     lambda: bnb.dequantize_4bit(packed, state)))
    return refs


def run(quick: bool = False) -> None:
    size = 1024 if quick else 4096
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).bfloat16()
    packed, state = quantize_4bit(weight)
    cases = {"minqlora": (lambda: quantize_4bit(weight), lambda: dequantize_4bit(packed, state))}
    cases.update((name, (q, d)) for name, q, d in references(weight))
    best = interleaved_best({(name, i): fns[i] for name, fns in cases.items() for i in (0, 1)},
                            rounds=3 if quick else 5)
    ours_q, ours_d = best["minqlora", 0], best["minqlora", 1]
    rows = [[name, f"{best[name, 0] * 1e3:.1f}", f"{best[name, 0] / ours_q:.2f}",
             f"{best[name, 1] * 1e3:.1f}", f"{best[name, 1] / ours_d:.2f}"] for name in cases]
    if len(rows) == 1:
        rows.append(["(torchao, bitsandbytes not installed)", "-", "-", "-", "-"])
    print_table(f"[quant] NF4 + double quant, {size}x{size} bf16, threads={torch.get_num_threads()}",
                ["implementation", "quantize ms", "ratio", "dequantize ms", "ratio"], rows)
