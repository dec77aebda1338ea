"""minqlora: QLoRA rebuilt from scratch, one idea per module, in the course's order.

    import minqlora as mq
    packed, state = mq.quantize_4bit(weight)          # NF4 + double quantization
    weight_hat = mq.dequantize_4bit(packed, state)

Importing does no work: no compiling, no GPU probing. The only computation at import is the
NF4 table (a few scipy quantiles) and the 256-value dynamic map.
"""
from .absmax import absmax_dequantize, absmax_quantize
from .blockwise import dequantize_blockwise, quantize_blockwise
from .nf4 import FP4, INT4, NF4, nf4_code, pack_4bit, unpack_4bit
from .double_quant import (DYNAMIC, QuantState, double_dequantize, double_quantize, dynamic_code,
                           quantize_4bit)
from .cuda import dequantize_4bit

__version__ = "0.1.0"

# Names from later lessons, imported on first use so a module still being built cannot break
# `import minqlora` for the lessons before it.
_LATER = {
    "LoRALinear": "lora",
    "Linear4bit": "linear4bit",
    "prepare_qlora": "qlora", "trainable_summary": "qlora", "merge_qlora": "qlora",
    "Pager": "paged_adam", "PagedAdamW": "paged_adam",
    "toy": None, "memory": None,
}


def __getattr__(name):
    import importlib
    if name not in _LATER:
        raise AttributeError(f"module 'minqlora' has no attribute {name!r}")
    module = importlib.import_module(f".{_LATER[name] or name}", __name__)
    return module if _LATER[name] is None else getattr(module, name)
