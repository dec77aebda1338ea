"""tests for minqlora/codebooks.py: the block distribution, Lloyd-Max, AF4."""
import numpy as np
import pytest
import torch

import minqlora as mq
from minqlora import codebooks as cb
from minqlora.emulate import EmulationUnavailable

# AF4 for blocksize 64 as published by Yoshida (2023) and shipped by bitsandbytes
# (functional.get_4bit_type("af4", blocksize=64), there in descending order).
AF4_64 = [-1.0, -0.69441008, -0.51243739, -0.3736951, -0.25607552, -0.14982478, -0.04934812, 0.0,
          0.04273164, 0.12934483, 0.21961274, 0.31675666, 0.42563882, 0.55496234, 0.72424863, 1.0]


def blocks(blocksize, n=2 ** 21, seed=0):
    """Seeded N(0, 1) values as (blocks, blocksize) float64, with each block's absmax."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w.view(-1, blocksize)
    return w, w.abs().amax(dim=1, keepdim=True)


def measured_mse(code, blocksize, n=2 ** 21, seed=0):
    """Mean squared error of minqlora's own blockwise quantizer on N(0, 1) weights."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    code = torch.unique(code)                                   # sorted; FP4 has +0 and -0
    q, absmax = mq.quantize_blockwise(w, code, blocksize)
    return (w - mq.dequantize_blockwise(q, absmax, code, blocksize=blocksize)).double().pow(2).mean().item()


@pytest.mark.parametrize("blocksize", [2, 16, 64, 256])
def test_block_cdf_matches_sampled_blocks(blocksize):
    """The closed form against the empirical cdf of 2M sampled values divided by their absmax."""
    w, absmax = blocks(blocksize)
    s = (w / absmax).reshape(-1).sort().values.numpy()
    t = np.linspace(-1, 0.999, 41)
    empirical = np.searchsorted(s, t, side="right") / s.size
    assert np.abs(cb.block_cdf(t, blocksize) - empirical).max() < 2e-3
    assert cb.block_cdf(-1.0, blocksize) == pytest.approx(1 / (2 * blocksize))   # the -1 tip
    assert cb.block_cdf(1.0, blocksize) == 1.0
    assert cb.block_cdf(0.0, blocksize) == pytest.approx(0.5, abs=1e-12)
    inner = t[1:]                                                            # |t| < 1: no tips
    assert np.allclose(cb.block_cdf(inner, blocksize) + cb.block_cdf(-inner, blocksize), 1, atol=1e-12)


@pytest.mark.parametrize("blocksize", [16, 64, 1024])
def test_block_pdf_is_the_cdfs_derivative(blocksize):
    t = np.linspace(-0.995, 0.995, 40001)
    f = cb.block_pdf(t, blocksize)
    assert np.trapezoid(f, t) == pytest.approx((1 - 0.01) * (blocksize - 1) / blocksize, rel=0.02)
    inner = cb.block_cdf(0.5, blocksize) - cb.block_cdf(-0.5, blocksize)
    u = np.linspace(-0.5, 0.5, 20001)
    assert np.trapezoid(cb.block_pdf(u, blocksize), u) == pytest.approx(inner, rel=1e-9)


def test_absmax_nodes_integrate_the_absmax_density():
    for blocksize in (2, 64, 4096):
        m, w = cb._absmax_nodes(blocksize)
        assert w.sum() == pytest.approx(1, abs=1e-12)
    m, w = cb._absmax_nodes(64)
    _, absmax = blocks(64)
    assert (w * m).sum() == pytest.approx(absmax.mean().item(), rel=2e-3)   # about 2.6 sigma


@pytest.mark.parametrize("blocksize", [16, 64, 256])
def test_expected_mse_matches_the_quantizer(blocksize):
    """The exact expectation against minqlora's blockwise quantizer on 2M seeded weights."""
    for code in (mq.NF4, mq.INT4, mq.FP4, cb.af4_code(blocksize), cb.lloyd_max_code(blocksize)):
        assert cb.expected_mse(code, blocksize) == pytest.approx(measured_mse(code, blocksize), rel=0.01)


def test_lloyd_max_code_shape():
    c = mq.lloyd_max_code()
    assert c.dtype == torch.float32 and c.shape == (16,)
    assert bool((c[1:] > c[:-1]).all()) and -1 <= c[0] and c[-1] <= 1
    assert torch.allclose(c, -c.flip(0), atol=1e-7)                 # symmetric: 8 + 8, no zero
    assert (c > 0).sum() == 8 and c[-1] < 1                          # the absmax is not a code
    z = mq.lloyd_max_code(64, nf4_layout=True)
    assert z[[0, 7, 15]].tolist() == [-1.0, 0.0, 1.0] and (z > 0).sum() == 8


@pytest.mark.parametrize("blocksize", [16, 64, 256])
def test_lloyd_max_is_a_stationary_minimum(blocksize):
    """Each code is the absmax^2-weighted mean of its cell, and nudging any code costs error."""
    for layout in (False, True):
        c = cb.lloyd_max_code(blocksize, nf4_layout=layout).double().numpy()
        mass, first, _ = cb._cells(c, blocksize, 2)
        free = [i for i in range(16) if not layout or i not in (0, 7, 15)]
        assert np.abs(first / mass - c)[free].max() < 1e-6
        best = cb.expected_mse(c, blocksize)
        for i in free:
            for step in (-1e-3, 1e-3):
                nudged = c.copy()
                nudged[i] += step
                assert cb.expected_mse(nudged, blocksize) > best


