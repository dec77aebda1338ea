"""save_adapter / load_adapter: PEFT's adapter folder, both ways against PEFT itself (models
made in code, nothing downloaded)."""
import copy
import json

import pytest
import torch
from torch import nn

from minqlora.adapter import PREFIX, load_adapter, save_adapter, target_modules
from minqlora.lora import LoRALinear, to_linear
from minqlora.qlora import prepare_qlora, replace_module
from minqlora.toy import ToyLM

from helpers import nonzero_lora_B, prepared_toy

safetensors = pytest.importorskip("safetensors.torch")

IDS = torch.tensor([[1, 10, 2, 13, 0, 0, 3], [4, 11, 5, 13, 0, 0, 9]])
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def dequantized_base(model):
    """The model PEFT sees: each LoRALinear replaced by an nn.Linear of its dequantized base
    (float32), so both sides compute over the same weights."""
    base = copy.deepcopy(model)
    for name, layer in list(base.named_modules()):
        if isinstance(layer, LoRALinear):
            base = replace_module(base, name, to_linear(layer.base).float())
    return base


def test_folder_layout_and_config(tmp_path):
    model = prepared_toy(dropout=0.05)
    save_adapter(model, tmp_path)
    tensors = safetensors.load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 28 and tensors[PREFIX + "layers.0.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors[PREFIX + "layers.1.down_proj.lora_B.weight"].shape == (64, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"],
            config["bias"], config["fan_in_fan_out"], config["task_type"]) == (
                "LORA", 4, 8, 0.05, "none", False, None)
    assert config["target_modules"] == sorted(ATTENTION + ["down_proj", "gate_proj", "up_proj"])


def test_target_modules_fall_back_to_full_names_when_a_leaf_would_pick_more():
    model = prepared_toy(target_modules=["layers.0.q_proj"])
    assert target_modules(model, ["layers.0.q_proj"]) == ["layers.0.q_proj"]
    assert target_modules(prepared_toy(target_modules=["q_proj"]),
                          ["layers.0.q_proj", "layers.1.q_proj"]) == ["q_proj"]


def test_config_keys_are_among_peft_own(tmp_path):
    """Every key minqlora writes is one PEFT 0.21 writes; the rest are PEFT's defaults."""
    peft = pytest.importorskip("peft")
    save_adapter(prepared_toy(), tmp_path / "ours")
    model = dequantized_base(prepared_toy())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    for key in ("peft_type", "bias", "fan_in_fan_out", "task_type", "use_rslora", "use_dora"):
        assert ours[key] == theirs[key], key


def test_minqlora_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = prepared_toy(seed=0)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(dequantized_base(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS), model(IDS), rtol=1e-5, atol=1e-5)


def test_peft_trained_adapter_loads_into_minqlora_with_the_same_outputs(tmp_path):
    """get_peft_model over the same (dequantized) base, a few AdamW steps, save_pretrained;
    load_adapter into minqlora's 4-bit model gives PEFT's outputs."""
    peft = pytest.importorskip("peft")
    model = prepared_toy(seed=1, dropout=0.1)
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                             target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"])
    theirs = peft.get_peft_model(dequantized_base(model), config)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        logits = theirs(IDS)
        nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    IDS[:, 1:].reshape(-1)).backward()
        optimizer.step()
    theirs.save_pretrained(tmp_path)
    load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs.eval()(IDS), rtol=1e-5, atol=1e-5)


def test_round_trip_and_a_bad_folder_leaves_the_model_unchanged(tmp_path):
    source = prepared_toy(seed=0)
    save_adapter(source, tmp_path / "good")
    model = prepared_toy(seed=0)                         # same base, other adapters
    with torch.no_grad():
        model.layers[0].q_proj.lora_B.weight.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = safetensors.load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    q = PREFIX + "layers.0.q_proj."
    cases = [
        ({**config, "r": 8}, tensors, "layers.0.q_proj: the adapter has r=8, the model 4"),
        ({**config, "lora_alpha": 16}, tensors, "the adapter has lora_alpha=16, the model 8"),
        ({**config, "use_rslora": True}, tensors, "use_rslora = True has no counterpart"),
        ({**config, "use_dora": True}, tensors, "use_dora = True has no counterpart"),
        ({**config, "peft_type": "IA3"}, tensors, "peft_type is 'IA3'"),
        ({**config, "target_modules": ["q_proj"]}, tensors,
         "layers.0.k_proj: adapted in the model, not in target_modules"),
        (config, {k: v for k, v in tensors.items() if k != q + "lora_B.weight"},
         f"missing key '{q}lora_B.weight'"),
        (config, {**tensors, PREFIX + "lm_head.lora_A.weight": torch.zeros(4, 64)},
         "unexpected key 'base_model.model.lm_head.lora_A.weight'"),
        (config, {**tensors, q + "lora_A.weight": torch.zeros(4, 32)},
         r"lora_A.weight: expected a float tensor of shape \[4, 64\], got \[4, 32\]"),
        (config, {**tensors, q + "lora_A.weight": torch.full((4, 64), float("nan"))},
         "non-finite"),
    ]
    for i, (bad_config, bad_tensors, message) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(bad_config))
        safetensors.save_file(bad_tensors, folder / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=message):
            load_adapter(model, folder)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="cannot read adapter_config.json"):
        load_adapter(model, tmp_path / "absent")
    load_adapter(model, tmp_path / "good")
    assert torch.equal(model(IDS), source(IDS))


def test_layers_that_disagree_cannot_be_one_peft_config(tmp_path):
    model = prepared_toy()
    model.layers[1].up_proj = LoRALinear(model.layers[1].up_proj.base, r=2, alpha=8)
    with pytest.raises(ValueError, match="one r for all layers; layers.1.up_proj has 2"):
        save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        save_adapter(ToyLM(), tmp_path)


def test_peft_auto_classes_open_the_folder(tmp_path):
    """task_type and base_model_name_or_path: AutoPeftModelForCausalLM.from_pretrained(adapter)
    finds the 4-bit base (a folder save_4bit wrote) and computes what minqlora computes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from minqlora.adapter import peft_fields
    from minqlora.checkpoint import save_4bit
    transformers.utils.logging.disable_progress_bar()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = prepare_qlora(transformers.LlamaForCausalLM(config), r=4, alpha=8).eval()
    nonzero_lora_B(model)
    save_4bit(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["task_type"], written["base_model_name_or_path"]) == (
        "CAUSAL_LM", str(tmp_path / "base"))
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    ids = torch.tensor([[1, 5, 9, 2, 30, 7, 63]])
    with torch.no_grad():                                      # bf16 compute on both sides
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=2e-2, atol=2e-2)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert peft_fields(base) == {"task_type": "CAUSAL_LM",     # read off a loaded model
                                 "base_model_name_or_path": str(tmp_path / "base")}
    assert peft_fields(ToyLM()) == {"task_type": None, "base_model_name_or_path": None}
    with pytest.raises(ValueError, match="task_type 'CAUSAL' is none of PEFT's"):
        save_adapter(model, tmp_path / "bad", task_type="CAUSAL")
