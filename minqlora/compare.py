"""One comparison of the 4-bit formats, for lesson 11, the tour and the bench.

Each format quantizes and decodes the same weights at blocksize B; we report

    relative error = sum((w - w_hat)^2) / sum(w^2)         (the MSE in units of the weights' power)
    bits/param     = 8 * (bytes stored: 4-bit values + every constant) / n

INT4, FP4, NF4, AF4 and Lloyd-Max store a float32 absmax per block (4 + 32/B bits); NF4 + DQ
a byte per block and a float32 per 256 blocks and per tensor (4.127 at B = 64); MXFP4 a byte per
block (4.25 at its B = 32); NVFP4 a byte per block and a float32 per tensor (4.5 + 32/n at its
B = 16). AF4 and Lloyd-Max are built for the blocksize they run at. The distance to the limit
is exact, from codebooks.expected_mse on N(0, 1) weights: how far NF4's error is above
Lloyd-Max's at each blocksize. Worked example: 64 weights at B = 64 are stored in 32 bytes of
4-bit values plus 4 (NF4's absmax), 9 (NF4 + DQ), 1 (MXFP4) or 5 (NVFP4) bytes of constants.
"""
import torch

from .codebooks import af4_code, expected_mse, lloyd_max_code
from .backends import dequantize_4bit
from .quant_state import quantize_4bit
from .microscaling import dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4, quantize_nvfp4
from .nf4 import NF4

FORMATS = ("INT4", "FP4", "NF4", "NF4+DQ", "AF4", "Lloyd-Max", "MXFP4", "NVFP4")
BLOCKSIZES = (16, 32, 64, 128, 256)


def round_trip(w: torch.Tensor, fmt: str, blocksize: int) -> tuple[torch.Tensor, int]:
    """(w_hat in float32, bytes stored) for one format at one blocksize.

    >>> w = torch.ones(64)
    >>> [round_trip(w, f, 64)[1] for f in ("NF4", "NF4+DQ", "MXFP4", "NVFP4")]
    [36, 41, 33, 37]
    """
    if fmt in ("MXFP4", "NVFP4"):
        quantize, dequantize = ((quantize_mxfp4, dequantize_mxfp4) if fmt == "MXFP4" else
                                (quantize_nvfp4, dequantize_nvfp4))
        packed, state = quantize(w.reshape(-1, blocksize), blocksize=blocksize)
        w_hat = dequantize(packed, state, torch.float32).reshape(w.shape)
        return w_hat, packed.numel() + state.nbytes()
    code = {"AF4": af4_code, "Lloyd-Max": lloyd_max_code}.get(fmt)
    packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=fmt.split("+")[0].lower(),
                                  double_quant=fmt == "NF4+DQ",
                                  code=code(blocksize) if code else None)
    return dequantize_4bit(packed, state, torch.float32), packed.numel() + state.nbytes()


def compare(weights, blocksizes=BLOCKSIZES, formats=FORMATS) -> dict:
    """{(format, blocksize): (relative error, bits per parameter)} over a tensor or a list of them
    (each quantized on its own, the errors and bytes summed)."""
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    power = sum(w.double().pow(2).sum().item() for w in weights)
    n = sum(w.numel() for w in weights)
    results = {}
    for blocksize in blocksizes:
        for fmt in formats:
            err, stored = 0.0, 0
            for w in weights:
                w_hat, nbytes = round_trip(w, fmt, blocksize)
                err += (w_hat.double() - w.double()).pow(2).sum().item()
                stored += nbytes
            results[fmt, blocksize] = (err / power, 8 * stored / n)
    return results


def print_comparison(results: dict, title: str) -> None:
    """A table: one row per format, one column per blocksize, 'error x 1000 (bits)'."""
    blocksizes = sorted({b for _, b in results})
    formats = [f for f in FORMATS if (f, blocksizes[0]) in results]
    print(f"{title}\nrelative error x 1000 (bits per parameter)")
    print(f"{'format':<10}" + "".join(f"{'B = ' + str(b):>15}" for b in blocksizes))
    for fmt in formats:
        print(f"{fmt:<10}" + "".join(f"{results[fmt, b][0] * 1e3:>8.2f} ({results[fmt, b][1]:.2f})"
                                     for b in blocksizes))


def limit_table(blocksizes=BLOCKSIZES) -> list[tuple]:
    """Rows (B, NF4, Lloyd-Max with NF4's layout, Lloyd-Max, AF4): expected MSE on N(0, 1)."""
    return [(b, expected_mse(NF4, b), expected_mse(lloyd_max_code(b, nf4_layout=True), b),
             expected_mse(lloyd_max_code(b), b), expected_mse(af4_code(b), b)) for b in blocksizes]


def print_limit(blocksizes=BLOCKSIZES) -> None:
    print("Distance to the limit: expected MSE x 1000 on N(0, 1) weights (exact, no sampling)")
    print(f"{'B':>5}{'NF4':>8}{'LM, NF4 layout':>16}{'Lloyd-Max':>11}{'AF4':>8}"
          f"{'NF4 above the limit':>21}")
    for b, nf4, lm_layout, lm, af4 in limit_table(blocksizes):
        print(f"{b:>5}{nf4 * 1e3:>8.3f}{lm_layout * 1e3:>16.3f}{lm * 1e3:>11.3f}{af4 * 1e3:>8.3f}"
              f"{nf4 / lm - 1:>20.1%}")
