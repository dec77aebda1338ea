"""The memory calculator: the bytes to fine-tune a LLaMA-shaped model, by method (lesson 09).

A LLaMA block (hidden h, intermediate m) holds seven linear weights, q, k, v, o (h x h each) and
gate, up, down (h x m each), and two RMSNorms (h each); the model adds an embedding and an
lm_head (vocab x h each) and a final norm. Every count below follows from those shapes:

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

Across GPUs (lesson 13), estimate(..., gpus=N) gives one GPU's bytes when FSDP shards the
model over N: LLaMA-2-70B with r = 8 adapters needs about 21 GB on each of two GPUs.

This module counts; it neither allocates nor measures. tests/test_memory.py checks it against
the bytes actually held by the toy model of toy.py and by qlora.py's layers.
"""
from dataclasses import dataclass, fields

from ._checks import check_blocksize
from .double_quant import constants_nbytes
from .llama_shapes import (LINEARS, PRESETS, check_count, count_params, linear_shapes,
                           llama_config)

METHODS = ("full16", "lora16", "qlora")
CODEBOOK_BYTES = 16 * 4  # each 4-bit layer keeps its own 16-value float32 code table


@dataclass
class Estimate:
    """Bytes by part; `.total` sums them. str() gives a one-line summary (GB = 1e9 bytes).

    Per GPU under FSDP (estimate(..., gpus=N)): `gathered` is the whole copies FSDP gathers
    for compute (a part of the total, shown when not 0); `replicated` is not a part: it says how
    many bytes of the parts every GPU holds whole, the same on each (the 4-bit tables).

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
    gathered: int = 0
    replicated: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def parts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "replicated" and (f.name != "gathered" or self.gathered)}

    def __str__(self):
        scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                           if self.total >= s or s == 1)
        return ", ".join(f"{k} {v / scale:.2f}" for k, v in self.parts().items()) + \
            f"; total {self.total / scale:.2f} {unit}"


def estimate(config, method: str, r: int = 64, target_modules=LINEARS, blocksize: int = 64,
             double_quant: bool = True, weight_bits: int = 16, adapter_bits: int = 16,
             grad_bits: int = 16, optimizer_bytes: int = 8, master_weights: bool = False,
             batch_size: int = 1, seq_len: int = 512, activation_bits: int = 16,
             gradient_checkpointing: bool = True, gpus: int = 1) -> Estimate:
    """Bytes to fine-tune `config` (a preset name or a dict with Hugging Face LLaMA keys).

    method: "full16", "lora16" or "qlora" (see the module docstring for what each stores).

    optimizer_bytes: state bytes per trainable parameter (AdamW: two fp32 moments = 8).
    master_weights: add a 4-byte fp32 copy of each trainable parameter, as mixed-precision
    training usually keeps (full16 then counts 16 bytes per parameter instead of 12).
    activations: with gradient_checkpointing, one saved hidden state per block
    (L * batch * seq * h); without, what a block saves for backward with fused attention
    (about 10h + 3m values per token per block). Both at activation_bits. The checkpointed
    count leaves out the recompute peak, the one block whose activations backward rebuilds
    for a moment (the unchecked count / L): like the other short-lived buffers of a step
    (a dequantized weight, the input gradients) it is no part here; lesson 09 adds it by hand
    where a margin is thin.
    gpus: N > 1 gives the bytes of one of N GPUs under FSDP (lesson 13), batch_size per GPU.
    FSDP shards every parameter, 4-bit bytes and per-block absmaxes included, with its
    gradient and optimizer state: 1/N of each on each GPU. Replicated: each 4-bit layer's code
    table, absmax2 and offset (distributed.py) and each GPU's own activations. Gathered, whole
    for compute: the root's parameters (embedding, final norm, lm_head: FSDP2 keeps them from
    forward through backward) and two blocks (the one computing, the next one prefetched).

    >>> e = estimate("llama-65b", "full16")
    >>> round((e.weights + e.gradients + e.optimizer) / 1e9)
    783
    >>> estimate("llama-65b", "qlora").total < 48e9
    True
    >>> round(estimate("llama-2-70b", "qlora", r=8, gpus=2).total / 1e9, 1)   # per GPU
    21.4
    """
    c = llama_config(config)
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
                  optimizer_bytes=optimizer_bytes, seq_len=seq_len, gpus=gpus)
    for name, value in counts.items():      # sizes count from 0, the rest from 1
        check_count(value, f"estimate: {name}", 0 if name in ("batch_size", "seq_len",
                                                              "optimizer_bytes") else 1)
    h, m, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    shapes = [s for s in linear_shapes(c) if s[0] in target_modules]
    n_all = count_params(c)
    n_adapter = L * sum(r * (i + o) for _, i, o in shapes) if method != "full16" else 0
    trainable = n_all if method == "full16" else n_adapter
    weights, constants, per_layer = n_all * weight_bits // 8, 0, 0
    if method == "qlora":  # targeted linears are stored in 4 bits, the rest stays at weight_bits
        n_q = [i * o for _, i, o in shapes]
        weights -= L * sum(n_q) * weight_bits // 8
        weights += L * sum((n + 1) // 2 for n in n_q)
        constants = L * sum(constants_nbytes(n, blocksize, double_quant) + CODEBOOK_BYTES
                            for n in n_q)       # per_layer: all but the per-block absmaxes
        per_layer = constants - L * sum(-(-n // blocksize) * (1 if double_quant else 4)
                                        for n in n_q)
    per_token = h if gradient_checkpointing else 10 * h + 3 * m
    sharded = dict(weights=weights, quant_constants=constants - per_layer,
                   adapters=n_adapter * adapter_bits // 8, gradients=trainable * grad_bits // 8,
                   optimizer=trainable * (optimizer_bytes + (4 if master_weights else 0)))
    activations = L * batch_size * seq_len * per_token * activation_bits // 8
    if gpus == 1:
        return Estimate(**{**sharded, "quant_constants": constants}, activations=activations)
    heads = 1 if c.get("tie_word_embeddings") else 2      # embedding and lm_head, or one tied
    root = (heads * c["vocab_size"] * h + h) * weight_bits // 8   # ... and the final norm
    block = (weights - root + sharded["quant_constants"] + sharded["adapters"]) // L
    per_gpu = {k: -(-v // gpus) for k, v in sharded.items()}          # 1/N, rounded up
    per_gpu["quant_constants"] += per_layer
    return Estimate(**per_gpu, activations=activations, gathered=root + 2 * block,
                    replicated=per_layer)


def table(models=tuple(PRESETS), methods=METHODS, **assumptions) -> list[tuple[str, str, float]]:
    """Rows (model, method, total GB) for a memory table; assumptions go to estimate()."""
    return [(name, meth, estimate(name, meth, **assumptions).total / 1e9)
            for name in models for meth in methods]
