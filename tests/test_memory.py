"""The memory calculator against the paper's headline and against bytes measured on real modules."""
import pytest
import torch

from minqlora import memory, toy
from minqlora.double_quant import constants_nbytes
from minqlora.finetune import Bf16Linear, convert
from minqlora.linear4bit import Linear4bit
from minqlora.paged_adam import PagedAdamW
from minqlora.qlora import prepare_qlora, trainable_summary
from minqlora.training import answer_loss


def test_preset_parameter_counts_are_llamas():
    """Hugging Face's LLaMA-1 checkpoints hold 6,738,415,616 / 13,015,864,320 /
    32,528,943,616 / 65,285,660,672 parameters (the '7B, 13B, 33B, 65B' of the paper)."""
    names = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")
    counts = [memory.count_params(name) for name in names]
    assert counts == [6_738_415_616, 13_015_864_320, 32_528_943_616, 65_285_660_672]


def test_paper_headline_65b():
    """QLoRA paper: 16-bit full fine-tuning of 65B needs > 780 GB; QLoRA < 48 GB.
    full16 = 65.29e9 * (2 weights + 2 gradients + 8 AdamW) = 783.4 GB (+ activations)."""
    full = memory.estimate("llama-65b", "full16")
    qlora = memory.estimate("llama-65b", "qlora")
    assert 780e9 < full.weights + full.gradients + full.optimizer < 785e9
    assert full.total > 780e9
    assert 40e9 < qlora.total < 48e9
    assert memory.estimate("llama-33b", "qlora").total < 24e9     # the 24 GB consumer GPU


def test_qlora_weights_cost_4_127_bits():
    """One 4096x4096 linear: 8,388,608 bytes of NF4, 262,144 qabsmax + 4,096 absmax2 + 4 offset
    = 266,244 bytes of constants (qlora.py's worked example), 4.127 bits per weight."""
    n = 4096 * 4096
    assert constants_nbytes(n, 64, True) == 266_244
    assert constants_nbytes(n, 64, False) == 4 * n // 64
    e = memory.estimate("llama-65b", "qlora", r=1)
    n_q = 80 * sum(i * o for _, i, o in memory.linear_shapes("llama-65b"))
    assert 8 * (e.weights + e.quant_constants - 2 * 2 * 32000 * 8192 - 2 * 161 * 8192) / n_q \
        == pytest.approx(4.127, abs=1e-3)
    assert e.quant_constants == 80 * sum(constants_nbytes(i * o, 64, True) + 64
                                         for _, i, o in memory.linear_shapes("llama-65b"))


def test_methods_are_ordered_and_lora_counts():
    """LoRA at r on an (in, out) linear trains r * (in + out): 7B, r=64 -> 32 layers * 64 *
    (4 * 8192 + 3 * 15104) = 159,907,840 adapter parameters, 320 MB in 16 bits."""
    e = memory.estimate("llama-7b", "lora16")
    assert e.adapters == 2 * 159_907_840 and e.optimizer == 8 * 159_907_840
    for name in memory.PRESETS:
        full, lora, q = (memory.estimate(name, m).total for m in memory.METHODS)
        assert q < lora < full
    assert str(e).endswith(f"total {e.total / 1e9:.2f} GB")
    assert memory.table(models=["llama-7b"], methods=["qlora"], r=8) == [
        ("llama-7b", "qlora", memory.estimate("llama-7b", "qlora", r=8).total / 1e9)]


def _nbytes(tensors):
    return sum(t.nbytes for t in tensors)


def _step(model, opt):
    loss, _ = answer_loss(model, toy.make_data("add")["train"][:8])
    loss.backward()
    opt.step()


def test_full16_matches_the_bytes_of_the_toy_model():
    """Same formula, toy shapes: a bf16 ToyLM holds exactly estimate(...).weights bytes, its
    gradients estimate.gradients; an fp32 ToyLM's AdamW state is 8 bytes per parameter."""
    model = toy.ToyLM().to(torch.bfloat16)
    e = memory.estimate(toy.CONFIG, "full16", batch_size=0)
    assert _nbytes(model.parameters()) == e.weights == 2 * memory.count_params(toy.CONFIG)
    model = toy.ToyLM()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    e32 = memory.estimate(toy.CONFIG, "full16", weight_bits=32, grad_bits=32)
    assert _nbytes(p.grad for p in model.parameters()) == e32.gradients
    state = opt.state.values()
    assert _nbytes(s[k] for s in state for k in ("exp_avg", "exp_avg_sq")) == e32.optimizer


