"""Bench `lora`: forward + backward of a QLoRA layer vs a LoRA layer over a bf16 weight.

Both layers: the same 4096x4096 weight, r = 64, alpha = 16, float32 adapters, bf16 compute,
the same bf16 input of 256 tokens (a micro-batch of e.g. 1 x 256) that requires grad, as
inside a model. The only extra work of QLoRA is dequantizing the weight twice (forward and
backward); that time is shown on its own line. --quick: 1024x1024, 64 tokens.
"""
import torch
from torch import nn

from . import best_time, print_table
from ..linear4bit import Linear4bit
from ..lora import LoRALinear


def _step(layer, x, grad):
    x.grad = None
    layer(x).backward(grad)


def run(quick: bool = False) -> None:
    size, tokens = (1024, 64) if quick else (4096, 256)
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(size, size, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(size, size, generator=gen) * 0.02)
    qlora = LoRALinear(Linear4bit.from_linear(linear), r=64, alpha=16)
    lora = LoRALinear(nn.Linear(size, size, bias=False, dtype=torch.bfloat16), r=64, alpha=16)
    with torch.no_grad():
        lora.base.weight.copy_(linear.weight)
    x = torch.randn(tokens, size, generator=gen).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(tokens, size, generator=gen).to(torch.bfloat16)
    t_qlora = best_time(lambda: _step(qlora, x, grad))
    t_lora = best_time(lambda: _step(lora, x, grad))
    t_deq = best_time(lambda: qlora.base.dequantize(torch.bfloat16))
    t_mm = best_time(lambda: nn.functional.linear(x.detach(), lora.base.weight))
    rows = [
        ["LoRA over a bf16 weight", f"{t_lora * 1e3:.1f}", "1.00"],
        ["QLoRA (NF4 + double quant)", f"{t_qlora * 1e3:.1f}", f"{t_qlora / t_lora:.2f}"],
        ["  of which 2 x dequantize", f"{2 * t_deq * 1e3:.1f}", f"{2 * t_deq / t_lora:.2f}"],
        ["  one bf16 matmul, for scale", f"{t_mm * 1e3:.1f}", f"{t_mm / t_lora:.2f}"],
    ]
    print_table(f"[lora] forward + backward, {size}x{size} weight, {tokens} tokens, r=64, "
                f"{torch.get_num_threads()} threads (goal: QLoRA within 2x of LoRA)",
                ["layer", "ms", "x LoRA"], rows)
