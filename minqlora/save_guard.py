"""save_pretrained on a model that holds minqlora's layers: refused, naming what works
(lesson 10).

Transformers' save_pretrained writes model.state_dict() as it is: q_proj.base.weight and the
LoRA keys, and no quantization_config. from_pretrained then finds none of the linears it
expects and initialises them at random, saying so only in its load report. So prepare_qlora
(and load_4bit, where it builds Linear4bit layers into a Transformers model) replaces each
save_pretrained in the model by one that raises, naming the calls that write what Transformers
and PEFT open:

    mq.save_4bit(model, folder)             model.safetensors + config.json (4-bit, bitsandbytes)
    mq.save_adapter(model, adapter_folder)  adapter_model.safetensors + adapter_config.json

Once the model is plain again (merge_qlora(model) dequantizes every layer), save_pretrained
saves as usual. Worked example: prepare_qlora(LlamaForCausalLM(config)).save_pretrained("out")
raises TypeError and writes nothing.
"""
import functools

from torch import nn

from .linear4bit import Linear4bit
from .lora import LoRALinear


def guard_save_pretrained(model: nn.Module) -> None:
    """Make every save_pretrained in `model` (the model's own, and each Transformers model
    inside it) raise while the model holds minqlora layers.

    >>> class Saved(nn.Sequential):
    ...     def save_pretrained(self, folder):
    ...         return "saved"
    >>> model = Saved(Linear4bit(64, 2))
    >>> guard_save_pretrained(model)
    >>> model.save_pretrained("out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: save_pretrained would write minqlora's layers as keys ... mq.save_4bit(model, ...
    >>> model[0] = nn.Linear(64, 2); model.save_pretrained("out")
    'saved'
    """
    for module in model.modules():
        if callable(getattr(type(module), "save_pretrained", None)):
            module.save_pretrained = functools.partial(_save_pretrained, module)


def _save_pretrained(model: nn.Module, *args, **kwargs):
    """The class's own save_pretrained, unless the model holds minqlora layers."""
    if any(isinstance(m, (Linear4bit, LoRALinear)) for m in model.modules()):
        raise TypeError("save_pretrained would write minqlora's layers as keys Transformers "
                        "loads as random weights: use mq.save_4bit(model, folder) (a folder "
                        "from_pretrained opens) and mq.save_adapter(model, adapter_folder)")
    return type(model).save_pretrained(model, *args, **kwargs)
