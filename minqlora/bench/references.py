"""The references, as the bench, the tests and the lessons use them: bitsandbytes imported
offline and quietly, a probe of whether its CPU decode is right on this machine, and one line
that says where a figure was measured (the CPU, torch's kernel path, bitsandbytes' path).

bitsandbytes 0.50's CPU backend decodes 4-bit weights in its native library. On CPUs where
torch reports AVX512, that code is wrong when a row's length is not a multiple of the blocksize
(blocks then straddle rows): a 64x96 NF4 weight decodes up to 0.04 (AVX-512 Xeon) or 2.0 (AMD
EPYC with AVX512-BF16) away from the definition of bitsandbytes' own bytes, which are right. So
the bench and the tests use bitsandbytes' decode as a reference only where probe_bnb_decode()
finds it equal to the definition (lesson 04's decode_4bit) on this machine.
"""
import logging
import os
import platform

import torch

PROBE_SHAPES = ((64, 96), (64, 128), (50, 90), (33, 64))   # rows that straddle blocks, and not


def cpu_name() -> str:
    """The CPU's model name as the OS reports it ("AMD EPYC", "Intel(R) Xeon(R) ...")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _DropHubKernelWarnings(logging.Filter):
    """Drops the two warnings of an offline ask for a Hub kernel, nothing else."""
    def filter(self, record):
        return not record.getMessage().startswith((
            "Failed to load CPU gemm_4bit_forward",              # bitsandbytes: falls back
            "Skipping publisher trust check for 'kernels-community/"))  # kernels: offline


_QUIET = _DropHubKernelWarnings()           # one instance: addFilter adds it once per logger


def import_bitsandbytes():
    """bitsandbytes, or None where it is absent or cannot load.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 asks the `kernels` package, at import, for a
    matmul kernel from the Hugging Face Hub, and logs a warning to stderr when that fails, then
    uses its own code. minqlora never downloads at run time: the ask is made offline
    (HF_HUB_OFFLINE=1 for the import only), and its two warnings are dropped."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(_QUIET)
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import bitsandbytes
    except Exception:         # absent, or present but broken on this machine
        return None
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    return bitsandbytes


def bnb_definition(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Lesson 04's definition applied to bitsandbytes' own bytes and QuantState."""
    from ..bnb_layout import state_from_dict
    from ..quant_state import decode_4bit
    tensors = {"weight": packed, **{f"weight.{k}": v
                                    for k, v in quant_state.as_dict(packed=True).items()}}
    return decode_4bit(*state_from_dict(tensors))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so -0.0 != 0.0 and NaN == NaN)."""
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(view[a.element_size()]), b.reshape(-1).view(view[b.element_size()]))


def probe_bnb_decode(bnb, decode=None):
    """None where bitsandbytes' dequantize_4bit (or `decode`, a stand-in with its signature)
    equals the definition on probe weights (NF4 and FP4, nested, blocksize 64, float32 and
    bfloat16, PROBE_SHAPES); otherwise one sentence naming the fault."""
    decode = decode or bnb.functional.dequantize_4bit
    for quant_type in ("nf4", "fp4"):
        for dtype in (torch.float32, torch.bfloat16):
            for seed, shape in enumerate(PROBE_SHAPES):
                weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                packed, state = bnb.functional.quantize_4bit(
                    weight.to(dtype), blocksize=64, compress_statistics=True,
                    quant_type=quant_type)
                theirs, definition = decode(packed, state), bnb_definition(packed, state)
                if not same_bits(theirs, definition):
                    gap = (theirs.float() - definition.float()).abs().max().item()
                    return (f"bitsandbytes {bnb.__version__}'s CPU dequantize_4bit is wrong on "
                            f"this machine (torch picks "
                            f"{torch.backends.cpu.get_cpu_capability()}): a {shape[0]}x{shape[1]} "
                            f"{quant_type} {str(dtype)[6:]} weight decodes up to {gap:.3g} away "
                            f"from the definition of its own bytes")
    return None


_FAULT = {}


def reference_decode(bnb, packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' decode of its own bytes where probe_bnb_decode (run once per process) finds
    it right on this machine; the definition of the same bytes where it does not."""
    if "bnb" not in _FAULT:
        _FAULT["bnb"] = probe_bnb_decode(bnb)
    if _FAULT["bnb"] is None:
        return bnb.functional.dequantize_4bit(packed, quant_state)
    return bnb_definition(packed, quant_state)


def describe(bnb=None) -> str:
    """One line: the CPU, torch's kernel path, and bitsandbytes' decode path and whether it is
    right here (bnb: the imported module, or None where it is absent)."""
    line = f"CPU {cpu_name()}, torch picks {torch.backends.cpu.get_cpu_capability()}"
    if bnb is None:
        return line + ", bitsandbytes absent"
    import bitsandbytes.functional as F
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    path = "its AVX-512 code" if avx512 else "its generic native code"
    path += ", AVX512-BF16 matmul" if F.has_avx512bf16() else ""
    fault = probe_bnb_decode(bnb)
    verdict = "right here" if fault is None else "WRONG here on rows that straddle blocks"
    return f"{line}, bitsandbytes {bnb.__version__} decodes with {path} ({verdict})"
