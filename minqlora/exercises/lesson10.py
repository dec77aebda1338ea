"""Checks for lesson 10's exercises (real checkpoints); the library is the answer key.

>>> exercise_1(4096 * 4096 / 3)
Exercise 1: answer_1 should be a whole number, got 5592405.333333333.
False
"""
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..adapter import save_adapter
from ..checkpoint import save_4bit
from ..linear4bit import Linear4bit
from ..qlora import prepare_qlora
from ..toy import ToyLM
from ._core import Stop, call, close, diagnose, exercise, number, whole

N = 4096 * 4096


def _file_bytes(n=N, blocks=64):
    """The five tensors of an n-weight NF4 + DQ layer: indices, qabsmax, absmax2, two tables."""
    return n // 2 + n // blocks + 4 * (n // blocks // 256) + 4 * 16 + 4 * 256


@exercise(1)
def exercise_1(answer):
    """answer = the bytes of a 4096 x 4096 layer's five tensors (an int)."""
    mine = whole(answer, lowest=0)
    if mine == _file_bytes():
        return True
    tables = 4 * 16 + 4 * 256
    wrong = {
        "the packed indices are only part of it: add one uint8 absmax per block of 64, one float32 "
        "absmax2 per 256 blocks, and the two float32 tables (16 and 256 values)": N // 2,
        "nested: the absmaxes are stored as uint8 indices (qabsmax), one byte per block, not "
        "float32": _file_bytes() - N // 64 + 4 * (N // 64),
        "the two tables are in the file too: quant_map (16 float32) and nested_quant_map (256 "
        "float32)": _file_bytes() - tables,
        "one float32 absmax2 per 256 blocks (nested_absmax) is in the file too":
            _file_bytes() - 4 * (N // 64 // 256),
        "two 4-bit indices share one byte: n / 2 bytes of indices, not n": _file_bytes() + N // 2,
    }
    return diagnose(mine, wrong, lambda a, b: a == b) or [
        "one byte per two weights, one uint8 absmax per block of 64, one float32 absmax2 per 256 "
        "blocks, and two float32 tables of 16 and 256 values"]


MISTAKES = {
    "nibbles": "the high nibble (byte >> 4) holds the even-indexed weight, the low nibble "
               "(byte & 0x0F) the odd one",
    "offset": "the offset: absmax = DYNAMIC[qabsmax] * absmax2 + offset (nested_offset in the "
              "JSON)",
    "nested": "a nested layer's absmax is stored as uint8 indices into nested_quant_map: decode "
              "them first, DYNAMIC[qabsmax] * absmax2 + offset",
    "absmax2": "each decoded absmax is scaled by its absmax2: DYNAMIC[qabsmax] * absmax2[block // "
               "256] + offset",
    "block": "weight i lies in block i // 64, counted in weights, not in bytes (a byte holds two "
             "weights)",
}
ERRORS = {  # what the learner's function raised -> what it most likely means
    "KeyError": "a layer stored without double quantization has no nested_absmax or "
                "nested_quant_map: its absmax is float32 and used as it is",
    "IndexError": "an index ran past a tensor's end: block b's absmax is absmax[b], and 256 "
                  "blocks share one absmax2 (nested_blocksize): absmax2[b // 256]",
    "RuntimeError": "the weight count need not be a multiple of 64 (the last block is short) nor "
                    "even (the last byte then holds one weight): decode every nibble, keep the "
                    "first rows x cols",
}


def _decode(tensors, name, mistake=None):
    """The definition (lessons 03-04) on one layer of a bitsandbytes state dict, or a mistake."""
    key = name + ".weight"
    info = json.loads(bytes(next(v for k, v in tensors.items()
                                 if k.startswith(key + ".quant_state.")).tolist()))
    rows, cols = info["shape"]
    n, blocksize = rows * cols, info["blocksize"]
    packed = tensors[key].reshape(-1).long()
    high, low = packed >> 4, packed & 0x0F
    if mistake == "nibbles":
        high, low = low, high
    index = torch.stack([high, low], dim=1).reshape(-1)[:n]
    absmax = tensors[key + ".absmax"]
    if key + ".nested_absmax" in tensors:
        absmax2 = tensors[key + ".nested_absmax"].repeat_interleave(info["nested_blocksize"])
        dynamic = tensors[key + ".nested_quant_map"][absmax.long()]
        offset = 0.0 if mistake == "offset" else info["nested_offset"]
        absmax = (absmax.float() if mistake == "nested" else
                  dynamic + offset if mistake == "absmax2" else
                  dynamic * absmax2[:len(absmax)] + offset)
    block = torch.arange(n) // (2 * blocksize if mistake == "block" else blocksize)
    weight = tensors[key + ".quant_map"][index] * absmax[block]
    return weight.reshape(rows, cols)


def _cases():
    """(what, state dict of one 4-bit layer "layer", the library's own decode of it)."""
    torch.manual_seed(10)
    shapes = [("q_proj, 64 x 64, nested", 64, 64, True),
              ("down_proj, 50 x 90, nested: its last block holds 20 weights", 90, 50, True),
              ("up_proj, 150 x 130, nested: 305 blocks, so two absmax2", 130, 150, True),
              ("o_proj, 33 x 65, not nested (float32 absmax), an odd number of weights", 65, 33,
               False)]
    for what, i, o, nested in shapes:
        layer = Linear4bit.from_linear(nn.Linear(i, o), double_quant=nested)
        tensors = nn.ModuleDict({"layer": layer}).state_dict()
        yield what, tensors, layer.dequantize(torch.float32)


@exercise(2)
def exercise_2(decode_layer):
    """Your decode_layer(tensors, name) -> the (out, in) float weight of the 4-bit layer `name`
    in a bitsandbytes state dict, checked against Linear4bit.dequantize on four layers."""
    for what, tensors, want in _cases():
        try:
            out = call(decode_layer, "decode_layer", dict(tensors), "layer")
        except Stop as stop:
            kind = next((k for k in ERRORS if f"raised {k}" in str(stop)), None)
            raise Stop(str(stop) + (f"\n  hint: on {what}: {ERRORS[kind]}" if kind else "")) \
                from None
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return ["decode_layer returns the weight as a floating-point tensor"]
        if out.shape != want.shape:
            return [f"the weight has the shape the JSON names, {tuple(want.shape)} (out, in), on "
                    f"{what}; got {tuple(out.shape)}"]
        got = out.detach().float()
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-7):
            wrong = {hint: _decode(tensors, "layer", m) for m, hint in MISTAKES.items()}
            return diagnose(got, wrong, lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7)) \
                or [f"decode_layer differs from the library on {what}: weight i is code[index] * "
                    "absmax[i // 64], its index in byte i // 2 (high nibble when i is even)"]
    return True


