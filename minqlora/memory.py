"""The memory calculator: the bytes to fine-tune a LLaMA-shaped model, by method (lesson 09).

A LLaMA block (hidden h, intermediate m) holds seven linear weights, q, k, v, o (h x h each) and
gate, up, down (h x m each), and two RMSNorms (h each); the model adds an embedding and an
lm_head (vocab x h each) and a final norm. Newer LLaMAs (SmolLM2, lesson 12) shrink k and v to
h x (h * num_key_value_heads / num_attention_heads) and may share the lm_head with the embedding
(tie_word_embeddings): both optional config keys are honoured. Every count follows from shapes:

    method   base weights                      adapters (r)   gradients        optimizer state
    full16   16 bits, all                      -              16 bits, all     AdamW: 2 x fp32 = 8 B
    lora16   16 bits, all                      16 bits        16 bits, adapter 8 B per adapter param
    qlora    4 bits + constants for the seven  16 bits        16 bits, adapter 8 B per adapter param
             linears; 16 bits for the rest                                     (paged, Lesson 08)

4-bit constants per weight of n values (blocksize 64, double quantization, as QuantState.nbytes
counts them): ceil(n/64) uint8 absmaxes + 4 bytes of absmax2 per 256 of those + a 4-byte offset,
4.127 bits per parameter in all, plus the layer's 64-byte code table (16 float32 values).
LoRA adds r * (in + out) parameters per targeted linear. No method counts a float32 master copy
of the trainable weights unless master_weights=True (4 bytes more per trainable parameter).

Worked example: LLaMA-65B has 65.29e9 parameters. full16 counts, for each, a 2-byte weight, a
2-byte gradient and 8 bytes of AdamW moments: 12 bytes, 783 GB, the paper's "more than 780 GB".
That assumes no master copy. Mixed-precision training usually also keeps float32 master weights,
16 bytes per parameter and about 1.04 TB at 65B, so 780 GB is a lower bound:

>>> e = estimate("llama-65b", "full16", master_weights=True)
>>> round((e.weights + e.gradients + e.optimizer) / count_params("llama-65b"))
16

QLoRA stores the same model in about 34 GB, and its r = 64 adapters on all linears (0.8e9
parameters) add 2 + 2 + 8 bytes each: about 45 GB, under one 48 GB GPU. Activations are an
estimate (documented in `estimate`), the one part that depends on batch and sequence length.

This module counts; it neither allocates nor measures. tests/test_memory.py checks it against
the bytes actually held by the toy model of toy.py and by qlora.py's layers.
"""
from dataclasses import dataclass, fields

from ._checks import check_blocksize
from .double_quant import constants_nbytes

METHODS = ("full16", "lora16", "qlora")
KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads")
PRESETS = {  # Hugging Face config.json values of the LLaMA-1 models used in the QLoRA paper
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                      num_hidden_layers=40, num_attention_heads=40),
    "llama-33b": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                      num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                      num_hidden_layers=80, num_attention_heads=64),
}
CODEBOOK_BYTES = 16 * 4  # each 4-bit layer keeps its own 16-value float32 code table
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Estimate:
    """Bytes by part; `.total` sums them. str() gives a one-line summary (GB = 1e9 bytes).

    >>> e = Estimate(2_000_000, 0, 500_000, 0, 0, 0)
    >>> e.total, str(e).split("; ")[-1]
    (2500000, 'total 2.50 MB')
    """
    weights: int
    quant_constants: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def parts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self):
        scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                           if self.total >= s or s == 1)
        return ", ".join(f"{k} {v / scale:.2f}" for k, v in self.parts().items()) + \
            f"; total {self.total / scale:.2f} {unit}"


