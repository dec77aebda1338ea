"""Blockwise quantization onto any codebook (lesson 02).

Cut the flattened tensor into blocks of `blocksize` values, give each block its own absmax,
and store every value as the index of the nearest entry of a sorted codebook `code` in [-1, 1]:

    absmax[b] = max |x| over block b                       (float32, one per block)
    s         = clamp(x * (1 / absmax[b]), -1, 1)          (multiply by the reciprocal)
    q         = index of the code entry nearest to s       (uint8)
    x_hat     = code[q] * absmax[b]                        (float32, cast once to the dtype)

"Nearest" is decided by the midpoints between neighbouring codes: q is the number of
midpoints strictly below s, so a value exactly on a midpoint goes to the lower index. This is
bitsandbytes' rule, and why its bytes and ours agree.

Worked example, code = [-1, 0, 1] (midpoints -0.5, 0.5), blocksize 2, x = [0.2, -0.8, 3, 1.5]:
absmax = [0.8, 3], s = [0.25, -1, 1, 0.5], q = [1, 0, 2, 1], x_hat = [0, -0.8, 3, 0].

The last block may be partial; it gets its own absmax. An all-zero block stores absmax 0 and
decodes to zeros (never NaN): as bitsandbytes does, the reciprocal is taken of the absmax
clamped to TINY, so its zeros scale to 0 * 1/TINY = 0. Which codebook to use is the business
of nf4.py; packing two 4-bit indices per byte too.

quantize_blockwise and dequantize_blockwise are the definitions, line for line lesson 02's code.
scale_blocks and nearest_code are speed helpers for quantize_4bit (quant_state.py): the same
recipe, the same bits (tests/test_blockwise.py), about 5x faster on a CPU; lesson 02 skips them.
"""
import functools

import torch

from ._checks import check_blocksize, check_code, check_dtype, check_float

TINY = 1e-38  # the reciprocal is taken of max(absmax, TINY): finite for an all-zero block


def ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for integers: how many blocks of d hold n values.

    >>> ceil_div(10, 4), ceil_div(8, 4), ceil_div(0, 4)
    (3, 2, 0)
    """
    return -(-n // d)


def blocks_of(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """View a flat tensor as (n_blocks, blocksize), zero-padding a partial last block.

    Zero padding never changes a block's absmax. [1, 2, 3] with blocksize 2 -> [[1, 2], [3, 0]].
    """
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` blockwise onto `code`. Returns (indices uint8 in x's shape, absmax float32).
    The definition: the code lesson 02 builds (quantize_4bit takes the speed helpers below).

    >>> x, code = torch.tensor([0.2, -0.8, 3.0, 1.5]), torch.tensor([-1.0, 0.0, 1.0])
    >>> q, a = quantize_blockwise(x, code, 2)
    >>> q.tolist(), a.tolist()
    ([1, 0, 2, 1], [0.800000011920929, 3.0])
    """
    check_float(x, "quantize_blockwise")
    check_code(code, "quantize_blockwise")
    check_blocksize(blocksize, "quantize_blockwise")
    flat = x.detach().reshape(-1).float()                 # (n,) float32, no autograd history
    blocksize = min(blocksize, flat.numel() or blocksize)  # a lone short block stays short
    blocks = blocks_of(flat, blocksize)                                  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)                                    # (n_blocks,) float32
    inv = 1.0 / absmax.clamp(min=TINY)                                   # all-zero block: 0 * 1e38
    scaled = (blocks * inv[:, None]).clamp(-1, 1)                        # (n_blocks, blocksize)
    code = code.to(scaled)                                               # float32, on x's device
    midpoints = (code[:-1] + code[1:]) / 2                               # (len(code) - 1,)
    q = torch.bucketize(scaled, midpoints)               # how many midpoints lie strictly below s
    return q.reshape(-1)[: x.numel()].to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = code[indices] * absmax[block], computed in float32 and cast once to `dtype`, in
    the indices' shape (one code index per value; one absmax per block of `blocksize` values,
    counted in flat order).

    >>> dequantize_blockwise(torch.tensor([1, 0, 2, 1], dtype=torch.uint8),
    ...                      torch.tensor([0.8, 3.0]), torch.tensor([-1., 0., 1.]), 2).tolist()
    [0.0, -0.800000011920929, 3.0, 0.0]
    """
    check_stored(indices, absmax, code, blocksize, dtype, "dequantize_blockwise")
    values = code.to(indices.device, torch.float32)[indices.reshape(-1).long()]   # (n,) float32
    n = values.numel()
    blocksize = min(blocksize, n or blocksize)             # a lone short block stays short
    x_hat = blocks_of(values, blocksize) * absmax.float().reshape(-1, 1)  # (n_blocks, blocksize)
    return x_hat.reshape(-1)[:n].to(dtype or torch.float32).reshape(indices.shape)


# Speed helpers for quantize_4bit (quant_state.py): quantize_blockwise's recipe, the same bits,
# no float32 copy of 16-bit input and no binary search for 4-bit codes. Lesson 02 skips them.


def scale_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (s, absmax): s = clamp(x * (1/absmax), -1, 1) as (n_blocks, blocksize) float32
    (a single block narrower than blocksize is not padded past an even count of values).

    >>> s, a = scale_blocks(torch.tensor([0.2, -0.8, 3.0, 1.5]), 2)
    >>> a.tolist(), s.tolist()
    ([0.800000011920929, 3.0], [[0.25, -1.0], [1.0, 0.5]])
    """
    flat, n = x.detach().reshape(-1), x.numel()                         # no autograd history
    if flat.dtype not in (torch.bfloat16, torch.float16):    # 16-bit floats stay as they are:
        flat = flat.float()                                  # |x| and max are exact in them, and
    width = min(blocksize, n + n % 2) if n else blocksize    # x * r below computes in float32;
    blocks = blocks_of(flat, width)                          # one short block: no huge padding
    absmax = blocks.abs().amax(dim=1).float()                            # (n_blocks,) float32
    scaled = blocks * (1.0 / absmax.clamp(min=TINY)).unsqueeze(1)       # float32
    return scaled.clamp_(-1.0, 1.0), absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest entry of the sorted `code`: the number of midpoints
    strictly below each value, so exactly on a midpoint -> the lower index. torch.bucketize
    counts them by binary search; for a code of a few entries (4-bit) a lookup on a grid of
    cells (_grid) gives the same count in a few branch-free passes.

    >>> nearest_code(torch.tensor([0.25, -1.0, 1.0, 0.5]), torch.tensor([-1.0, 0.0, 1.0])).tolist()
    [1, 0, 2, 1]
    """
    code = code.to(scaled.device, torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    grid = _grid(tuple(midpoints.tolist()), scaled.device)
    if grid is None:                           # midpoints too close together for the grid
        return torch.bucketize(scaled, midpoints).to(torch.uint8)  # <= 256 entries: fits
    bins, below, edge = grid
    flat = scaled.reshape(-1)
    cell = _cell(flat, bins).int()                                      # which cell s falls in
    above = flat > edge.index_select(0, cell)                # s above its own cell's midpoint
    return below.index_select(0, cell).add_(above).view(scaled.shape)   # uint8


def _cell(s: torch.Tensor, bins: int) -> torch.Tensor:
    """bins + s * bins, kept in [0, 2 * bins] (NaN goes to the top, where bucketize puts it):
    non-decreasing in s, so a midpoint in a lower cell than s is below s, in a higher one above."""
    b = torch.tensor(float(bins), device=s.device)
    return torch.addcmul(b, s, b).nan_to_num_(nan=2.0 * bins).clamp_(0, 2 * bins)


@functools.lru_cache(maxsize=64)
def _grid(midpoints: tuple, device: torch.device):
    """nearest_code's lookup tables for these midpoints: split [-1, 1] into cells of width
    1/bins, with bins the smallest power of two (up to 4096) that leaves at most one midpoint in
    each cell. Then q = below[cell] + (s > edge[cell]): below = the midpoints in lower cells,
    edge = the cell's own midpoint (+inf if none). Exact, branch-free, and ~5x faster on a CPU
    than bucketize's binary search. None if no grid separates the midpoints (DYNAMIC's)."""
    m = torch.tensor(midpoints, dtype=torch.float32, device=device)
    for bins in (2 ** k for k in range(4, 13)):
        cells = _cell(m, bins).long()                                    # each midpoint's cell
        if len(cells) == len(set(cells.tolist())) and (cells < 2 * bins).all():
            edge = torch.full((2 * bins + 1,), float("inf"), device=device).index_put_((cells,), m)
            below = torch.searchsorted(cells, torch.arange(2 * bins + 1, device=device))
            return bins, below.to(torch.uint8), edge
    return None


def check_stored(indices, absmax, code, blocksize, dtype, where: str) -> None:
    """dequantize_blockwise's arguments, or an error naming the one that is wrong: a power-of-two
    blocksize, a float dtype, a float 1-D code, integer indices into it, one absmax per block."""
    check_blocksize(blocksize, where)
    check_dtype(dtype, where)
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not code.is_floating_point():
        raise TypeError(f"{where}: code must be a 1-D floating-point tensor")
    check_indices(indices, code.numel(), where)
    n = indices.numel()
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != ceil_div(n, blocksize):
        got = absmax.numel() if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"{where}: expected {ceil_div(n, blocksize)} absmax values "
                         f"for {n} values at blocksize {blocksize}, got {got}")


def check_indices(indices, n_codes: int, where: str) -> None:
    """An integer tensor of indices into an n_codes-entry code, or a TypeError / ValueError
    (never index -1 read as the last code, never a float index truncated). The range check
    reads the values (a device sync on a GPU) unless the dtype cannot leave the code: uint8
    indices into a code of 256 or more entries, as double quantization stores them."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() \
            or indices.is_complex() or indices.dtype == torch.bool:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"{where}: indices must be an integer tensor, got {got}")
    if not indices.numel() or (indices.dtype == torch.uint8 and n_codes >= 256):
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= n_codes:
        raise ValueError(f"{where}: index {low if low < 0 else high} is outside the "
                         f"{n_codes}-entry code (valid: 0..{n_codes - 1})")
