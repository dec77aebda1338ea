"""The experiment: fine-tune the toy base five ways and compare (lesson 09).

    method      base weights (frozen unless full)      trains                 optimizer
    full        float32, all trainable                 every parameter        torch AdamW
    lora16      bf16 copy of each linear               LoRA on all linears    torch AdamW
    qlora       NF4 + double quantization (4.127 b)    LoRA on all linears    PagedAdamW
    qlora-fp4   FP4 + double quantization              LoRA on all linears    PagedAdamW
    qlora-int4  INT4 + double quantization             LoRA on all linears    PagedAdamW

Everything else is shared: the data (toy.make_data("sub")), the seed, the batches, the
schedule (torch's OneCycleLR with its defaults, which also cycles AdamW's beta1 between 0.85
and 0.95). lora16 and the qlora variants differ only in how the frozen linear weights are
stored (bf16 vs 4 bits); both compute in the same compute_dtype and keep float32 adapters
(PEFT's default) and the embedding, norms and lm_head frozen in float32 (QLoRA also leaves
lm_head unquantized). compute_dtype is bf16 on a GPU, as in the paper, and float32 on a CPU,
which without bf16 instructions runs a bf16 matmul several times slower; the stored weights,
what the methods differ in, are the same either way.

Worked example: result = finetune(pretrain(), "qlora") gives result.heldout_loss,
result.accuracy and result.bytes = {"weights": ..., "adapters": ..., "optimizer": ...},
each counted from the tensors the run actually held.

The model and the data are toy.py's; the layers are lora.py's, linear4bit.py's, qlora.py's;
the optimizer is paged_adam.py's. What the paper's claim means at 65B is memory.py's job.
"""
import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import LoRALinear
from .paged_adam import PagedAdamW
from .qlora import prepare_qlora, replace_module
from .toy import make_data
from .training import evaluate, train

METHODS = ("full", "lora16", "qlora", "qlora-fp4", "qlora-int4")
QUANT_TYPE_OF = {"qlora": "nf4", "qlora-fp4": "fp4", "qlora-int4": "int4"}   # method -> quant_type


class Bf16Linear(nn.Linear):
    """lora16's base: a frozen linear stored in bf16, computed in compute_dtype, returning x's
    dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=torch.bfloat16)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (None if t is None else t.to(self.compute_dtype) for t in (self.weight, self.bias))
        return nn.functional.linear(x.to(self.compute_dtype), w, b).to(x.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.bfloat16) -> "Bf16Linear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  compute_dtype, linear.weight.device)
        new.load_state_dict(linear.state_dict())                # rounds float32 -> bf16
        return new.requires_grad_(False)


def default_compute_dtype(device) -> torch.dtype:
    """bf16 on a GPU (the paper's setting), float32 on a CPU (see the module docstring)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class FinetuneResult:
    method: str
    heldout_loss: float
    accuracy: float
    bytes: dict                                     # weights (with constants), adapters, optimizer
    trainable: int
    losses: list = field(repr=False)                # training loss per step
    heldout_curve: list = field(repr=False)         # (step, held-out loss), ~10 points
    weight_error: float = 0.0                       # ||W_stored - W|| / ||W|| over the linears
    pager_stats: dict = field(default=None, repr=False)
    seconds: float = field(default=0.0, repr=False)


def linear_names(model: nn.Module, exclude=("lm_head",)) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in exclude]


