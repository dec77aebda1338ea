"""Double quantization: the absmax constants quantized too (lesson 04).

Blockwise NF4 at blocksize 64 stores one float32 absmax per 64 weights: 32/64 = 0.5 extra bits
per parameter. QLoRA quantizes those constants too, in blocks of BLOCKSIZE2 = 256:

    offset    = mean(absmax)                                  one float32 for the tensor
    qabsmax, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC, blocksize=256)
    absmax   ~= DYNAMIC[qabsmax] * absmax2[b // 256] + offset

Cost per parameter: 8/64 + 32/(64*256) = 0.127 bits instead of 0.5, so 4.127 bits in all
(vs 4.5). Subtracting the mean first centres the absmaxes (all positive) around zero so the
signed 8-bit code spends its values on both sides.

DYNAMIC = dynamic_code() is bitsandbytes' signed dynamic 8-bit map: a sign, then values
10^e * m for 7 decades e = -6..0, decade e holding 2^(e+6) mantissas m (midpoints of an even
split of [0.1, 1]), plus 0 and 1: 127 + 127 + 2 = 256 values, fine near 0, coarse near 1.

Worked example: a 64x64 weight has 4096/64 = 64 absmaxes; they fit in one block of 256, so
they are stored as 64 bytes of qabsmax, one absmax2 and one offset: 72 bytes instead of 256.

Note: bitsandbytes' CPU quantize_blockwise finds the nearest 8-bit code through a lookup
table that can miss by one step on rare values; minqlora picks the exact nearest code, so a
rare qabsmax byte can differ from bitsandbytes' CPU output (never from the definition). How
the bytes and constants travel together is quant_state.py's business.
"""
import torch

from ._checks import check_blocksize, check_float
from .blockwise import blocks_of, ceil_div, dequantize_blockwise, quantize_blockwise

BLOCKSIZE2 = 256  # absmaxes per absmax2: the second level's blocksize


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: 256 sorted float32 values in [-0.993, 1].

    >>> c = dynamic_code()
    >>> len(c), c[127].item(), c[-1].item(), round(c[128].item(), 9)
    (256, 0.0, 1.0, 5.5e-07)
    """
    values = [0.0, 1.0]
    for e in range(7):                                  # decades 10^-6 ... 10^0
        edges = torch.linspace(0.1, 1, 2 ** e + 1)      # float32, as in bitsandbytes
        mantissas = (edges[:-1] + edges[1:]) / 2.0      # 2^e midpoints
        values += (10 ** (e - 6) * mantissas).tolist() + (-(10 ** (e - 6)) * mantissas).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC = dynamic_code()


def double_quantize(absmax: torch.Tensor, blocksize: int = BLOCKSIZE2):
    """absmax (float32) -> (qabsmax uint8, absmax2 float32 per 256 absmaxes, offset float32).

    >>> qabsmax, absmax2, offset = double_quantize(torch.tensor([1.0, 2.0, 3.0]))
    >>> qabsmax.tolist(), absmax2.tolist(), offset.item()   # [-1, 0, 1] -> codes 0.99.., 0, 1
    ([0, 127, 255], [1.0], 2.0)
    """
    check_float(absmax, "double_quantize")
    absmax = absmax.detach().float()
    offset = absmax.mean() if absmax.numel() else torch.zeros(())
    if not torch.isfinite(offset):    # absmaxes near float32's max: their float32 sum overflows
        offset = absmax.double().mean().float()
    qabsmax, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC, blocksize)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax, absmax2, offset, blocksize: int = BLOCKSIZE2,
                      code: torch.Tensor = DYNAMIC) -> torch.Tensor:
    """Inverse of double_quantize: code[qabsmax] * absmax2[b] + offset, float32.

    >>> double_dequantize(torch.tensor([0, 127, 255], dtype=torch.uint8), torch.tensor([1.0]),
    ...                   torch.tensor(2.0)).tolist()      # DYNAMIC[0] = -0.99297
    [1.0070312023162842, 2.0, 3.0]
    """
    check_blocksize(blocksize, "dequantize_blockwise")
    n = qabsmax.numel()
    if (qabsmax.dtype != torch.uint8 or code.numel() < 256            # an index could miss
            or absmax2.numel() != ceil_div(n, blocksize)):              # or a count is wrong:
        return dequantize_blockwise(qabsmax, absmax2, code, blocksize) + offset  # it says why
    # Every byte indexes the 256-value code, so nothing needs checking on the device: no
    # device-to-host sync, which a layer's forward pass (and torch.compile) needs.
    values = code.to(qabsmax.device, torch.float32)[qabsmax.reshape(-1).long()]   # (n,)
    scaled = blocks_of(values, blocksize) * absmax2.float().reshape(-1, 1)  # dequantize_blockwise's
    return scaled.reshape(-1)[:n].reshape(qabsmax.shape) + offset          # float32 product


def constants_nbytes(n: int, blocksize: int = 64, double_quant: bool = True,
                     blocksize2: int = BLOCKSIZE2) -> int:
    """Bytes of the constants for n weights: float32 absmax per block, or, double quantized,
    uint8 per block + float32 absmax2 per blocksize2 blocks + one float32 offset.

    >>> constants_nbytes(4096 * 4096, double_quant=False), constants_nbytes(4096 * 4096)
    (1048576, 266244)
    """
    check_blocksize(blocksize, "constants_nbytes")
    check_blocksize(blocksize2, "constants_nbytes", "blocksize2")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"constants_nbytes: n must be an int >= 0, got {n!r}")
    blocks = ceil_div(n, blocksize)
    return blocks + 4 * ceil_div(blocks, blocksize2) + 4 if double_quant else 4 * blocks