def _toy_fraction():
    """Adapter folder bytes / 4-bit base file bytes, for the toy at r = 8 (float32 adapters)."""
    model = prepare_qlora(ToyLM(), r=8, alpha=16, dropout=0.1, compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        save_4bit(model, Path(tmp) / "base.safetensors")
        save_adapter(model, Path(tmp) / "adapter")
        adapter = sum(f.stat().st_size for f in (Path(tmp) / "adapter").iterdir())
        return adapter / (Path(tmp) / "base.safetensors").stat().st_size


@exercise(3, keys=["toy", "at_scale"])
def exercise_3(answer):
    """answer = dict(toy=adapter / base file sizes, at_scale=the same for 4096 x 4096 at r=64)."""
    toy, at_scale = number(answer, "toy"), number(answer, "at_scale")
    want = _toy_fraction()
    if close(toy, 1 / want, rel=0.01):
        yield "toy: adapter / base, not base / adapter"
    elif not close(toy, want, rel=0.01):
        yield ("toy: divide the two sizes in bytes (Path.stat().st_size), adapter / base; "
               "the adapter is a folder: count both of its files")
    adapter_bytes = 4 * 64 * (4096 + 4096)                # float32 A (64 x 4096) and B (4096 x 64)
    if close(at_scale, adapter_bytes / 2 / _file_bytes(), rel=0.01):
        yield "at_scale: A is r x 4096 and B is 4096 x r, both float32 (4 bytes)"
    elif close(at_scale, adapter_bytes / (2 * N), rel=0.01):
        yield ("at_scale: divide by the 4-bit layer's bytes (exercise 1), not the 16-bit "
               "one's")
    elif not close(at_scale, adapter_bytes / _file_bytes(), rel=0.01):
        yield "at_scale: (bytes of float32 A and B at r = 64) / (exercise 1's bytes)"
