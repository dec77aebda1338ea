"""A toy language model and code-made data, so QLoRA can be tried end to end on a CPU (lesson 09).

The model is a miniature LLaMA: token embedding, `num_hidden_layers` blocks of RMSNorm ->
causal self-attention (q, k, v, o as nn.Linear, rotary positions) -> RMSNorm -> gated MLP
(gate, up, down as nn.Linear, SiLU), a final RMSNorm and an untied lm_head; no biases. Its
config uses Hugging Face's LLaMA key names, so memory.py counts its bytes with the same
formula it uses for LLaMA-65B.

    h = x + o(attention(rope(q(norm(x))), rope(k(norm(x))), v(norm(x))))
    y = h + down(silu(gate(norm(h))) * up(norm(h)))

The data is character-level arithmetic on two-digit numbers, answers zero-padded to 3 digits:

    pretraining ("add"):  "07+45=052"      fine-tuning ("sub", a >= b):  "45-07=038"

The loss and the accuracy count only the 3 answer digits (predicted from the prompt). Accuracy
is exact match of all three under argmax, which is what greedy decoding would produce.
Worked example: "1+2=" is the token ids [1, 10, 2, 13]; make_data("add") holds all 10,000
problems, 1,000 of them held out.

Two settings differ from LLaMA's, for a sequence of 9 tokens instead of thousands. rope_theta
is 10 (LLaMA: 10,000): with 10,000 only the fastest one or two rotation frequencies of a head
turn noticeably over 8 positions, yet the last answer digit needs "6 tokens back" (a's ones
digit) told apart from "3 back" (b's); with 10 every frequency turns. And 8 heads of 8
features: more heads can look at different offsets at once. With both, pretraining learns the
ones digit well within its 1,000 steps (tests/test_toy.py gives the accuracies reached over
seeds and CPU kernel paths); with LLaMA's settings when it does varies with the seed and with
the CPU's rounding.

This module builds the base model. The training loop is training.py's, the fine-tuning
experiment finetune.py's, the quantization double_quant.py's, the adapters lora.py's and
qlora.py's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .training import train

VOCAB = "0123456789+-*="
TASKS = {"add": "+", "sub": "-"}
CONFIG = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=16, rope_theta=10.0)


def encode(text: str) -> list[int]:
    """Characters -> token ids.

    >>> encode("1+2=")
    [1, 10, 2, 13]
    """
    bad = set(text) - set(VOCAB)
    if bad:
        raise ValueError(f"encode: characters {sorted(bad)} are not in the vocabulary {VOCAB!r}")
    return [VOCAB.index(c) for c in text]


def make_data(task: str = "add", seed: int = 0, n_heldout: int = 1000) -> dict:
    """All problems of a task as token ids (n, 9), shuffled by `seed`, split train / heldout.

    >>> d = make_data("add")
    >>> d["train"].shape, d["heldout"].shape, "".join(VOCAB[i] for i in d["train"][0])
    (torch.Size([9000, 9]), torch.Size([1000, 9]), '54+95=149')
    """
    if task not in TASKS:
        raise ValueError(f"make_data: task must be one of {list(TASKS)}, got {task!r}")
    a, b = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)                            # (10000,) each
    if task == "sub":
        a, b = a[a >= b], b[a >= b]                                # 5050 problems, answer >= 0
    c = a + b if task == "add" else a - b
    digits = lambda v, n: torch.stack([v // 10 ** i % 10 for i in range(n - 1, -1, -1)], 1)  # noqa
    op = torch.full_like(a, VOCAB.index(TASKS[task]))[:, None]
    eq = torch.full_like(a, VOCAB.index("="))[:, None]
    seqs = torch.cat([digits(a, 2), op, digits(b, 2), eq, digits(c, 3)], 1)   # (n, 9) int64
    if not (isinstance(n_heldout, int) and 0 <= n_heldout < len(seqs)):
        raise ValueError(f"make_data: n_heldout must be an int from 0 to {len(seqs) - 1} (the "
                         f"{task!r} task has {len(seqs)} problems), got {n_heldout!r}")
    seqs = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))]
    return {"train": seqs[n_heldout:], "heldout": seqs[:n_heldout]}


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary positions: each pair of features (x1, x2) of x (B, H, T, D), read as the complex
    number x1 + i*x2, is multiplied by e^(i*t*freq) at position t, i.e. rotated by the angle
    t * freq, freq = theta ** (-2j / D) for pair j (as in Meta's LLaMA code)."""
    T, D = x.shape[-2:]
    freqs = theta ** (-torch.arange(0, D, 2, device=x.device) / D)         # (D/2,)
    angles = torch.arange(T, device=x.device)[:, None] * freqs             # (T, D/2)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], D // 2, 2))  # (B, H, T, D/2)
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)              # (B, H, T, D)


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(D), each position seeing itself and earlier ones only) v, written
    out: for 8 positions the plain matrices are quicker than a fused kernel."""
    T, D = q.shape[-2:]
    scores = q @ k.transpose(-2, -1) * D ** -0.5                           # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


class Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, theta: float):
        super().__init__()
        self.heads, self.theta = heads, theta
        self.input_norm, self.post_norm = nn.RMSNorm(hidden, 1e-6), nn.RMSNorm(hidden, 1e-6)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):                                          # x (B, T, hidden)
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        n = self.input_norm(x)
        q, k, v = (split(proj(n)) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B,H,T,D)
        q, k = rope(q, self.theta), rope(k, self.theta)
        att = causal_attention(q, k, v)                               # (B, H, T, D)
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, T, C))
        n = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class ToyLM(nn.Module):
    """A miniature LLaMA over CONFIG (Hugging Face keys): ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: dict = CONFIG):
        super().__init__()
        self.config = dict(config)
        h, L = config["hidden_size"], config["num_hidden_layers"]
        self.embed_tokens = nn.Embedding(config["vocab_size"], h)
        m, heads = config["intermediate_size"], config["num_attention_heads"]
        theta = config.get("rope_theta", 10000.0)
        self.layers = nn.ModuleList(Block(h, m, heads, theta) for _ in range(L))
        self.norm = nn.RMSNorm(h, eps=1e-6)
        self.lm_head = nn.Linear(h, config["vocab_size"], bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)                                 # (B, T, hidden)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))                          # (B, T, vocab)


def pretrain(seed: int = 0, steps: int = 1000, batch_size: int = 64, lr: float = 5e-3,
             config: dict = CONFIG, progress: bool = False, device="cpu") -> ToyLM:
    """The base model: ToyLM trained on "add" for `steps` AdamW steps, deterministic for `seed`
    on a given machine. Schedule: OneCycleLR with torch's defaults (it also cycles beta1 between
    0.85 and 0.95). AdamW is torch's fused one (one kernel for all parameters).

    The global RNG is left as it was. `model.pretrain_losses` keeps the loss curve.
    device="cuda" trains on a GPU; the init is always drawn on the CPU.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ToyLM(config).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    data = {k: v.to(device) for k, v in make_data("add", seed).items()}
    model.pretrain_losses, _ = train(model, data["train"], params, opt, steps, batch_size, seed,
                                  "pretrain", progress, sched)
    return model.eval()

