"""minqlora: QLoRA rebuilt from scratch, one idea per module, in the course's order.

    import minqlora as mq
    packed, state = mq.quantize_4bit(weight)          # NF4 + double quantization
    weight_hat = mq.dequantize_4bit(packed, state)    # "torch", "cpp", "cuda" or "emulate"
    model = mq.prepare_qlora(model)                   # LoRA adapters over frozen Linear4bit
    mq.save_4bit(model, "model.safetensors")          # the 4-bit base, as Transformers stores it
    mq.save_adapter(model, "adapter/")                # the adapters, as PEFT stores them
    optimizer = mq.PagedAdamW(p for p in model.parameters() if p.requires_grad)

Importing does no work: no compiling, no GPU probing, no CuPy import. The only computation
at import is the NF4 table (a few scipy quantiles) and the 256-value dynamic map.
"""
# lessons 01-04: the storage format
from .absmax import absmax_dequantize, absmax_quantize
from .blockwise import dequantize_blockwise, quantize_blockwise
from .nf4 import FP4, INT4, NF4, nf4_code, nf4_offset, pack_4bit, unpack_4bit
from .double_quant import DYNAMIC, double_dequantize, double_quantize, dynamic_code
from .quant_state import QuantState, decode_4bit, quantize_4bit
# lesson 05: dequantization on a backend (torch, the CUDA kernel through CuPy, or its emulation)
from .backends import dequantize_4bit
# lessons 06-07: LoRA and QLoRA layers
from .lora import LoRALinear
from .linear4bit import Linear4bit
from .qlora import prepare_qlora, replace_module, trainable_summary
from .merge import merge_errors, merge_qlora
# lesson 08: the paged optimizer
from .pager import OutOfBudget, Pager
from .paged_adam import PagedAdamW
# lesson 09: the toy model, the experiment and the memory calculator
from . import memory, toy
# lesson 10: real checkpoints (bitsandbytes / Transformers 4-bit files, PEFT adapter folders)
from .checkpoint import load_4bit, save_4bit
from .adapter import load_adapter, save_adapter
# lesson 11: codebooks from objectives, the hardware 4-bit formats, and one comparison of all
from .codebooks import af4_code, block_cdf, block_pdf, expected_mse, lloyd_max_code
from .mx_state import MXState
from .microscaling import dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4, quantize_nvfp4
from . import compare
# lesson 13: the 4-bit weights sharded across GPUs by PyTorch's FSDP2
from . import distributed

__version__ = "0.1.0"
