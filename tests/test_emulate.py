"""emulate.py: kernels/dequant_nf4.cu compiled for the CPU and run thread by thread. Every
comparison is bit for bit (raw bits, so -0.0 != 0.0), never a tolerance."""
import shutil

import pytest
import torch
from helpers import BnbReference, bits
from hypothesis import given, settings
from hypothesis import strategies as st

from minqlora import build, emulate, launch
from minqlora.backends import dequantize_4bit
from minqlora.double_quant import DYNAMIC
from minqlora.nf4 import CODES, NF4
from minqlora.quant_state import QuantState, absmax_state, decode_4bit, quantize_4bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = list(CODES)                 # nf4, fp4, int4


def assert_same(packed, state, dtype):
    """The emulated kernel gives the definition's bits (decode_4bit)."""
    want = decode_4bit(packed, state, dtype)
    got = dequantize_4bit(packed, state, dtype, backend="emulate")
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def test_golden_plain(emulation):
    """Bytes [0x0F, 0x70], absmax [2.0], shape (3,), NF4:
    element 0 = high nibble 0 -> NF4[0] * 2 = -2; element 1 = low nibble 15 -> NF4[15] * 2 = 2;
    element 2 = high nibble 7 -> NF4[7] * 2 = 0 (the low nibble 0 is padding)."""
    state = QuantState(absmax=torch.tensor([2.0]), code=NF4, blocksize=64, shape=torch.Size([3]),
                       dtype=torch.float32)
    packed = torch.tensor([0x0F, 0x70], dtype=torch.uint8)
    assert dequantize_4bit(packed, state, backend="emulate").tolist() == [-2.0, 2.0, 0.0]


def test_golden_nested(emulation):
    """Two blocks of 2 weights, double quantized by hand: qabsmax [255, 127] -> dynamic code
    [1.0, 0.0]; absmax2 [0.5], offset 0.25 -> absmax [1.0 * 0.5 + 0.25, 0.0 * 0.5 + 0.25] =
    [0.75, 0.25]. Byte 0xF0 -> (NF4[15], NF4[0]) = (1, -1) in block 0: [0.75, -0.75];
    byte 0xF7 -> (1, 0) in block 1: [0.25, 0.0]."""
    state = QuantState(absmax=torch.tensor([255, 127], dtype=torch.uint8), code=NF4, blocksize=2,
                       shape=torch.Size([4]), dtype=torch.float32, offset=torch.tensor(0.25),
                       state2=absmax_state(torch.tensor([0.5]), 2))
    packed = torch.tensor([0xF0, 0xF7], dtype=torch.uint8)
    assert dequantize_4bit(packed, state, backend="emulate").tolist() == [0.75, -0.75, 0.25, 0.0]
    assert state.state2.code is not None and torch.equal(state.state2.code, DYNAMIC)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [2, 16, 32, 64, 4096])
