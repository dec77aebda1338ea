import math

import pytest
import torch
from torch import nn

from minqlora import Linear4bit, LoRALinear

from helpers import gaussian


def lora_with(base, A, B, alpha):
    """A LoRALinear over `base` whose adapters hold the given A (r, in) and B (out, r)."""
    layer = LoRALinear(base, r=A.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    return layer


def test_golden_forward_worked_by_hand():
    """W = I, b = 0, A = [[1, 1]], B = [[1], [2]], alpha = 2, r = 1 -> scaling 2; x = [1, 2]:
    A x = 3, B (A x) = [3, 6], times 2 = [6, 12], plus W x = [1, 2] -> [7, 14]."""
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = lora_with(base, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [2.0]]), alpha=2)
    assert layer.scaling == 2.0
    assert layer(torch.tensor([[1.0, 2.0]])).tolist() == [[7.0, 14.0]]


def test_peft_names_and_only_adapters_train():
    layer = LoRALinear(nn.Linear(6, 4), r=3)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["lora_A.weight", "lora_B.weight"]
    assert layer.lora_A.weight.shape == (3, 6) and layer.lora_B.weight.shape == (4, 3)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.bias is None and layer.lora_B.bias is None


def test_init_A_kaiming_uniform_B_zero():
    """kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 8), r=16)
    A = layer.lora_A.weight
    bound = 1 / math.sqrt(400)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform std
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("four_bit", [False, True])
def test_fresh_layer_equals_its_base_exactly(four_bit):
    torch.manual_seed(1)
    base = nn.Linear(64, 32)
    base = Linear4bit.from_linear(base) if four_bit else base
    layer = LoRALinear(base, r=4, dropout=0.5).train()         # dropout on: still B = 0
    x = gaussian((3, 5, 64), seed=2)
    assert torch.equal(layer(x), base(x))


def test_first_step_moves_B_only_then_both():
    """B = 0 at start: dL/dA = scaling * B.T @ ... = 0 but dL/dB != 0 (A is random)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 4), r=2)
    layer(gaussian((5, 8))).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.weight.grad) == 8
    with torch.no_grad():
        layer.lora_B.weight -= 0.1 * layer.lora_B.weight.grad
    layer.zero_grad()
    layer(gaussian((5, 8))).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.weight.grad) > 0


def test_scaling_is_alpha_over_r():
    """Same A and B: the update doubles when alpha doubles, halves when r doubles (r=2 -> 4
    with the rows of A and columns of B repeated twice, halved in B)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    A, B = gaussian((2, 8), seed=1), gaussian((4, 2), seed=2)
    x = gaussian((3, 8), seed=3)
    update = lambda layer: layer(x) - base(x)  # noqa: E731
    u16 = update(lora_with(base, A, B, alpha=16))
    torch.testing.assert_close(update(lora_with(base, A, B, alpha=32)), 2 * u16)
    r4 = lora_with(base, A.repeat(2, 1), B.repeat(1, 2) / 2, alpha=16)   # same B @ A, r = 4
    assert r4.scaling == 4.0
    torch.testing.assert_close(update(r4), u16 / 2)


def test_dropout_acts_on_the_adapter_path_in_training_only():
    torch.manual_seed(0)
    layer = lora_with(nn.Linear(16, 16), gaussian((4, 16), 1), gaussian((16, 4), 2), alpha=8)
    layer.dropout = nn.Dropout(0.5)
    x = gaussian((8, 16), seed=3)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))


def test_merge_equals_unmerged_forward_nn_linear():
    torch.manual_seed(0)
    layer = lora_with(nn.Linear(32, 16), gaussian((4, 32), 1), gaussian((16, 4), 2), alpha=8)
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    x = gaussian((5, 32), seed=3)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)
    expected = layer.base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(merged.weight, expected)
    assert torch.equal(merged.bias, layer.base.bias)


def test_merge_dequantizes_a_4bit_base_first():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    layer = lora_with(base, gaussian((8, 128), 1) * 0.1, gaussian((64, 8), 2) * 0.1, alpha=16)
    merged = layer.merge()
    expected = base.dequantize(torch.float32) + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(merged.weight, expected)
    x = gaussian((5, 128), seed=3)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)


def test_merge_keeps_the_base_dtype():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    assert LoRALinear(base, r=2).merge().weight.dtype == torch.bfloat16


def test_adapters_in_float32_over_a_bf16_base_return_bf16():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = LoRALinear(base, r=2)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(gaussian((3, 8), dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be an integer >= 1, got 0"),
    (dict(r=2.5), "r must be an integer >= 1, got 2.5"),
    (dict(alpha=0), "alpha must be a finite number > 0, got 0"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0, got inf"),   # issue 10, 13
    (dict(alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1.0"),
])
def test_bad_arguments_say_what_was_expected(kwargs, message):
    with pytest.raises(ValueError, match="LoRALinear: " + message):
        LoRALinear(nn.Linear(4, 4), **kwargs)


def test_bad_base_and_bad_input():
    with pytest.raises(TypeError, match="base must be an nn.Linear or a Linear4bit, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1))
    layer = LoRALinear(nn.Linear(4, 3), r=2)
    with pytest.raises(ValueError, match=r"expected input with last dimension 4 \(in_features\), "
                                         r"got shape \(2, 5\)"):
        layer(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="expected a floating-point input tensor, got torch.int64"):
        layer(torch.zeros(2, 4, dtype=torch.long))


def test_lora_over_4bit_trains_like_lora_over_the_dequantized_weight():
    """QLoRA = LoRA over W_hat = dequantize(bytes): same output, same adapter and input
    gradients as LoRA over an nn.Linear holding W_hat (all in float32)."""
    torch.manual_seed(0)
    four = Linear4bit.from_linear(nn.Linear(48, 24), compute_dtype=torch.float32)
    plain = nn.Linear(48, 24)
    with torch.no_grad():
        plain.weight.copy_(four.dequantize(torch.float32))
        plain.bias.copy_(four.bias)
    A, B = gaussian((4, 48), seed=1), gaussian((24, 4), seed=2)
    q, p = lora_with(four, A, B, alpha=8), lora_with(plain, A, B, alpha=8)
    x = gaussian((6, 48), seed=3)
    xq, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(q(xq), p(xp))
    q(xq).pow(2).sum().backward()
    p(xp).pow(2).sum().backward()
    torch.testing.assert_close(q.lora_A.weight.grad, p.lora_A.weight.grad)
    torch.testing.assert_close(q.lora_B.weight.grad, p.lora_B.weight.grad)
    torch.testing.assert_close(xq.grad, xp.grad)


def test_gradcheck_float64_through_adapters_and_4bit_base():
    base = Linear4bit.from_linear(nn.Linear(10, 6).double(), compute_dtype=torch.float64)
    layer = LoRALinear(base, r=3, alpha=6, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = gaussian((2, 10), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, b: torch.func.functional_call(
        layer, {"lora_A.weight": a, "lora_B.weight": b}, (x,)),
        (x, layer.lora_A.weight.detach().clone().requires_grad_(),
         layer.lora_B.weight.detach().clone().requires_grad_()))
