"""Codebooks from objectives: the block distribution, Lloyd-Max and AbnormalFloat (lesson 11).

A 4-bit code never sees N(0, 1) values: it sees a Gaussian block divided by the block's own
absmax M = max |x_i|. For blocksize B, one value per block is exactly +-1 (mass 1/(2B) on each
sign) and the other B - 1 are s = z / M, z ~ N(0, 1) truncated to |z| < M, where

    M has density  B (2 Phi(m) - 1)^(B-1) 2 phi(m)
    P(s <= t)    = 1/(2B) + (B-1)/B * E_M[(Phi(M t) - Phi(-M)) / (2 Phi(M) - 1)]     (-1 <= t < 1)

Every expectation here is one integral over M (96 Gauss-Legendre nodes) of closed forms in Phi
and phi, and each code is the fixed point of its iteration, found by scipy's root finder: a
codebook takes milliseconds (cached per blocksize). Three objectives give three codes:
  NF4 (nf4.py)        equal mass per code under N(0, 1) quantiles: not this distribution.
  lloyd_max_code(B)   least squared error of the WEIGHT, E[M^2 (s - code(s))^2]. Lloyd's
                      iteration: edges = midpoints of the codes, code = (M^2-weighted) mean of
                      its cell. Symmetric, 8 + 8, no exact 0: the objective is symmetric and
                      nothing asks for a zero. nf4_layout=True fixes -1, 0, 1 as NF4 does.
  af4_code(B)         Yoshida's AbnormalFloat (2023): least E|s - code(s)|, each code the median
                      of its cell, -1, 0, 1 fixed. As in his reference code (and the AF4-64 table
                      bitsandbytes ships), each half [-1, 0], [0, 1] is solved on its own: the
                      cells next to 0 end at 0, and the code 0 gets no cell while solving.
Worked example: at B = 64 the expected MSE per weight (in sigma^2) is 0.00846 for NF4, 0.00799
for Lloyd-Max with NF4's layout and 0.00762 for free Lloyd-Max: NF4 is 11% above the limit.
NF4's offset 0.9677083 has its account in nf4.py (nf4_offset). This module uses numpy and scipy;
quantizing with these codes is blockwise.py's and double_quant.py's business.
"""
import functools

import numpy as np
import torch
from scipy.optimize import root
from scipy.special import ndtr, ndtri

from ._checks import check_blocksize
from .nf4 import NF4

_NODES = 96
_PINNED = (0, 7, 15)               # -1, 0, 1 in NF4's layout: 7 codes below 0, 8 above


def _phi(z):
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


@functools.lru_cache(maxsize=None)
def _absmax_nodes(blocksize: int):
    """Nodes m and weights w with sum(w * f(m)) = E[f(M)], M the absmax of B normals."""
    lo = ndtri((1 + 1e-16 ** (1 / blocksize)) / 2)        # P(M < lo) = 1e-16
    hi = -ndtri(1e-16 / (2 * blocksize))                  # P(M > hi) ~ 1e-16
    x, w = np.polynomial.legendre.leggauss(_NODES)
    m = lo + (hi - lo) * (x + 1) / 2
    density = blocksize * (2 * ndtr(m) - 1) ** (blocksize - 1) * 2 * _phi(m)
    return m, w * (hi - lo) / 2 * density


def _below(t, blocksize: int, power: int):
    """E[M^power s^k 1{s <= t}] for k = 0, 1, 2 over the B-1 non-max values, at each t
    (arrays shaped like t), and the mass E[M^power] / (2B) sitting on each of s = -1, +1."""
    m, w = _absmax_nodes(blocksize)
    tip = (w * m ** power).sum() / (2 * blocksize)
    w = w * m ** power * (blocksize - 1) / blocksize / (2 * ndtr(m) - 1)
    z = np.multiply.outer(np.asarray(t, dtype=np.float64), m)     # (..., nodes): z = t M
    lo0, lo2 = ndtr(-m), ndtr(-m) + m * _phi(m)                      # at z = -M
    p0 = (ndtr(z) - lo0) @ w
    p1 = ((_phi(m) - _phi(z)) / m) @ w                               # int z phi = -phi
    p2 = ((ndtr(z) - z * _phi(z) - lo2) / m ** 2) @ w                # int z^2 phi = Phi - z phi
    return p0, p1, p2, tip


def block_cdf(t, blocksize: int = 64) -> np.ndarray:
    """P(s <= t) for s a value of a Gaussian block divided by the block's absmax.

    >>> [round(float(p), 4) for p in block_cdf([-1.0, 0.0, 0.5], blocksize=64)]
    [0.0078, 0.5, 0.8977]
    """
    check_blocksize(blocksize, "block_cdf")
    p0, _, _, tip = _below(t, blocksize, 0)
    return np.where(np.asarray(t) >= 1, 1.0, tip + p0)


