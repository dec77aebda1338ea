"""Bench `lora`: forward + backward of a QLoRA layer vs bitsandbytes' and vs a bf16 LoRA layer.

Three layers over the same 4096x4096 weight, each with the same r = 64, alpha = 16 float32
adapters on top (minqlora's LoRALinear, holding the same A and B): minqlora's Linear4bit (NF4 +
double quant, dequantize backend "auto"), bitsandbytes' Linear4bit (NF4 + double quant,
compute_dtype bf16: it dequantizes with its C++ code and multiplies with torch, as ours) and a
plain bf16 nn.Linear. The same bf16 input of 256 tokens (a micro-batch of e.g. 1 x 256) that
requires grad, as inside a model. The only extra work of QLoRA is dequantizing the weight twice
(forward and backward); that time is shown on its own line. The cases run interleaved, round
after round, and each keeps its best time, so a busy machine slows them all alike; on all
threads and on one. Goals: QLoRA <= 1.0x bitsandbytes' layer, within 2x of LoRA.

On a CPU without native bf16 (AVX2), torch's bf16 matmul dy @ W in the backward of a bf16
nn.Linear and of bitsandbytes' layer is a plain loop (well under 1 GFLOP/s), tens of seconds
per step at 4096x4096, 256 tokens; minqlora's backward multiplies in float32 (linear4bit.py).
So the full run takes 2 rounds without warmup, minutes. --quick: 1024x1024, 64 tokens.
"""
import torch
from torch import nn

from ..backends import auto_backend
from ..linear4bit import Linear4bit
from ..lora import LoRALinear
from . import interleaved_best, optional, print_table, thread_counts, threads


def _step(layer, x, grad):
    x.grad = None
    layer(x).backward(grad)


def _bnb_layer(bnb, linear: nn.Linear) -> nn.Module:
    """bitsandbytes' Linear4bit holding linear's weight in NF4 + double quant (quantized on
    .to(), as bitsandbytes does), computing in bf16."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                              compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", blocksize=64)
    return layer.to(linear.weight.device)


def run(quick: bool = False) -> dict:
    size, tokens, rounds = (1024, 64, 3) if quick else (4096, 256, 2)
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
    bnb = optional("bitsandbytes")
    if bnb is not None:
        theirs = LoRALinear(_bnb_layer(bnb, linear), r=64, alpha=16)
        theirs.load_state_dict(qlora.state_dict(), strict=False)     # the same A and B
        cases["bnb"] = lambda: _step(theirs, x, grad)
    rows, goals = [], {}
    for n in thread_counts():
        with threads(n):
            best = interleaved_best(cases, rounds, warmup=quick)
        rows += [[n, name, f"{t * 1e3:.1f}", f"{t / best['lora']:.2f}",
                  f"{t / best['bnb']:.2f}" if "bnb" in best else "-"] for name, t in (
            ("LoRA over a bf16 weight", best["lora"]),
            (f"QLoRA, minqlora (auto = {auto_backend(x.device)})", best["qlora"]),
            *((("QLoRA, bitsandbytes' Linear4bit", best["bnb"]),) if "bnb" in best else ()),
            ("  of which 2 x dequantize (minqlora)", 2 * best["dequantize"]),
            ("  one bf16 matmul, for scale", best["matmul"]))]
        goals.setdefault("QLoRA layer fwd+bwd vs LoRA over bf16 (goal 2x)", (2.0, {}))[1][n] = (
            best["qlora"] / best["lora"])
        if "bnb" in best:
            goals.setdefault("QLoRA layer fwd+bwd, r=64 (vs bitsandbytes' layer)", (1.0, {}))[1][
                n] = best["qlora"] / best["bnb"]
    print_table(f"[lora] forward + backward, {size}x{size} weight, {tokens} tokens, r=64, best "
                f"of {rounds} interleaved rounds (goals: QLoRA <= 1.0x bitsandbytes' layer, "
                "within 2x of LoRA)", ["threads", "layer", "ms", "x LoRA", "x bnb"], rows)
    return goals
