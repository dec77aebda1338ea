"""4-bit codebooks: NormalFloat (NF4), FP4 and INT4, and two 4-bit indices per byte (lesson 03).

Pretrained weights are roughly normal, so NF4 puts its 16 values where a normal distribution
puts equal probability mass: at quantiles of N(0, 1), rescaled to [-1, 1].

    positives: norm.ppf(p) for 8 p evenly spaced from `offset` down to 0.5 (0.5 itself dropped)
    negatives: -norm.ppf(p) for 7 p evenly spaced from `offset` down to 0.5 (0.5 dropped)
    NF4 = sort(negatives + [0] + positives) / max

Why asymmetric (8 positive, 7 negative)? 4 bits give 16 codes, and we want an exact 0 (zero
padding, ReLU'd and pruned weights must survive the round trip), which leaves 15 non-zero
codes. Why offset = 0.9677083, not 1? norm.ppf(1) is infinite, so the last quantile must stop
short of 1. bitsandbytes' code holds the constant; the paper's appendix lists the 16 values it
gives but never states it; neither explains it. To 7 digits it is the mean of the two natural
"half a bin in from the end" choices, 1 - 1/(2*15) = 0.96667 and 1 - 1/(2*16) = 0.96875
(for 15 and 16 bins): (0.96667 + 0.96875) / 2 = 0.9677083. That is the usual account of it,
and nf4_offset() computes it; NF4_OFFSET is bitsandbytes' 7-digit constant, which it checks.
Worked example: the 8 positive probabilities are 0.9677, 0.9092, 0.8508, ..., 0.5585. The
largest quantile, norm.ppf(0.9677) = 1.8481, becomes 1.0 after dividing by the max; the next,
norm.ppf(0.9092) = 1.3361, becomes 1.3361 / 1.8481 = 0.72296: bitsandbytes' 0.7229568.

FP4 is bitsandbytes' 4-bit float: a sign bit and three bits that index [0, 0.0625, 8, 12, 4, 6,
2, 3] / 12, so its table is in bit order, not sorted. INT4 is lesson 01's symmetric int4,
-7..7 divided by 7: 15 values, so one of the 16 codes goes unused.

Packing: element 0 goes in the HIGH nibble of byte 0, element 1 in the low nibble, as in
bitsandbytes: indices [1, 2, 15] -> bytes [0x12, 0xF0] (an odd count is padded with index 0).
"""
import torch

NF4_OFFSET = 0.9677083    # bitsandbytes' constant, the format's; nf4_offset() accounts for it


def nf4_offset() -> float:
    """NF4_OFFSET as an account, not a stated method: the last code sits half a bin in from
    probability 1, with 15 bins (non-zero codes) or 16 (all codes): the mean of 1 - 1/(2*15)
    and 1 - 1/(2*16) is 929/960 = 0.96770833..., bitsandbytes' 7 digits exactly.

    >>> round(nf4_offset(), 7) == NF4_OFFSET
    True
    """
    return ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, built from normal quantiles (float32, sorted, -1 and 1 included).

    >>> c = nf4_code()
    >>> [round(v, 4) for v in c[[0, 7, 14, 15]].tolist()]
    [-1.0, 0.0, 0.723, 1.0]
    """
    from scipy.stats import norm  # imported when a table is built, not at import minqlora

    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not 0.5 < offset < 1:
        raise ValueError(f"nf4_code: offset must be a probability strictly between 0.5 and 1 "
                         f"(norm.ppf(1) is infinite, and 0.5 puts every quantile at 0), got "
                         f"{offset!r}")
    p_pos = torch.linspace(offset, 0.5, 9)[:-1]       # 8 probabilities, float32 (as bitsandbytes)
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]       # 7 probabilities, float32
    positives = norm.ppf(p_pos.double().numpy()).tolist()          # 8 quantiles, in std devs
    negatives = (-norm.ppf(p_neg.double().numpy())).tolist()       # 7 quantiles, mirrored
    values = torch.tensor(sorted(negatives + [0.0] + positives), dtype=torch.float32)   # (16,)
    return values / values.max()                                    # largest -> exactly 1.0


NF4 = nf4_code()
FP4 = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
FP4 = torch.cat([FP4, -FP4])          # index 8..15: the same with the sign bit set
INT4 = torch.arange(-7, 8, dtype=torch.float32) / 7
CODES = {"nf4": NF4, "fp4": FP4, "int4": INT4}


def get_code(quant_type: str) -> torch.Tensor:
    """The codebook for "nf4", "fp4" or "int4" (a ValueError listing the choices otherwise).

    >>> [round(v, 4) for v in get_code("int4")[:3].tolist()]
    [-1.0, -0.8571, -0.7143]
    """
    if quant_type not in CODES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {sorted(CODES)}")
    return CODES[quant_type]


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, element 0 in the high nibble. Odd counts get index 0 appended.

    >>> pack_4bit(torch.tensor([1, 2, 15])).tolist()
    [18, 240]
    """
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"pack_4bit: indices must be an integer tensor, got {indices.dtype}")
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) <= 15:
        raise ValueError(f"pack_4bit: indices must be in 0..15, got range "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    pairs = flat.view(-1, 2)                                  # (n_bytes, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_4bit: the first `n` 4-bit indices as uint8.

    >>> unpack_4bit(torch.tensor([0x12, 0xF0], dtype=torch.uint8), 3).tolist()
    [1, 2, 15]
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_4bit: packed must be uint8, got {packed.dtype}")
    if not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"unpack_4bit: {packed.numel()} bytes hold at most "
                         f"{2 * packed.numel()} indices, asked for {n}")
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]