def linear_shapes(config) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the seven linears of one block.

    >>> linear_shapes("llama-7b")[4]
    ('gate_proj', 4096, 11008)
    """
    c = _config(config)
    h, m = c["hidden_size"], c["intermediate_size"]
    kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    mlp = [("gate_proj", h, m), ("up_proj", h, m), ("down_proj", m, h)]
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h)] + mlp


def count_params(config) -> int:
    """All parameters of the model.

    >>> count_params("llama-65b")
    65285660672
    """
    c = _config(config)
    h, L = c["hidden_size"], c["num_hidden_layers"]
    per_block = sum(i * o for _, i, o in linear_shapes(c)) + 2 * h
    return L * per_block + (1 if c.get("tie_word_embeddings") else 2) * c["vocab_size"] * h + h


def estimate(config, method: str, r: int = 64, target_modules=LINEARS, blocksize: int = 64,
             double_quant: bool = True, weight_bits: int = 16, adapter_bits: int = 16,
             grad_bits: int = 16, optimizer_bytes: int = 8, master_weights: bool = False,
             batch_size: int = 1, seq_len: int = 512, activation_bits: int = 16,
             gradient_checkpointing: bool = True) -> Estimate:
    """Bytes to fine-tune `config` (a preset name or a dict with Hugging Face LLaMA keys).

    method: "full16", "lora16" or "qlora" (see the module docstring for what each stores).

    optimizer_bytes: state bytes per trainable parameter (AdamW: two fp32 moments = 8).
    master_weights: add a 4-byte fp32 copy of each trainable parameter, as mixed-precision
    training usually keeps (full16 then counts 16 bytes per parameter instead of 12).
    activations: with gradient_checkpointing, one saved hidden state per block
    (L * batch * seq * h); without, what a block saves for backward with fused attention
    (about 10h + 3m values per token per block). Both at activation_bits.

    >>> e = estimate("llama-65b", "full16")
    >>> round((e.weights + e.gradients + e.optimizer) / 1e9)
    783
    >>> estimate("llama-65b", "qlora").total < 48e9
    True
    """
    c = _config(config)
    if method not in METHODS:
        raise ValueError(f"estimate: method must be one of {METHODS}, got {method!r}")
    target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [t for t in target_modules if t not in LINEARS]
    if unknown or (method != "full16" and not target_modules):
        raise ValueError(f"estimate: target_modules must name some of {list(LINEARS)} (the "
                         f"linears of a LLaMA block), got {target_modules!r}")
    check_blocksize(blocksize, "estimate")
    counts = dict(r=r, weight_bits=weight_bits, adapter_bits=adapter_bits, grad_bits=grad_bits,
                  activation_bits=activation_bits, batch_size=batch_size,
                  optimizer_bytes=optimizer_bytes, seq_len=seq_len)
    for name, value in counts.items():      # sizes count from 0, the rest from 1
        _check_count(value, f"estimate: {name}", 0 if name in ("batch_size", "seq_len",
                                                              "optimizer_bytes") else 1)
    h, m, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    shapes = [s for s in linear_shapes(c) if s[0] in target_modules]
    n_all = count_params(c)
    n_adapter = L * sum(r * (i + o) for _, i, o in shapes) if method != "full16" else 0
    trainable = n_all if method == "full16" else n_adapter
    weights, constants = n_all * weight_bits // 8, 0
    if method == "qlora":  # targeted linears are stored in 4 bits, the rest stays at weight_bits
        n_q = [i * o for _, i, o in shapes]
        weights -= L * sum(n_q) * weight_bits // 8
        weights += L * sum((n + 1) // 2 for n in n_q)
        constants = L * sum(constants_nbytes(n, blocksize, double_quant) + CODEBOOK_BYTES
                            for n in n_q)
    per_token = h if gradient_checkpointing else 10 * h + 3 * m
    return Estimate(
        weights=weights, quant_constants=constants,
        adapters=n_adapter * adapter_bits // 8,
        gradients=trainable * grad_bits // 8,
        optimizer=trainable * (optimizer_bytes + (4 if master_weights else 0)),
        activations=L * batch_size * seq_len * per_token * activation_bits // 8)


def _config(config) -> dict:
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"memory: unknown preset {config!r}; choose one of {list(PRESETS)} "
                             "or pass a dict with Hugging Face LLaMA keys")
        return PRESETS[config]
    missing = [k for k in KEYS if k not in config]
    if missing:
        raise ValueError(f"memory: config is missing {missing}; expected the Hugging Face LLaMA "
                         f"keys {list(KEYS)}")
    for k in KEYS + tuple(k for k in ("num_key_value_heads",) if k in config):
        _check_count(config[k], f"memory: config[{k!r}]", 1)
    return config


def _check_count(value, what: str, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{what} must be an integer >= {lowest}, got {value!r}")


def table(models=tuple(PRESETS), methods=METHODS, **assumptions) -> list[tuple[str, str, float]]:
    """Rows (model, method, total GB) for a memory table; assumptions go to estimate()."""
    return [(name, meth, estimate(name, meth, **assumptions).total / 1e9)
            for name in models for meth in methods]