def test_plain_lloyd_iteration_from_random_starts_finds_the_same_code():
    """Lloyd's iteration itself, from two random (asymmetric) starts, lands on the library's code."""
    rng = np.random.default_rng(0)
    for _ in range(2):
        c = np.sort(rng.uniform(-1, 1, 16))
        for _ in range(3000):
            mass, first, _ = cb._cells(c, 64, 2)
            c = first / mass
        assert np.abs(c - cb.lloyd_max_code(64).double().numpy()).max() < 1e-6


@pytest.mark.parametrize("blocksize", [16, 32, 64, 128, 256])
def test_lloyd_max_is_the_limit(blocksize):
    """Free Lloyd-Max < Lloyd-Max with NF4's layout < NF4, and below AF4, INT4, FP4."""
    lm = cb.expected_mse(cb.lloyd_max_code(blocksize), blocksize)
    lm_layout = cb.expected_mse(cb.lloyd_max_code(blocksize, nf4_layout=True), blocksize)
    nf4 = cb.expected_mse(mq.NF4, blocksize)
    assert lm < lm_layout < nf4
    others = [cb.af4_code(blocksize), mq.INT4, mq.FP4]
    assert all(lm < cb.expected_mse(code, blocksize) for code in others)
    assert 0.04 < nf4 / lm - 1 < 0.25                        # NF4 is 5-25% above the limit


def test_af4_golden_vector():
    """Yoshida's published AF4-64, to float32 precision (at most 1 ulp)."""
    got = mq.af4_code(64)
    assert got.dtype == torch.float32 and got.shape == (16,)
    assert torch.allclose(got, torch.tensor(AF4_64), rtol=0, atol=6e-8)
    assert got[[0, 7, 15]].tolist() == [-1.0, 0.0, 1.0] and (got > 0).sum() == 8


def test_af4_matches_bitsandbytes(bnb_functional):
    ref = bnb_functional.get_4bit_type("af4", device="cpu", blocksize=64).flip(0)
    ulps = (mq.af4_code(64).view(torch.int32) - ref.view(torch.int32)).abs()
    assert ulps.max() <= 1


@pytest.mark.parametrize("blocksize", [32, 64, 1024])
def test_af4_codes_are_medians_of_their_half_cells(blocksize):
    """Each free code splits the mass of its cell in half; the cells next to 0 end at 0."""
    c = cb.af4_code(blocksize).double().numpy()
    edges = (c[:-1] + c[1:]) / 2
    edges[6:8] = 0.0
    lo, hi = np.concatenate([[-1], edges]), np.concatenate([edges, [1]])
    F = lambda t: cb.block_cdf(t, blocksize)  # noqa: E731
    free = [i for i in range(16) if i not in (0, 7, 15)]
    assert np.abs(F(c) - (F(lo) + F(hi)) / 2)[free].max() < 1e-7


def test_af4_beats_nf4_on_its_own_objective_only_at_large_blocksizes():
    """E|s - code(s)| by sampling: AF4 loses to NF4 at 64 (its zero code gets no cell while it is
    solved) and wins at 1024, Yoshida's reported regime."""
    def l1(code, blocksize):
        w, absmax = blocks(blocksize, n=2 ** 22)
        s, c = w / absmax, code.double()
        return (s - c[torch.bucketize(s, (c[:-1] + c[1:]) / 2)]).abs().mean().item()
    assert l1(mq.af4_code(64), 64) > l1(mq.NF4, 64)
    assert l1(mq.af4_code(1024), 1024) < l1(mq.NF4, 1024)


@pytest.mark.parametrize("make", [lambda: mq.lloyd_max_code(64), lambda: mq.af4_code(64),
                                  lambda: mq.lloyd_max_code(64, nf4_layout=True)])
def test_codes_plug_into_every_quantizer_and_backend(make):
    code = make()
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    q, absmax = mq.quantize_blockwise(w, code, 64)
    by_blockwise = mq.dequantize_blockwise(q, absmax, code, blocksize=64)
    packed, state = mq.quantize_4bit(w, blocksize=64, double_quant=False, code=code)
    assert state.quant_type == "custom" and torch.equal(state.code, code)
    assert torch.equal(mq.unpack_4bit(packed, w.numel()).reshape(w.shape), q)
    assert torch.equal(mq.dequantize_4bit(packed, state), by_blockwise)
    packed2, state2 = mq.quantize_4bit(w.bfloat16(), code=code)                  # + double quant
    torch_path = mq.dequantize_4bit(packed2, state2, backend="torch")
    try:
        emulated = mq.dequantize_4bit(packed2, state2, backend="emulate")
    except EmulationUnavailable as e:
        pytest.skip(f"no CPU build of the kernel here: {e}")
    assert torch.equal(emulated, torch_path) and emulated.dtype == torch.bfloat16


def test_results_are_cached_copies():
    a = mq.lloyd_max_code(128)
    a.zero_()
    assert mq.lloyd_max_code(128).abs().sum() > 0
    assert mq.af4_code(128) is not mq.af4_code(128)


def test_bad_blocksize():
    for fn in (mq.lloyd_max_code, mq.af4_code):
        with pytest.raises(ValueError, match="power of two"):
            fn(48)
    with pytest.raises(ValueError, match="power of two"):
        mq.block_cdf(0.5, blocksize=1)
