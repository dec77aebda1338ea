"""Bench: the distance to the limit (lesson 11). How far NF4's expected error is above the
Lloyd-Max code's at each blocksize (exact numbers, not timings); how long a Lloyd-Max / AF4 code
takes to compute; and MXFP4 / NVFP4 quantize + dequantize of a size x size bf16 weight beside
torchao's MXTensor / NVFP4Tensor (the same bits). Ratios: torchao time / minqlora time.
"""
import torch

from .. import codebooks
from ..compare import limit_table
from ..microscaling import dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4, quantize_nvfp4
from . import best_time, interleaved_best, optional, print_table


def torchao_references(weight):
    """{format: (quantize, dequantize)} of torchao's prototype MX formats, when installed."""
    mx = optional("torchao.prototype.mx_formats.mx_tensor")
    nv = optional("torchao.prototype.mx_formats.nvfp4_tensor")
    if mx is None or nv is None:
        return {}
    t = nv.per_tensor_amax_to_scale(weight.abs().amax())
    to_mx = lambda: mx.MXTensor.to_mx(weight, torch.float4_e2m1fn_x2, block_size=32)  # noqa: E731
    to_nv = lambda: nv.NVFP4Tensor.to_nvfp4(weight, per_tensor_scale=t)  # noqa: E731
    mx_q, nv_q = to_mx(), to_nv()
    return {"MXFP4": (to_mx, mx_q.dequantize), "NVFP4": (to_nv, nv_q.dequantize)}


def run(quick: bool = False) -> None:
    rows = [[b, f"{nf4 * 1e3:.3f}", f"{lm * 1e3:.3f}", f"{nf4 / lm - 1:.1%}",
             f"{lm_layout * 1e3:.3f}", f"{af4 * 1e3:.3f}"]
            for b, nf4, lm_layout, lm, af4 in limit_table()]
    print_table("[limit] distance to the limit: expected MSE x 1000 on N(0, 1) weights",
                ["blocksize", "NF4", "Lloyd-Max", "NF4 above", "LM, NF4 layout", "AF4"], rows)
    solve = [["Lloyd-Max", lambda: codebooks._lloyd_max.__wrapped__(64, False)],
             ["Lloyd-Max, NF4 layout", lambda: codebooks._lloyd_max.__wrapped__(64, True)],
             ["AF4", lambda: codebooks._af4.__wrapped__(64)]]
    print_table("[limit] computing a code for blocksize 64 (uncached)", ["code", "ms"],
                [[name, f"{best_time(fn, repeat=1 if quick else 3) * 1e3:.0f}"] for name, fn in solve])
    size = 1024 if quick else 4096
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).bfloat16()
    ours = {"MXFP4": (quantize_mxfp4, dequantize_mxfp4),
            "NVFP4": (quantize_nvfp4, dequantize_nvfp4)}
    cases, refs = {}, torchao_references(weight)
    for fmt, (quantize, dequantize) in ours.items():
        packed, state = quantize(weight)
        cases[fmt, "minqlora", 0] = lambda q=quantize: q(weight)
        cases[fmt, "minqlora", 1] = lambda d=dequantize, p=packed, s=state: d(p, s)
        if fmt in refs:
            cases[fmt, "torchao", 0], cases[fmt, "torchao", 1] = refs[fmt]
    best = interleaved_best(cases, rounds=3 if quick else 5)
    table = []
    for fmt in ours:
        q, d = best[fmt, "minqlora", 0], best[fmt, "minqlora", 1]
        ref, ratio = ["-"] * 2, ["-"] * 2
        if fmt in refs:
            ref = [f"{best[fmt, 'torchao', i] * 1e3:.1f}" for i in (0, 1)]
            ratio = [f"{best[fmt, 'torchao', i] / t:.2f}" for i, t in ((0, q), (1, d))]
        table.append([fmt, f"{q * 1e3:.1f}", ref[0], ratio[0], f"{d * 1e3:.1f}", ref[1], ratio[1]])
    print_table(f"[limit] MXFP4 / NVFP4, {size}x{size} bf16, threads={torch.get_num_threads()}"
                + ("" if refs else " (torchao not installed)"),
                ["format", "quantize ms", "torchao", "ratio", "dequantize ms", "torchao", "ratio"],
                table)
