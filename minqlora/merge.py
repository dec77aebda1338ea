"""Merging the adapters back into the weights, and what each way of merging costs (lessons 07, 10).

    merge_qlora:   every LoRALinear -> its merge  W' = dequantize(W) + scaling * B @ A
                   as an nn.Linear (requantize=False), or quantize_4bit(W') again in the base's
                   4-bit format (requantize=True); bare Linear4bit layers -> dequantized nn.Linear
    merge_errors:  |y' - y| / |y| of each merge against the unmerged model's outputs y, beside
                   dropping the adapters (the size of what they add)

Worked example: a 4-bit 256 x 256 layer with trained-looking adapters (B ~ N(0, 0.02), r = 8),
computing in float32: merging into the dequantized float32 weight changes the output by float
rounding only (< 1e-5 relative; bf16 compute: see merge_qlora); quantizing the merge to NF4
again changes it by about as much as the adapters themselves add, which is why PEFT warns when
merging into a 4-bit model (the doctest below; lesson 10 measures it on the toy model).

Converting a model is qlora.py's business, the layers lora.py's and linear4bit.py's.
"""
import copy
import warnings

import torch
from torch import nn

from .linear4bit import Linear4bit
from .lora import LoRALinear, to_linear
from .qlora import replace_module


def merge_qlora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replace, in place, every LoRALinear by its merge W + scaling * B @ A and return the model
    (copy.deepcopy it first to keep training). The two real choices:

    requantize=False: an nn.Linear holding the merge in W's own dtype (float32 for a float32
        model), computing in that dtype; bare Linear4bit layers become dequantized nn.Linear
        too, so the model is plain again, 4x its 4-bit size. The same function as the unmerged
        model up to float rounding when the layers computed in W's dtype; with compute_dtype
        bf16 (QLoRA's) the unmerged model rounded each matmul to bf16 and the merge does not:
        on SmolLM2-135M (r = 8, B ~ N(0, 0.02), 64 random tokens) the logits differ by 1.0%
        relative (a fine-tune there: 1.1%, the same top-1 token for 99.2% of positions).
    requantize=True: the merge quantized again into a Linear4bit of the base's format: a
        4-bit model again, but NF4's rounding of W + scaling * B @ A is about as large as the
        update itself, and an update below half a code step rounds back to W: the fine-tune
        can vanish. It warns once per call with the cosine between what the 4-bit weights
        gained and the update (merge_errors measures the outputs).
    """
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, LoRALinear) or (isinstance(m, Linear4bit) and not requantize)]
    done, sums = [], torch.zeros(3, dtype=torch.float64)      # <gain, update>, |gain|^2, |update|^2
    for name, module in layers:
        if any(d == "" or name.startswith(d + ".") for d in done):
            continue                                   # a Linear4bit inside a merged LoRA
        merged = module.merge() if isinstance(module, LoRALinear) else to_linear(module)
        if requantize and isinstance(module.base, Linear4bit):
            base = module.base
            merged, before = Linear4bit.from_linear(
                merged, blocksize=base.blocksize, quant_type=base.quant_type,
                double_quant=base.double_quant, compute_dtype=base.compute_dtype), merged
            w = base.dequantize(torch.float64)
            gain, update = merged.dequantize(torch.float64) - w, before.weight.double() - w
            sums += torch.stack([(gain * update).sum(), gain.square().sum(), update.square().sum()])
        model = replace_module(model, name, merged)
        done.append(name)
    if requantize and sums[2] > 0:
        cosine = (sums[0] / (sums[1] * sums[2]).sqrt().clamp_min(1e-300)).item()
        warnings.warn(f"merge_qlora(requantize=True): rounding W + scaling * B @ A to 4 bits again "
                      f"re-rounds every weight; what the 4-bit weights gained has cosine "
                      f"{cosine:+.2f} with the adapters' update (1: kept, 0: lost). To keep the "
                      "fine-tune, keep the adapters (save_adapter) or merge with requantize=False",
                      UserWarning, stacklevel=2)
    return model


@torch.no_grad()
def merge_errors(model: nn.Module, *inputs) -> dict:
    """Relative output errors |y' - y| / |y| (Frobenius norms; y = the unmerged model(*inputs):
    a tensor, or an output with .logits, as a Transformers model returns) of each merge, beside
    dropping the adapters, the size of what they add. The model is left as it was.

    >>> from minqlora.qlora import prepare_qlora
    >>> _ = torch.manual_seed(0)
    >>> model = prepare_qlora(nn.Sequential(nn.Linear(256, 256)), r=8, compute_dtype=torch.float32)
    >>> _ = model[0].lora_B.weight.data.normal_(0, 0.02)        # as if trained
    >>> errors = merge_errors(model, torch.randn(16, 256))
    >>> errors["dequantized"] < 1e-5 < errors["requantized"], list(errors)
    (True, ['dequantized', 'requantized', 'adapters dropped'])
    """
    training = model.training
    model.eval()
    def run(variant: nn.Module) -> torch.Tensor:
        out = variant(*inputs)
        return getattr(out, "logits", out).float()
    reference = run(model)

    def error(variant: nn.Module) -> float:
        return ((run(variant) - reference).norm() / reference.norm()).item()
    dropped = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in dropped.named_modules() if isinstance(m, LoRALinear)]:
        dropped = replace_module(dropped, name, layer.base)
    with warnings.catch_warnings():                   # measured here: no need to warn
        warnings.filterwarnings("ignore", r"merge_qlora\(requantize=True\)")
        requantized = merge_qlora(copy.deepcopy(model), requantize=True)
    errors = {"dequantized": error(merge_qlora(copy.deepcopy(model))),
              "requantized": error(requantized), "adapters dropped": error(dropped)}
    model.train(training)
    return errors