def test_bit_identical_to_the_definition(emulation, dtype, nested, blocksize):
    """Sizes cover: one weight, an odd count, a partial last block, a partial last thread (the
    scalar tail), exactly one thread (32), and several blocks of 256 threads (> 8192). The
    quant type rotates with the size, so each case meets NF4, FP4 and INT4 twice. Blocksizes:
    below 32 (several absmax blocks per 32-weight chunk: 2, 16), exactly 32, above (64, 4096);
    up to 64 the 20001 weights have more than 256 absmaxes, so more than one absmax2."""
    g = torch.Generator().manual_seed(blocksize)
    for i, n in enumerate((1, 31, 32, 33, 1000, 20001)):
        x = torch.randn(n, generator=g) * 3
        packed, state = quantize_4bit(x, blocksize, NAMES[i % 3], double_quant=nested)
        assert_same(packed, state, dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), log2_bs=st.integers(1, 9),
       nested=st.booleans(), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_bit_identical_any_shape(emulation, rows, cols, log2_bs, nested, dtype, scale):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 71 + cols)) * scale
    packed, state = quantize_4bit(x, 2 ** log2_bs, double_quant=nested)
    assert_same(packed, state, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_ties_and_range(emulation, dtype):
    """NF4[15] = 1.0, so every output is an absmax itself: pick absmaxes whose float32 bits sit
    exactly halfway between two 16-bit values (ties go to the even one), float16 subnormals
    (< 2^-14), values rounding to 0, 65519 (-> 65504) and 65520 (-> inf in float16)."""
    ties = [0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000, 0x33000000, 0x33000001, 0x387FE000,
            0x38801000, 0x38803000, 0x2F800000, 0x477FEF00, 0x477FF000, 0x4B7FFF80]
    absmax = torch.tensor(ties, dtype=torch.int32).view(torch.float32)
    absmax = torch.cat([absmax, absmax * 3.0, absmax / 7.0])
    state = QuantState(absmax=absmax, code=NF4, blocksize=2, shape=torch.Size([2 * absmax.numel()]),
                       dtype=torch.float32)
    packed = torch.full((absmax.numel(),), 0xF0, dtype=torch.uint8)     # (1.0, -1.0) per block
    assert_same(packed, state, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_any_float(emulation, dtype):
    """The shim's float -> bf16 / fp16 roundings against torch's cast on 2^18 random float32 bit
    patterns (every exponent: subnormals, overflow, infinities). The kernel path is the same as
    above: absmax = the pattern, outputs +-absmax. NaN only has to stay NaN: torch itself gives
    different NaN bits on different code paths (and quantize_4bit never makes one)."""
    pattern = torch.randint(-2**31, 2**31, (1 << 18,), generator=torch.Generator().manual_seed(5))
    absmax = pattern.to(torch.int32).view(torch.float32)
    state = QuantState(absmax=absmax, code=NF4, blocksize=2, shape=torch.Size([2 * absmax.numel()]),
                       dtype=torch.float32)
    packed = torch.full((absmax.numel(),), 0xF0, dtype=torch.uint8)
    got = dequantize_4bit(packed, state, dtype, backend="emulate")
    want = decode_4bit(packed, state, dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and 0 < nan.sum() < nan.numel()
    assert torch.equal(bits(got[~nan]), bits(want[~nan]))


def test_empty_tensor(emulation):
    for nested in (False, True):
        packed, state = quantize_4bit(torch.empty(0, 5), double_quant=nested)
        assert_same(packed, state, torch.bfloat16)


def test_float64_and_default_dtype(emulation):
    x = torch.randn(7, 9, dtype=torch.float64)
    packed, state = quantize_4bit(x)
    assert_same(packed, state, None)                                  # state.dtype = float64
    assert dequantize_4bit(packed, state, backend="emulate").dtype == torch.float64


def test_misaligned_and_strided_packed(emulation):
    """The kernel loads 16 bytes at a time from a 16-byte boundary: a packed view that starts
    one byte in, or a strided one, is copied to an aligned buffer first, same bits."""
    packed, state = quantize_4bit(torch.randn(300, 7), 64)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
    assert shifted.data_ptr() % 16
    assert_same(shifted, state, torch.bfloat16)
    strided = torch.stack([packed, packed], 1)[:, 0]
    assert not strided.is_contiguous()
    assert_same(strided, state, torch.float32)


def test_workers_agree(emulation):
    """1, 2 and more CPU workers than blocks split the grid differently, same bits."""
    packed, state = quantize_4bit(torch.randn(70000), 64)
    outs = []
    for workers in (1, 2, 64):
        out = torch.empty(70000, dtype=torch.bfloat16)
        emulate.launch_emulation(packed, state, out, n_workers=workers)
        outs.append(bits(out))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0], bits(decode_4bit(packed, state, torch.bfloat16)))


def test_edited_source_is_rebuilt(emulation):
    """The build is keyed by the source text: 32 bytes per thread is a new library, a grid of
    half as many blocks, and still the same bits."""
    source = launch.kernel_source().replace("#define BYTES_PER_THREAD 16",
                                            "#define BYTES_PER_THREAD 32")
    assert emulate.build_emulation(source) is not emulation
    packed, state = quantize_4bit(torch.randn(50001), 64)
    out = torch.empty(50001)
    emulate.launch_emulation(packed, state, out, source=source)
    assert torch.equal(out, decode_4bit(packed, state))


def test_broken_source_is_a_clear_error(emulation):
    source = launch.kernel_source().replace("__syncthreads();", "__syncthreads()", 1)
    with pytest.raises(RuntimeError, match="building kernels/emulate.cpp with .* failed"):
        emulate.build_emulation(source)


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(build, "_BUILT", {})
    packed, state = quantize_4bit(torch.randn(10))
    with pytest.raises(emulate.EmulationUnavailable, match="no C.. compiler found"):
        dequantize_4bit(packed, state, backend="emulate")


def test_matches_bitsandbytes(emulation, bnb_functional):
    """bitsandbytes' own quantized bytes and state, decoded by our kernel = its dequantize (the
    definition where bitsandbytes' decoder is wrong on this CPU: helpers.BnbReference)."""
    import bitsandbytes
    ref = BnbReference(bitsandbytes)
    w = torch.randn(300, 129, generator=torch.Generator().manual_seed(3))
    for nested in (False, True):
        p, s = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                            compress_statistics=nested)
        extra = dict(offset=s.offset, state2=QuantState(
            absmax=s.state2.absmax, code=s.state2.code, blocksize=256, shape=s.absmax.shape,
            dtype=torch.float32)) if nested else {}
        state = QuantState(absmax=s.absmax, code=s.code, blocksize=64, shape=s.shape,
                           dtype=s.dtype, **extra)
        out = dequantize_4bit(p.reshape(-1), state, backend="emulate")
        assert torch.equal(out, ref.dequantize(p, s))
    ref.done()
