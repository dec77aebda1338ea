"""Bench `lora`: forward + backward of a QLoRA layer vs a LoRA layer over a bf16 weight.

Both layers: the same 4096x4096 weight, r = 64, alpha = 16, float32 adapters, bf16 compute,
the same bf16 input of 256 tokens (a micro-batch of e.g. 1 x 256) that requires grad, as
inside a model. The only extra work of QLoRA is dequantizing the weight twice (forward and
backward); that time is shown on its own line. The cases run interleaved, round after round,
and each keeps its best time, so a busy machine slows them all alike; then again on one thread,
which a shared machine disturbs least. --quick: 1024x1024, 64 tokens.
"""
import torch
from torch import nn

from . import interleaved_best, print_table
from ..linear4bit import Linear4bit
from ..lora import LoRALinear


def _step(layer, x, grad):
    x.grad = None
    layer(x).backward(grad)


def run(quick: bool = False) -> None:
    size, tokens, rounds = (1024, 64, 15) if quick else (4096, 256, 7)
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
    cases = {"lora": lambda: _step(lora, x, grad), "qlora": lambda: _step(qlora, x, grad),
             "dequantize": lambda: qlora.base.dequantize(torch.bfloat16),
             "matmul": lambda: nn.functional.linear(x.detach(), lora.base.weight)}
    threads, rows = torch.get_num_threads(), []
    for n in dict.fromkeys((threads, 1)):   # all threads, then one: steadier on a busy machine
        torch.set_num_threads(n)
        best = interleaved_best(cases, rounds)
        rows += [[n, name, f"{t * 1e3:.1f}", f"{t / best['lora']:.2f}"] for name, t in (
            ("LoRA over a bf16 weight", best["lora"]),
            ("QLoRA (NF4 + double quant)", best["qlora"]),
            ("  of which 2 x dequantize", 2 * best["dequantize"]),
            ("  one bf16 matmul, for scale", best["matmul"]))]
    torch.set_num_threads(threads)
    print_table(f"[lora] forward + backward, {size}x{size} weight, {tokens} tokens, r=64, best "
                f"of {rounds} interleaved rounds (goal: QLoRA within 2x of LoRA)",
                ["threads", "layer", "ms", "x LoRA"], rows)
