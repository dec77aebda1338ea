"""tests for minqlora/microscaling.py: MXFP4 and NVFP4, bit for bit against torchao 0.18."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minqlora as mq
from minqlora.microscaling import E2M1, e2m1_encode

GRID = [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.fixture(scope="module")
def torchao_mx():
    """(MXTensor, NVFP4Tensor, per_tensor_amax_to_scale) from torchao, or skip."""
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    return MXTensor, NVFP4Tensor, per_tensor_amax_to_scale


def bits(t):
    """The stored bits of a float tensor (float32 or bfloat16), so -0.0 != 0.0."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_mx_same(x, torchao_mx, blocksize=32):
    MXTensor = torchao_mx[0]
    ref = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, block_size=blocksize)
    packed, state = mq.quantize_mxfp4(x, blocksize=blocksize)
    assert torch.equal(packed, ref.qdata)
    assert torch.equal(state.scales, ref.scale.view(torch.uint8))
    assert torch.equal(bits(mq.dequantize_mxfp4(packed, state)), bits(ref.dequantize(x.dtype)))
    f32 = mq.dequantize_mxfp4(packed, state, torch.float32)
    assert torch.equal(bits(f32), bits(ref.dequantize(torch.float32)))


def assert_nv_same(x, torchao_mx, tensor_scale=None):
    _, NVFP4Tensor, amax_to_scale = torchao_mx
    if tensor_scale is None:                                  # two-level: t = absmax / 2688
        ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=amax_to_scale(x.abs().amax()))
    else:                                                     # torchao's default: no t
        ref = NVFP4Tensor.to_nvfp4(x)
    packed, state = mq.quantize_nvfp4(x, tensor_scale=tensor_scale)
    assert torch.equal(packed, ref.qdata)
    assert torch.equal(state.scales.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(bits(mq.dequantize_nvfp4(packed, state)), bits(ref.dequantize(x.dtype)))


def test_e2m1_encodes_every_value_and_rounds_ties_to_even():
    assert E2M1[:8].tolist() == GRID and torch.equal(E2M1[8:], -E2M1[:8])
    assert torch.equal(e2m1_encode(E2M1), torch.arange(16, dtype=torch.uint8))    # -0.0 -> 8
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_encode(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]      # the even index (mantissa 0)
    assert e2m1_encode(-ties).tolist() == [8, 10, 10, 12, 12, 14, 14]
    near = torch.tensor([0.2500001, 0.7499999, 5.0000005, 6.5, 1e30, 1e-40])
    assert e2m1_encode(near).tolist() == [1, 1, 7, 7, 7, 0]           # saturate at 6; subnormal -> 0
    assert e2m1_encode(torch.tensor([-1e-40, -0.1])).tolist() == [8, 8]    # rounds to -0


def test_mxfp4_golden_by_hand():
    """Blocksize 4, x = [0.3, -1, 5, 0.2]: absmax 5, floor(log2 5) = 2, X = 2^(2-2) = 1, codes
    0.5 (bits 1), -1 (0b1010), 4 (5 is a tie of 4 and 6; 4 has the even index, bits 6), 0.
    Low nibble first: 0xA1, 0x06. A block of [0, 0, 0, 12]: X = 2^(3-2) = 2, 12 / 2 = 6."""
    packed, state = mq.quantize_mxfp4(torch.tensor([0.3, -1.0, 5.0, 0.2, 0, 0, 0, 12]), blocksize=4)
    assert packed.tolist() == [0xA1, 0x06, 0x00, 0x70] and state.scales.tolist() == [127, 128]
    assert mq.dequantize_mxfp4(packed, state).tolist() == [0.5, -1, 4, 0, 0, 0, 0, 12]


def test_floor_scale_saturates_the_top_of_a_block():
    """absmax 7.9: X = 2^(2-2) = 1 and 7.9 saturates to 6, the OCP FLOOR rule's known cost."""
    packed, state = mq.quantize_mxfp4(torch.tensor([7.9, 1.0]), blocksize=2)
    assert mq.dequantize_mxfp4(packed, state).tolist() == [6.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 64), (32,)])
def test_mxfp4_matches_torchao(torchao_mx, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    x = x * torch.logspace(-30, 30, x.shape[-1] // 32).repeat_interleave(32)   # every scale
    assert_mx_same(x.to(dtype), torchao_mx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 64)])
