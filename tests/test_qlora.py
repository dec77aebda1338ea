import pytest
import torch
from torch import nn

from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear
from minqlora.qlora import prepare_qlora, replace_module, trainable_summary

from helpers import Tiny, gaussian


def test_every_linear_but_the_head_gets_lora_over_4bit():
    model = prepare_qlora(Tiny(), r=4)
    for name in ("attn.q", "mlp"):
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and isinstance(layer.base, Linear4bit)
        assert (layer.r, layer.scaling, layer.dropout.p) == (4, 16 / 4, 0.1)
    assert type(model.lm_head) is nn.Linear
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["attn.q.lora_A.weight", "attn.q.lora_B.weight",
                         "mlp.lora_A.weight", "mlp.lora_B.weight"]


def test_defaults_follow_the_paper():
    layer = prepare_qlora(Tiny()).mlp
    assert (layer.r, layer.alpha, layer.dropout.p) == (64, 16, 0.1)
    assert (layer.base.quant_type, layer.base.blocksize, layer.base.double_quant,
            layer.base.compute_dtype) == ("nf4", 64, True, torch.bfloat16)


def test_prepared_model_computes_the_4bit_model_at_start():
    """Adapters start at B = 0, so the output is exactly that of the model with each linear
    replaced by its Linear4bit (nothing else changed)."""
    tokens = torch.tensor([[1, 2, 3, 4]])
    reference = Tiny()
    reference.attn["q"] = Linear4bit.from_linear(reference.attn["q"])
    reference.mlp = Linear4bit.from_linear(reference.mlp)
    model = prepare_qlora(Tiny(), r=4).eval()
    assert torch.equal(model(tokens), reference(tokens))


def test_target_modules_and_errors():
    model = prepare_qlora(Tiny(), r=2, target_modules=["q"])
    assert isinstance(model.attn["q"], LoRALinear) and type(model.mlp) is nn.Linear
    with pytest.raises(ValueError, match=r"no nn.Linear matched target_modules=\['v'\].*"
                                         r"\['attn.q', 'mlp', 'lm_head'\]"):
        prepare_qlora(Tiny(), target_modules=["v"])
    with pytest.raises(ValueError, match="already adapted are skipped"):
        prepare_qlora(prepare_qlora(Tiny(), r=2))               # twice: nothing left to adapt
    untouched = Tiny()
    with pytest.raises(ValueError, match="LoRALinear: r must be an integer >= 1, got 0"):
        prepare_qlora(untouched, r=0)
    assert type(untouched.mlp) is nn.Linear and untouched.mlp.weight.requires_grad  # unchanged


def test_trainable_summary_worked_by_hand():
    """nn.Linear(128, 64) at r = 8, NF4 + double quant:
    4-bit: 8192 weights / 2 = 4096 bytes + 128 qabsmax + 1 absmax2 * 4 + offset 4 + code 64 = 4296
    adapters: 8 * (128 + 64) = 1536 float32 = 6144 bytes; other: the bias, 64 * 4 = 256 bytes
    params: 8192 (4-bit) + 64 (bias) + 1536 (adapters) = 9792, of which 1536 train."""
    torch.manual_seed(0)
    summary = trainable_summary(prepare_qlora(nn.Sequential(nn.Linear(128, 64)), r=8))
    assert (summary.trainable, summary.total, summary.params_4bit) == (1536, 9792, 8192)
    assert (summary.bytes_4bit, summary.bytes_adapters, summary.bytes_other) == (4296, 6144, 256)
    text = str(summary)
    assert "trainable params: 1,536 of 9,792 (15.69%)" in text
    assert "4.195 bits per 4-bit parameter" in text            # 8 * 4296 / 8192


def test_4_127_bits_per_parameter_at_scale():
    """1024 x 1024: (524,288 + 16,384 + 256 + 4 + 64) bytes * 8 / 1,048,576 = 4.12747,
    the paper's 4 + 8/64 + 32/(64*256) once the single offset and code table are negligible."""
    layer = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    with torch.no_grad():
        layer[0].weight.normal_(0, 0.02)
    summary = trainable_summary(prepare_qlora(layer, r=8))
    assert summary.bytes_4bit == 524_288 + 16_384 + 256 + 4 + 64
    assert round(summary.bits_per_4bit_param, 3) == 4.127


