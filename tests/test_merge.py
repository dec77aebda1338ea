"""merge.py: merging adapters back (lesson 07), as a plain or as a 4-bit model again, and what
each merge costs (lesson 10)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear
from minqlora.merge import merge_errors, merge_qlora
from minqlora.qlora import prepare_qlora
from minqlora.quant_state import quantize_4bit

from helpers import Tiny, gaussian


def test_a_step_trains_only_the_adapters_and_merge_matches():
    torch.manual_seed(0)
    model = prepare_qlora(Tiny(), r=4, dropout=0.0, compute_dtype=torch.float32)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens)[0], tokens[0]).backward()
        opt.step()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert model.mlp.lora_B.weight.abs().sum() > 0
    out = model(tokens)
    merged = merge_qlora(copy.deepcopy(model))
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in merged.modules())
    assert [type(m) for m in (merged.attn["q"], merged.mlp, merged.lm_head)] == [nn.Linear] * 3
    torch.testing.assert_close(merged(tokens), out, atol=1e-5, rtol=1e-5)


def test_merge_qlora_on_bare_layers_and_a_root_layer():
    lin = nn.Linear(32, 8)
    layer4 = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    x = gaussian((3, 32))
    merged = merge_qlora(nn.Sequential(copy.deepcopy(layer4)))
    assert type(merged[0]) is nn.Linear and torch.equal(merged[0].weight, layer4.dequantize())
    assert torch.equal(merged[0].bias, layer4.bias) and not merged[0].weight.requires_grad
    assert torch.allclose(merged[0](x), layer4(x), atol=1e-6)
    root = merge_qlora(LoRALinear(copy.deepcopy(layer4), r=2))
    assert type(root) is nn.Linear and torch.allclose(root(x), layer4(x), atol=1e-6)


def test_merge_requantized_is_4bit_again_in_the_base_format():
    torch.manual_seed(0)
    model = prepare_qlora(Tiny(), r=4, quant_type="fp4", blocksize=32, double_quant=False)
    with torch.no_grad():
        model.mlp.lora_B.weight.normal_(0, 0.05)
    delta = model.mlp.scaling * model.mlp.lora_B.weight @ model.mlp.lora_A.weight
    expected = model.mlp.base.dequantize() + delta                     # W + scaling * B @ A
    bare = Linear4bit.from_linear(nn.Linear(16, 16))
    model.norm = nn.Sequential(bare)                                   # left as it is
    with pytest.warns(UserWarning, match=r"requantize=True"):
        merged = merge_qlora(copy.deepcopy(model), requantize=True)
    layer = merged.mlp
    assert type(layer) is Linear4bit and (layer.quant_type, layer.blocksize, layer.double_quant,
                                          layer.compute_dtype) == ("fp4", 32, False, torch.bfloat16)
    again = Linear4bit.from_linear(nn.Linear(32, 16), quant_type="fp4", blocksize=32,
                                   double_quant=False)
    again._set_state(*quantize_4bit(expected.detach(), 32, "fp4", False))
    assert torch.equal(layer.dequantize(), again.dequantize())         # quantize(W + dW)
    assert type(merged.norm[0]) is Linear4bit
    assert torch.equal(merged.norm[0].weight_packed, bare.weight_packed)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())


def toy_with_adapters(seed, std=0.02):
    from minqlora.toy import ToyLM
    torch.manual_seed(seed)
    model = prepare_qlora(ToyLM(), r=8, alpha=16, compute_dtype=torch.float32)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, std)                    # as if trained
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_errors_dequantized_is_exact_requantized_is_not(seed):
    """Merging into the dequantized float32 weight changes the outputs only by float rounding
    (~2e-7 measured); quantizing the merge again to NF4 changes them by several percent
    (4-6% measured), as much as the adapters themselves add (3-13%)."""
    model = toy_with_adapters(seed)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 14, (8, 9), generator=torch.Generator().manual_seed(seed))
    errors = merge_errors(model, ids)
    assert errors["dequantized"] < 1e-5
    assert 0.01 < errors["requantized"] < 0.2
    assert 0.01 < errors["adapters dropped"] < 0.5
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_requantizing_warns_once_per_call_with_what_it_kept():
    """One warning per call (PEFT warns once per layer), its cosine near 1 for an update far
    above NF4's step and near 0 for one far below it; dequantized merges do not warn."""
    import warnings
    for std, low, high in ((1.0, 0.5, 1.0), (1e-4, -0.5, 0.5)):
        model = toy_with_adapters(0, std=std)
        with pytest.warns(UserWarning, match=r"merge_qlora\(requantize=True\)") as caught:
            merge_qlora(copy.deepcopy(model), requantize=True)
        assert len(caught) == 1
        cosine = float(str(caught[0].message).split("cosine ")[1].split(" ")[0])
        assert low < cosine <= high, (std, cosine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_qlora(copy.deepcopy(model))
        merge_errors(model, torch.randint(0, 14, (2, 9)))     # measures it: no warning


def test_merge_errors_on_a_transformers_model_with_bf16_compute():
    """Outputs with .logits are accepted; with bf16 compute the dequantized merge (float32
    weights, float32 compute) differs by bf16's rounding of the unmerged model, not float32's."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = prepare_qlora(transformers.LlamaForCausalLM(config), r=8)    # bf16 compute
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, 0.02)
    errors = merge_errors(model, torch.tensor([[1, 5, 9, 2, 30, 7, 63]]))
    assert list(errors) == ["dequantized", "requantized", "adapters dropped"]
    assert 1e-4 < errors["dequantized"] < 5e-2 and errors["requantized"] > errors["dequantized"]