def test_qlora_matches_the_bytes_of_the_toy_model():
    """prepare_qlora(ToyLM) at r=8: packed bytes + constants + float32 rest, fp32 adapters,
    their gradients and PagedAdamW's state all equal the calculator's counts at 32-bit settings
    (each Linear4bit keeps its own 16-value codebook: 64 bytes, counted by the calculator too)."""
    model = prepare_qlora(toy.ToyLM(), r=8, dropout=0.0)
    summary = trainable_summary(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    stored = _nbytes(b for m in layers for b in m.buffers())
    e = memory.estimate(toy.CONFIG, "qlora", r=8, weight_bits=32, adapter_bits=32, grad_bits=32)
    assert e.weights + e.quant_constants == stored + summary.bytes_other
    assert e.adapters == summary.bytes_adapters
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad])
    _step(model, opt)
    assert _nbytes(p.grad for p in model.parameters() if p.grad is not None) == e.gradients
    state = opt.state_dict()["state"].values()
    assert _nbytes(s[k] for s in state for k in ("exp_avg", "exp_avg_sq")) == e.optimizer


def test_lora16_matches_the_bytes_of_the_toy_model():
    """finetune's lora16 model: bf16 linears + float32 embedding, norms and lm_head."""
    model = convert(toy.ToyLM(), "lora16", r=8)
    assert sum(isinstance(m, Bf16Linear) for m in model.modules()) == 7 * 2
    e = memory.estimate(toy.CONFIG, "lora16", r=8, adapter_bits=32)
    n_linear = 2 * sum(i * o for _, i, o in memory.linear_shapes(toy.CONFIG))
    frozen = _nbytes(p for p in model.parameters() if not p.requires_grad)
    assert frozen == e.weights + 2 * (memory.count_params(toy.CONFIG) - n_linear)  # rest in fp32
    assert _nbytes(p for p in model.parameters() if p.requires_grad) == e.adapters


def test_activations_scale_with_tokens():
    """Checkpointed: L x tokens x h saved block inputs, and nothing for the recompute peak (one
    block's activations rebuilt during backward, transient: memory.py's docstring and lesson 09
    say why it is left out). That peak is the unchecked count divided by L."""
    a = memory.estimate("llama-7b", "qlora", batch_size=2, seq_len=256).activations
    assert a == 32 * 2 * 256 * 4096 * 2
    b = memory.estimate("llama-7b", "qlora", gradient_checkpointing=False).activations
    assert b == 32 * 512 * (10 * 4096 + 3 * 11008) * 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(config="llama-70b", method="qlora"), "unknown preset 'llama-70b'"),
    (dict(config={"hidden_size": 8}, method="qlora"), "config is missing"),
    (dict(config="llama-7b", method="qlora8"), "method must be one of"),
    (dict(config="llama-7b", method="qlora", r=0), "r must be an integer >= 1, got 0"),
    # issue 10, item 13: these counted nothing, or negative bytes, or divided by zero
    (dict(config="llama-7b", method="qlora", target_modules=["query"]),
     r"target_modules must name some of \['q_proj'.*got \['query'\]"),
    (dict(config="llama-7b", method="lora16", target_modules=[]), "target_modules must name"),
    (dict(config="llama-7b", method="qlora", blocksize=-64), "blocksize must be a power of two"),
    (dict(config="llama-7b", method="qlora", blocksize=0), "blocksize must be a power of two"),
    (dict(config="llama-7b", method="qlora", seq_len=-512), "seq_len must be an integer >= 0"),
    (dict(config="llama-7b", method="qlora", batch_size=1.5), "batch_size must be an integer"),
    (dict(config="llama-7b", method="qlora", weight_bits=0), "weight_bits must be an integer >= 1"),
    (dict(config={**memory.PRESETS["llama-7b"], "hidden_size": -4096}, method="qlora"),
     r"config\['hidden_size'\] must be an integer >= 1, got -4096"),
])
def test_bad_arguments_say_what_was_expected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.estimate(**kwargs)


def test_target_modules_as_one_name():
    """A string is one module name (not its letters), as prepare_qlora reads it."""
    one = memory.estimate("llama-7b", "qlora", target_modules="q_proj")
    assert one == memory.estimate("llama-7b", "qlora", target_modules=["q_proj"])
    assert one.adapters == 32 * 64 * (4096 + 4096) * 2


def test_grouped_query_attention_and_tied_embeddings_smollm2():
    """SmolLM2-135M (lesson 12): k and v are 576 x 192 (3 key/value heads for 9 query heads) and
    the lm_head is the embedding: 30 * (2 * 576^2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)
    + 49152 * 576 + 576 = 134,515,008 parameters, what Transformers' model holds."""
    smollm2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   tie_word_embeddings=True)
    assert memory.count_params(smollm2) == 134_515_008
    assert [s[2] for s in memory.linear_shapes(smollm2)[:4]] == [576, 192, 192, 576]
    untied = dict(smollm2, tie_word_embeddings=False, num_key_value_heads=9)
    assert memory.count_params(untied) == 134_515_008 + 49152 * 576 + 30 * 2 * 576 * 384
    e = memory.estimate(smollm2, "qlora", r=8)
    assert e.adapters == 2 * 30 * 8 * (576 * 6 + 192 * 2 + 3 * (576 + 1536))   # r (in + out), 2 B
    with pytest.raises(ValueError, match="num_key_value_heads"):
        memory.count_params(dict(smollm2, num_key_value_heads=0))
