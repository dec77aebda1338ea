"""LoRA: a frozen linear layer plus a trainable low-rank update (lesson 06).

    h = base(x) + lora_B(lora_A(dropout(x))) * scaling        scaling = alpha / r
      = x @ W.T + b + (x @ A.T @ B.T) * alpha / r              A: (r, in), B: (out, r)

The base weight W (out, in) never changes; only A and B train: r * (in + out) numbers instead
of in * out. B starts at zero, so a fresh layer computes exactly base(x) and training starts
from the pretrained model. A starts random (kaiming_uniform_, a=sqrt(5), as nn.Linear does),
so B's gradient, scaling * dh.T @ (x @ A.T), is non-zero from the first step (were both zero,
neither would ever move). scaling = alpha / r: Adam's first step moves every entry of B by
about lr, which changes the output of one example by about lr * r * mean|A x| (r terms add
up); dividing by r cancels that, so a learning rate tuned at one rank carries over to another.

Worked example: a 4096x4096 layer holds 16,777,216 weights; LoRA at r=8 trains
8 * (4096 + 4096) = 65,536 of them (0.39%), with scaling 16 / 8 = 2.

Merging: W' = W + scaling * B @ A is one nn.Linear with the same outputs and no extra cost.
The base may be an nn.Linear or lesson 07's 4-bit Linear4bit; this module needs only the
base's in_features / out_features and, to merge a 4-bit base, its dequantize() and
weight_dtype. Adapter names follow PEFT's (lora_A.weight, lora_B.weight); adapters are
float32 by default, as PEFT keeps them. Converting whole models is qlora.py's business.
"""
import math

import torch
from torch import nn


def check_input(x, in_features: int, where: str) -> None:
    """A floating-point tensor whose last dimension is in_features, or an error saying so.

    >>> check_input(torch.zeros(2, 3), 4, "Demo")
    Traceback (most recent call last):
    ValueError: Demo: expected input with last dimension 4 (in_features), got shape (2, 3)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{where}: expected a floating-point input tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: expected input with last dimension {in_features} "
                         f"(in_features), got shape {tuple(x.shape)}")


@torch.no_grad()
def to_linear(base: nn.Module, delta: torch.Tensor = None) -> nn.Linear:
    """A frozen nn.Linear holding base's weight W (dequantized when 4-bit) + delta, summed in
    float32 and stored in the dtype W had; the bias is copied.

    >>> base = nn.Linear(2, 2, bias=False)
    >>> _ = base.weight.data.copy_(torch.eye(2))                  # W = I
    >>> to_linear(base, delta=torch.ones(2, 2)).weight.tolist()    # I + ones
    [[2.0, 1.0], [1.0, 2.0]]
    """
    if isinstance(base, nn.Linear):
        weight, dtype = base.weight.float(), base.weight.dtype                 # (out, in)
    else:
        weight, dtype = base.dequantize(torch.float32), base.weight_dtype
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=weight.device, dtype=dtype)
    linear.weight.copy_(weight if delta is None else weight + delta)
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


class LoRALinear(nn.Module):
    """A frozen `base` (nn.Linear or Linear4bit) plus trainable adapters lora_A, lora_B.

    >>> _ = torch.manual_seed(0)
    >>> layer = LoRALinear(nn.Linear(4, 3), r=2, alpha=4)
    >>> layer.scaling, [n for n, p in layer.named_parameters() if p.requires_grad]
    (2.0, ['lora_A.weight', 'lora_B.weight'])
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), layer.base(x))       # B = 0: a fresh layer is its base
    True
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not (isinstance(base, nn.Linear) or hasattr(base, "dequantize")):
            raise TypeError(f"LoRALinear: base must be an nn.Linear or a Linear4bit, "
                            f"got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: r must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 \
                or not math.isfinite(alpha):            # inf: inf * 0 = NaN in every output
            raise ValueError(f"LoRALinear: alpha must be a finite number > 0, got {alpha!r}")
        if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                or not 0 <= dropout < 1):
            raise ValueError(f"LoRALinear: dropout must be a probability in [0, 1), "
                             f"got {dropout!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"LoRALinear: dtype must be a floating-point dtype, got {dtype}")
        self.base = base.requires_grad_(False)                      # frozen: W and its bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # A: (r, in), random
        nn.init.zeros_(self.lora_B.weight)                             # B: (out, r), zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, "LoRALinear")
        result = self.base(x)                                           # (..., out)
        x = self.dropout(x.to(self.lora_A.weight.dtype))                # (..., in), adapter dtype
        update = self.lora_B(self.lora_A(x)) * self.scaling             # (..., r) -> (..., out)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling * B @ A (the 4-bit base dequantized first)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()   # (out, r) @ (r, in)
        return to_linear(self.base, self.scaling * delta)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
