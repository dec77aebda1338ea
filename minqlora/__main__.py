"""`python -m minqlora [tour|bench]`: the course's story in one command.

    python -m minqlora            the tour (quantization error and bits per parameter, ...)
    python -m minqlora bench      speed checks against torchao / bitsandbytes where installed
"""
import argparse

import torch

from .double_quant import QUANT_TYPES, dequantize_4bit, quantize_4bit


def quantization_table(seed: int = 0, size: int = 4096) -> list[tuple]:
    """Rows (type, double_quant, rmse, max_err, bits/param) for a seeded size x size N(0, 0.02) weight."""
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(seed)) * 0.02
    rows = []
    for quant_type in QUANT_TYPES:
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
        print(f"{quant_type:<6}{'yes' if dq else 'no':<14}{rmse:>12.3e}{max_err:>12.3e}{bits:>12.4f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minqlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="tour", choices=["tour", "bench"])
    parser.add_argument("--seed", type=int, default=0, help="seed for every random tensor")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
    parser.add_argument("--only", nargs="*", help="bench: only these sections")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main
        bench_main(args.only, quick=args.quick)
    else:
        print_quantization_table(args.seed, 1024 if args.quick else 4096)


if __name__ == "__main__":
    main()