def test_model_to_bfloat16_keeps_the_4bit_state():
    model = prepare_qlora(Tiny(), r=4)
    before = model.mlp.base.state_dict()
    model.to(torch.bfloat16)
    after = model.mlp.base.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before if k != "bias")
    assert model.mlp.lora_A.weight.dtype == torch.bfloat16


def test_replace_module_by_dotted_name_and_at_the_root():
    model = Tiny()
    new = nn.Linear(16, 32)
    assert replace_module(model, "attn.q", new) is model and model.attn["q"] is new
    assert replace_module(model, "mlp", nn.Identity()) is model and type(model.mlp) is nn.Identity
    root = nn.Linear(2, 2)
    assert replace_module(model, "", root) is root            # the model itself is replaced
    with pytest.raises(AttributeError, match="no attribute `nope`"):
        replace_module(model, "nope.q", new)


# ---- issue 10, item 12: convert only what converts faithfully, report the rest ----

class Doubled(nn.Linear):
    """An nn.Linear subclass with its own forward: swapping it would drop the * 2."""

    def forward(self, x):
        return super().forward(x) * 2


def test_an_ordinary_model_is_converted_without_a_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = prepare_qlora(Tiny(), r=4)
    assert model.qlora_skipped == {}


def test_a_subclass_with_its_own_forward_is_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Doubled(8, 8))
    x = gaussian((3, 8))
    hidden = model[0]
    with pytest.warns(UserWarning, match=r"left 1 targeted linear layer\(s\) .* 1: Doubled has "
                                         "its own forward"):
        prepare_qlora(model, r=2)
    assert type(model[1]) is Doubled and isinstance(model[0], LoRALinear)
    assert model.qlora_skipped == {"1": "Doubled has its own forward"}
    assert not any(p.requires_grad for p in model[1].parameters())
    assert torch.equal(model(x), model[1](model[0](x))) and model[0].base is not hidden
    assert torch.equal(model[1](x), Doubled.forward(model[1], x))


def test_multihead_attention_and_transformer_layers_still_run():
    """nn.MultiheadAttention reads out_proj.weight itself (the swap raised "'LoRALinear' object
    has no attribute 'weight'"); nn.TransformerEncoderLayer's inference fast path reads its
    linears' weights. Those stay; the layers run, in training and in eval mode, exactly as
    before at the start (B = 0) where nothing was converted."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.Linear(16, 16), layer)
    x = gaussian((2, 5, 16))
    model.eval()
    with torch.no_grad():
        want = layer(x)                                  # eval: the fast path
    with pytest.warns(UserWarning, match="MultiheadAttention reads its .weight directly"):
        prepare_qlora(model, r=2)
    assert set(model.qlora_skipped) == {"1.self_attn.out_proj", "1.linear1", "1.linear2"}
    assert isinstance(model[0], LoRALinear)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), want)               # the layer computes what it did
    mha = nn.MultiheadAttention(16, 2)
    with pytest.raises(ValueError, match="can be converted faithfully .*out_proj.*reads its "
                                         ".weight directly"):
        prepare_qlora(mha)


def test_a_module_under_two_names_is_converted_under_both():
    """It was converted under one name only; now one LoRALinear sits under both: still shared."""
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    prepare_qlora(model, r=2)
    assert isinstance(model["a"], LoRALinear) and model["b"][0] is model["a"]
    assert model.qlora_skipped == {}
    assert sum(p.requires_grad for p in model.parameters()) == 2    # one A, one B


def test_tied_weights_stay_tied():
    """lm_head sharing the embedding's weight: quantizing it silently untied them."""
    model = Tiny()
    model.lm_head.weight = model.embed.weight
    with pytest.warns(UserWarning, match=r"lm_head: its weight or bias is tied to "
                                         r"\['embed.weight'\]"):
        prepare_qlora(model, r=2, exclude=())
    assert model.lm_head.weight is model.embed.weight and type(model.lm_head) is nn.Linear
    assert isinstance(model.mlp, LoRALinear)


def test_hooks_and_parametrizations_are_kept():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].register_forward_hook(lambda m, i, o: o * 0)
    torch.nn.utils.parametrize.register_parametrization(model[1], "weight", nn.Identity())
    with pytest.warns(UserWarning, match="forward hooks or a parametrized weight"):
        prepare_qlora(model, r=2)
    assert set(model.qlora_skipped) == {"0", "1"} and isinstance(model[2], LoRALinear)
    assert (model[0](gaussian((1, 4))) == 0).all()