def convert(base: nn.Module, method: str, r: int = 8, alpha: float = 16, seed: int = 0,
            compute_dtype: torch.dtype = torch.float32):
    """A deep copy of base made ready for `method`: all trainable (full), or frozen with LoRA
    adapters over bf16 (lora16) or 4-bit (qlora*) copies of every linear but lm_head, computing
    in compute_dtype. The adapters' random init is drawn after torch.manual_seed(seed); the
    global RNG is left alone."""
    if method not in METHODS:
        raise ValueError(f"finetune: method must be one of {METHODS}, got {method!r}")
    model = copy.deepcopy(base).float()
    if method == "full":
        return model.requires_grad_(True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if method in QUANT_TYPE_OF:
            return prepare_qlora(model, r, alpha, dropout=0.0, quant_type=QUANT_TYPE_OF[method],
                                 compute_dtype=compute_dtype)
        model.requires_grad_(False)
        for name in linear_names(model):
            frozen = Bf16Linear.from_linear(model.get_submodule(name), compute_dtype)
            replace_module(model, name, LoRALinear(frozen, r, alpha))
    return model


def stored_bytes(model: nn.Module) -> dict:
    """Bytes of the frozen weights (4-bit bytes and constants included) and of trainable ones."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {"weights": sum(t.nbytes for t in tensors if not t.requires_grad),
            "trainable": sum(t.nbytes for t in tensors if t.requires_grad)}


@torch.no_grad()
def weight_error(base: nn.Module, model: nn.Module) -> float:
    """Relative error of the stored linear weights against base's, over all linears but lm_head."""
    err = ref = 0.0
    for name in linear_names(base):
        w, layer = base.get_submodule(name).weight.float(), model.get_submodule(name)
        stored = layer.base if isinstance(layer, LoRALinear) else layer
        w_hat = (stored.dequantize(torch.float32) if hasattr(stored, "dequantize")
                 else stored.weight.float()).to(w.device)                      # (out, in)
        err, ref = err + (w_hat - w).pow(2).sum().item(), ref + w.pow(2).sum().item()
    return (err / ref) ** 0.5


def finetune(base: nn.Module, method: str, steps: int = 600, batch_size: int = 64,
             lr: float = 3e-3, r: int = 16, alpha: float = 64, seed: int = 0, task: str = "sub",
             pager=None, progress: bool = False, device="cpu", compute_dtype=None,
             eval_every: int = None) -> FinetuneResult:
    """Fine-tune a copy of `base` on `task` by `method`; base itself is not changed.

    The defaults (600 steps of 64 problems, one-cycle lr peaking at 3e-3 for every method,
    LoRA r = 16, alpha = 4 r) are lesson 09's setting: over the bases of seeds 0-4 x CPU kernel
    paths every method reaches >= 0.90 held-out exact match (tests/test_finetune.py gives the
    grid). The former setting (200 x 256, lr 1e-2, r = 8) left some LoRA runs on a plateau at
    loss ~ln(10)/3, the ones digit at chance; neither training the embedding of '-' nor full
    rank (r = 64) got them off it, a lower peak lr with more steps did, and full fine-tuning of
    the linears alone, embedding and lm_head frozen, never stalled (lesson 09, section 7).
    pager: a Pager for PagedAdamW (qlora methods only).
    compute_dtype: default_compute_dtype(device). eval_every: steps between the points of
    result.heldout_curve (default steps // 10). progress=True shows a tqdm bar on stderr.

    >>> from minqlora.toy import ToyLM
    >>> r = finetune(ToyLM(), "qlora", steps=20, batch_size=16)   # untrained base: the bytes
    >>> r.trainable, r.bytes                               # 14 linears at r=16, float32 adapters
    (34816, {'weights': 51696, 'adapters': 139264, 'optimizer': 278528})
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 20:
        raise ValueError(f"finetune: steps must be an integer >= 20 (the schedule warms up for "
                         f"10% of them), got {steps!r}")
    start = time.perf_counter()
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(device)
    model = convert(base, method, r, alpha, seed, compute_dtype).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if method in QUANT_TYPE_OF:
        opt = PagedAdamW(params, lr=lr, weight_decay=0.0, pager=pager)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    data = {k: v.to(device) for k, v in make_data(task, seed).items()}
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    losses, curve = train(model, data["train"], params, opt, steps, batch_size, seed, method,
                          progress, sched, data["heldout"], eval_every or max(steps // 10, 1))
    loss, acc = evaluate(model, data["heldout"])
    state = opt.state_dict()["state"].values()
    held = stored_bytes(model)
    return FinetuneResult(
        method, loss, acc, trainable=sum(p.numel() for p in params), losses=losses,
        heldout_curve=curve, weight_error=weight_error(base, model) if method != "full" else 0.0,
        bytes={"weights": held["weights"] if method != "full" else held["trainable"],
               "adapters": held["trainable"] if method != "full" else 0,
               "optimizer": sum(s[k].nbytes for s in state
                                for k in ("exp_avg", "exp_avg_sq"))},
        pager_stats=opt.pager.stats() if method in QUANT_TYPE_OF else None,
        seconds=time.perf_counter() - start)