def test_nvfp4_matches_torchao(torchao_mx, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 4, shape[-1])      # varied blocks
    assert_nv_same(x.to(dtype), torchao_mx)
    assert_nv_same(x.to(dtype), torchao_mx, tensor_scale=1.0)      # torchao's to_nvfp4(x) default


def boundary_blocks(scale):
    """Two blocks of 32 with absmax 7.99 * scale (so X = scale) holding every E2M1 rounding
    midpoint, the float32 just above and just below it, and every code; one block per sign."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up, down = torch.nextafter(mids, torch.tensor(10.0)), torch.nextafter(mids, torch.tensor(0.0))
    values = torch.cat([mids, up, down, torch.tensor(GRID + [4.0, 6.0, 7.99])])      # (32,)
    return torch.stack([values, -values]) * scale


@pytest.mark.parametrize("scale", [1.0, 2.0 ** -100, 2.0 ** 100, 2.0 ** -108, 2.0 ** -121])
def test_rounding_boundaries_match_torchao(torchao_mx, scale):
    assert_mx_same(boundary_blocks(scale), torchao_mx)
    if scale > 2.0 ** -110:                 # below: a tiny tensor for NVFP4 (tested on its own)
        assert_nv_same(boundary_blocks(scale), torchao_mx)


def test_adversarial_inputs_match_torchao(torchao_mx):
    g = torch.Generator().manual_seed(0)
    cases = {
        "zeros": torch.zeros(4, 64),
        "a zero block": torch.cat([torch.zeros(2, 32), torch.randn(2, 32, generator=g)], dim=1),
        "signed zeros": -torch.zeros(2, 64),
        "subnormal values": torch.randn(2, 64, generator=g) * 1e-41,
        "normal next to subnormal": torch.cat([torch.randn(2, 32, generator=g) * 1e-36,
                                               torch.randn(2, 32, generator=g) * 1e-41], 1),
        "huge": torch.randn(2, 64, generator=g) * 1e37,
        "float32 max": torch.full((2, 64), torch.finfo(torch.float32).max),
        "one outlier": torch.randn(2, 64, generator=g).index_put_((torch.tensor([0]), torch.tensor([3])),
                                                                 torch.tensor(1e4)),
    }
    tiny_tensor = ("zeros", "signed zeros", "subnormal values", "normal next to subnormal")
    for name, x in cases.items():
        if name != "normal next to subnormal":           # MX: see the 2^-127 tests below
            assert_mx_same(x, torchao_mx)
        if name not in tiny_tensor:                      # NVFP4: see the tiny-tensor test below
            assert_nv_same(x, torchao_mx)
        assert_nv_same(x, torchao_mx, tensor_scale=1.0)  # torchao's single-level default


def test_nvfp4_tiny_tensors_keep_a_finite_reciprocal_scale():
    """absmax < 2688 * 2^-121: t is held at 2^-121 (torchao's (1/t)/S overflows: NaN or
    saturated codes). All zeros decode to zeros; a tensor of 1e-36 values still round-trips."""
    zeros = -torch.zeros(2, 32)
    packed, state = mq.quantize_nvfp4(zeros)
    assert state.tensor_scale.item() == 2.0 ** -121 and packed.eq(0x88).all()
    assert bits(mq.dequantize_nvfp4(packed, state)).equal(bits(zeros))
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 1e-36
    packed, state = mq.quantize_nvfp4(x)
    assert state.tensor_scale.item() == 2.0 ** -121
    rel = ((mq.dequantize_nvfp4(packed, state) - x).double().norm() / x.double().norm()).item()
    assert 0 < rel < 0.15


def test_nvfp4_block_scales_are_clamped_to_the_smallest_normal_e4m3(torchao_mx):
    """A block 10^6 times smaller than the tensor's largest gets S = 2^-6 (torchao's clamp to
    finfo(float8_e4m3fn).tiny): no subnormal E4M3 scale is ever stored."""
    x = torch.cat([torch.randn(1, 16) * 1e-6, torch.randn(1, 16)], dim=1)
    packed, state = mq.quantize_nvfp4(x)
    assert state.scales.float()[0, 0].item() == 2.0 ** -6
    assert_nv_same(x, torchao_mx)


def test_mx_scale_2_to_the_minus_127_follows_the_spec():
    """absmax < 2^-124 gives the E8M0 scale 2^-127. torchao divides by 2^-126 there (a clamp it
    documents as a Triton workaround) but multiplies back by 2^-127, halving the block; minqlora
    uses 2^-127 both ways, so the block round-trips like any other."""
    x = torch.tensor([1e-38, -3e-39, 2e-39, 0.0])
    packed, state = mq.quantize_mxfp4(x, blocksize=4)
    assert state.scales.tolist() == [0]
    assert state.block_scales().tolist() == [2.0 ** -127]
    x_hat = mq.dequantize_mxfp4(packed, state)
    assert x_hat.tolist() == [1.5 * 2.0 ** -127, -0.5 * 2.0 ** -127, 0.5 * 2.0 ** -127, 0.0]
    assert ((x_hat - x).abs() <= 0.25 * x.abs().max()).all()


def test_mx_scale_2_to_the_minus_127_versus_torchao(torchao_mx):
    x = torch.tensor([[1e-38, -3e-39, 2e-39, 0.0] * 8])
    ref = torchao_mx[0].to_mx(x, torch.float4_e2m1fn_x2, block_size=32)
    packed, state = mq.quantize_mxfp4(x)
    assert torch.equal(state.scales, ref.scale.view(torch.uint8))          # same scale byte ...
    ours, theirs = mq.dequantize_mxfp4(packed, state), ref.dequantize(torch.float32)
    assert (ours - x).abs().max() < (theirs - x).abs().max()               # ... the spec is closer
    assert theirs[0, 0].item() == 2.0 ** -127 and ours[0, 0].item() == 1.5 * 2.0 ** -127


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=64, max_size=64))
def test_any_floats_match_torchao(values):
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    x = torch.tensor(values, dtype=torch.float32).reshape(2, 32)
    absmax = x.abs().amax(dim=1)
    ref = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, block_size=32)
    packed, state = mq.quantize_mxfp4(x)
    assert torch.equal(state.scales, ref.scale.view(torch.uint8))
    normal = (absmax >= 2.0 ** -124).repeat_interleave(16).reshape(2, 16)     # outside the 2^-127 case
    assert torch.equal(packed[normal], ref.qdata[normal])


def test_bits_per_parameter_and_bytes():
    x = torch.randn(256, 512)
    packed, state = mq.quantize_mxfp4(x)
    assert state.bits_per_param() == 4.25
    assert (packed.numel() + state.scales.numel()) * 8 / x.numel() == 4.25
    packed, state = mq.quantize_nvfp4(x)
    assert state.bits_per_param() == 4.5 + 32 / x.numel()
    stored = packed.numel() + state.scales.numel() + state.tensor_scale.element_size()
    assert stored * 8 / x.numel() == 4.5 + 32 / x.numel()
    assert packed.shape == (256, 256) and state.scales.shape == (256, 32)


def test_dtypes_and_shapes_round_trip():
    x = torch.randn(4, 3, 64).bfloat16()
    for quantize, dequantize in [(mq.quantize_mxfp4, mq.dequantize_mxfp4),
                                 (mq.quantize_nvfp4, mq.dequantize_nvfp4)]:
        packed, state = quantize(x)
        out = dequantize(packed, state)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert dequantize(packed, state, torch.float32).dtype == torch.float32
        rel = ((out.float() - x.float()).norm() / x.float().norm()).item()
        assert rel < 0.15


def test_clear_errors():
    with pytest.raises(ValueError, match="multiple of the blocksize 32"):
        mq.quantize_mxfp4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple of the blocksize 16"):
        mq.quantize_nvfp4(torch.randn(10))
    with pytest.raises(ValueError, match="power of two"):
        mq.quantize_mxfp4(torch.randn(4, 48), blocksize=24)
    with pytest.raises(TypeError, match="floating-point"):
        mq.quantize_nvfp4(torch.ones(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-finite"):
        mq.quantize_mxfp4(torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        mq.quantize_mxfp4(torch.tensor(1.0))
    with pytest.raises(ValueError, match=">= 2\\^-121"):
        mq.quantize_nvfp4(torch.randn(16), tensor_scale=0.0)
    packed, state = mq.quantize_mxfp4(torch.randn(64))
    with pytest.raises(ValueError, match="expected 32 uint8 bytes"):
        mq.dequantize_mxfp4(packed[:-1], state)