def block_pdf(t, blocksize: int = 64) -> np.ndarray:
    """Density of s inside (-1, 1); it integrates to (B-1)/B (the rest sits on +-1)."""
    check_blocksize(blocksize, "block_pdf")
    m, w = _absmax_nodes(blocksize)
    w = w * (blocksize - 1) / blocksize / (2 * ndtr(m) - 1)
    return (m * _phi(np.multiply.outer(np.asarray(t, dtype=np.float64), m))) @ w


def _cells(code, blocksize, power, edges=None):
    """Mass, first and second moment of s in each code's cell (edges: midpoints by default)."""
    edges = (code[:-1] + code[1:]) / 2 if edges is None else edges
    p0, p1, p2, tip = _below(np.concatenate([[-1.0], edges, [1.0]]), blocksize, power)
    mass, first, second = np.diff(p0), np.diff(p1), np.diff(p2)
    mass[[0, -1]] += tip
    first[[0, -1]] += (-tip, tip)
    second[[0, -1]] += tip
    return mass, first, second


def expected_mse(code, blocksize: int = 64) -> float:
    """E[(w - w_hat)^2] for w ~ N(0, 1) quantized blockwise onto a sorted `code` (nearest code).

    >>> round(expected_mse(NF4, 64), 5)
    0.00846
    """
    check_blocksize(blocksize, "expected_mse")
    code = np.sort(torch.as_tensor(code, dtype=torch.float64).numpy())   # FP4 is in bit order
    mass, first, second = _cells(code, blocksize, 2)
    return float((second - 2 * code * first + code ** 2 * mass).sum())


def _fixed_point(step, code, free, what: str) -> torch.Tensor:
    """The code with step(code) == code, its `free` entries found by scipy's root finder on
    that equation (~40 evaluations of step, where plain iteration needs ~600)."""
    def residual(c):
        full = code.copy()
        full[free] = c
        return step(full)[free] - c
    sol = root(residual, code[free], method="hybr", options=dict(xtol=1e-12))
    code = code.copy()
    code[free] = sol.x
    if not (np.all(np.diff(code) > 0) and np.abs(residual(sol.x)).max() < 1e-9):
        raise RuntimeError(f"{what}: the fixed-point search failed ({sol.message})")
    return torch.tensor(code, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _lloyd_max(blocksize: int, nf4_layout: bool) -> torch.Tensor:
    free = np.ones(16, bool)
    free[list(_PINNED)] = not nf4_layout
    init = NF4.double().numpy() if nf4_layout else np.linspace(-0.9, 0.9, 16)

    def step(code):                          # Lloyd: each free code moves to its cell's mean
        mass, first, _ = _cells(code, blocksize, 2)
        return np.where(free, first / mass, code)
    return _fixed_point(step, init, free, f"lloyd_max_code(blocksize={blocksize})")


def lloyd_max_code(blocksize: int = 64, nf4_layout: bool = False) -> torch.Tensor:
    """The 16-value code with the least expected squared weight error at this blocksize.

    >>> c = lloyd_max_code(64)
    >>> [round(v, 4) for v in c[[0, 7, 8, 15]].tolist()], bool(torch.allclose(c, -c.flip(0)))
    ([-0.9532, -0.0462, 0.0462, 0.9532], True)
    """
    check_blocksize(blocksize, "lloyd_max_code")
    return _lloyd_max(blocksize, bool(nf4_layout)).clone()


@functools.lru_cache(maxsize=None)
def _af4(blocksize: int) -> torch.Tensor:
    free = np.ones(16, bool)
    free[list(_PINNED)] = False

    def step(code):                          # one Newton step towards each cell's median
        edges = (code[:-1] + code[1:]) / 2
        edges[6:8] = 0.0                     # Yoshida: the halves meet at 0
        lo, hi = np.concatenate([[-1.0], edges]), np.concatenate([edges, [1.0]])
        target = (block_cdf(lo, blocksize) + block_cdf(hi, blocksize)) / 2
        new = code - (block_cdf(code, blocksize) - target) / block_pdf(code, blocksize)
        return np.where(free, new, code)
    return _fixed_point(step, NF4.double().numpy(), free, f"af4_code(blocksize={blocksize})")


def af4_code(blocksize: int = 64) -> torch.Tensor:
    """AbnormalFloat (AF4) for this blocksize: least expected |s - code(s)|, -1, 0, 1 fixed.

    >>> [round(v, 4) for v in af4_code(64)[[1, 6, 8, 14]].tolist()]
    [-0.6944, -0.0493, 0.0427, 0.7242]
    """
    check_blocksize(blocksize, "af4_code")
    return _af4(blocksize).clone()
