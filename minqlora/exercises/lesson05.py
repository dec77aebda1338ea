"""Checks for lesson 05's exercises (the dequantization kernel); the library is the answer key.

Exercise 4 is the per-block lookup decode that kernels/dequant_cpu.cpp runs: a block's weights
share one absmax, so they take only 16 values, out16[k] = (code[k] * absmax[b]).to(dtype); each
weight is then out16[its nibble]. The check compares the learner's decode bit for bit with the
definition, decode_4bit, on inputs that each test one thing.

>>> exercise_3(dict(bytes=1, microseconds="fast"))
Exercise 3: answer_3['microseconds'] should be a number, got 'fast'.
False
"""
import torch

from ..blockwise import ceil_div
from ..double_quant import constants_nbytes
from ..launch import grid, kernel_source
from ..nf4 import FP4, NF4
from ..quant_state import QuantState, decode_4bit
from ._core import Stop, call, choice, close, diagnose, exercise, number, whole


@exercise(1, keys=["blocks", "outputs_change"])
def exercise_1(answer):
    """answer = dict(blocks=grid for 4096 x 4096 at 32 bytes per thread, outputs_change=bool)."""
    edited = kernel_source().replace("#define BYTES_PER_THREAD 16", "#define BYTES_PER_THREAD 32")
    if whole(answer, "blocks", lowest=0) != grid(4096 * 4096, edited)[0]:
        yield ("blocks: how many weights does one thread own now, and one block of 256 "
               "threads? Divide 4096 * 4096 by that, rounding up")
    if choice(answer, "outputs_change", [True, False]) is not False:
        yield ("outputs_change: does any thread compute a weight differently, or only more "
               "of them? Run the edited source through emulate.launch_emulation and compare")


def _f16_bits(values: torch.Tensor, mistake: str = None) -> torch.Tensor:
    """torch's float16 rounding of `values` (to nearest, ties to even) as int bits; or the
    mistake "truncate" (towards zero) or "ties away" (from zero)."""
    half = values.to(torch.float16)
    other = torch.nextafter(half, (values - half.float()).sign().to(torch.float16) * torch.inf)
    if mistake == "truncate":                         # one float16 step back where it went up
        half = torch.where(half.float().abs() > values.abs(), torch.nextafter(
            half, torch.zeros_like(half)), half)
    elif mistake == "ties away":                      # at a tie, the neighbour farther from 0
        tie = (values - half.float()).abs() == (other.float() - values).abs()
        half = torch.where(tie & (other.abs() > half.abs()), other, half)
    return half.view(torch.int16).int() & 0xFFFF


def _f16_cases():
    """(what, hint, float32 inputs): random normal numbers, then exact ties."""
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2)) * 100
    one = torch.tensor(1.0).view(torch.int32)                # 1.0 and four neighbours, two of
    ties = (one + torch.tensor([0x1000, 0x3000, 0xFFF, 0x1001], dtype=torch.int32))  # them ties
    return [("random numbers", "float16 keeps 10 of float32's 23 mantissa bits and rebiases the "
             "exponent from 127 to 15", x[x.abs() >= 2 ** -14]),
            ("numbers exactly halfway between two float16s", "a tie goes to the neighbour whose "
             "last kept bit is 0 (to even), not away from zero", ties.view(torch.float32))]


@exercise(2)
def exercise_2(to_f16_bits):
    """Your to_f16_bits(x): float32 tensor of normal numbers -> its float16 bits as ints."""
    for what, hint, values in _f16_cases():
        got = call(to_f16_bits, "to_f16_bits", values.clone())
        if not isinstance(got, torch.Tensor) or got.shape != values.shape:
            return [f"return a tensor of {values.numel()} ints for {values.numel()} inputs"]
        if got.is_floating_point():
            return ["return the float16's bits as integers, not float16 values: the sign, the 5 "
                    "exponent bits and the 10 mantissa bits as one number from 0 to 0xFFFF"]
        wrong = {f"{what}: the 13 dropped bits are cut off; round to the nearest float16 "
                 "instead (add just under half a step before the shift)": "truncate",
                 f"{what}: a tie goes to the neighbour whose last kept bit is 0 (to even), not "
                 "away from zero": "ties away"}
        if not torch.equal(got.int() & 0xFFFF, _f16_bits(values)):
            return diagnose(got.int() & 0xFFFF, wrong, lambda a, b: torch.equal(
                a, _f16_bits(values, b))) or [f"wrong bits for {what}: {hint}"]
    return True


@exercise(3, keys=["bytes", "microseconds"])
def exercise_3(answer):
    """answer = dict(bytes=moved by a nested 8192 x 8192 -> bf16 dequantization, microseconds)."""
    n = 8192 * 8192
    moved = (n + 1) // 2 + constants_nbytes(n, 64, double_quant=True) + 2 * n
    microseconds = number(answer, "microseconds")
    if whole(answer, "bytes", lowest=0) != moved:
        yield ("bytes: packed (half a byte per weight) + one qabsmax byte per 64 weights + "
               "4 bytes of absmax2 per 256 blocks + a 4-byte offset + 2 bytes written per "
               "weight")
    if not close(microseconds, moved / (0.7 * 4.8e12) * 1e6, rel=1e-2):
        yield "microseconds: bytes / (0.7 * 4.8e12 bytes per second), times 1e6"


def _decode_cases():
    """(what, packed, absmax, code, blocksize, n, dtype): the simplest first, each testing one
    more thing."""
    gen = torch.Generator().manual_seed(5)

    def case(what, n, blocksize, dtype, code=NF4, packed=None):
        if packed is None:
            packed = torch.randint(0, 256, (ceil_div(n, 2),), generator=gen, dtype=torch.uint8)
        absmax = torch.rand(ceil_div(n, blocksize), generator=gen) * 2 + 0.01   # (blocks,)
        return what, packed, absmax, code, blocksize, n, dtype

    return [case("one block of 64 weights into float32", 64, 64, torch.float32),
            case("every byte 0x00..0xFF once (0x1F and 0xF1 alike), 8 blocks of 64", 512, 64,
                 torch.float32, packed=torch.arange(256).to(torch.uint8)),
            case("3 blocks of 64 (an odd number of blocks) into bfloat16", 192, 64,
                 torch.bfloat16),
            case("blocksize 32, 4 blocks, into float16", 128, 32, torch.float16),
            case("a partial last block: 200 weights at blocksize 64 (3 blocks and 8 weights), "
                 "into bfloat16", 200, 64, torch.bfloat16),
            case("an odd n: 131 weights at blocksize 128 (the last byte's low nibble is "
                 "padding)", 131, 128, torch.float32),
            case("FP4's table (in bit order, not sorted) in place of NF4's", 256, 64,
                 torch.bfloat16, code=FP4)]


def _mistakes(packed, absmax, code, blocksize, n, dtype) -> dict:
    """{hint: what that mistake decodes} for one case."""
    byte = packed.long()
    high_first = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[:n]   # (n,) right
    low_first = torch.stack([byte & 15, byte >> 4], dim=1).reshape(-1)[:n]
    i = torch.arange(n)
    own = absmax[i // blocksize]                                  # (n,) each weight's absmax
    return {
        "nibble order: element 0 (the even weight) is the HIGH nibble of its byte (byte >> 4), "
        "element 1 the low one (byte & 15)": (code[low_first] * own).to(dtype),
        "block index: weight i belongs to block i // blocksize, counted in weights, not in "
        "bytes": (code[high_first] * absmax[i // 2 // blocksize]).to(dtype),
        "block index: repeat each block's absmax blocksize times in a row (repeat_interleave), "
        "do not tile the list of absmaxes (repeat)":
            (code[high_first] * absmax[i % absmax.numel()]).to(dtype),
        "absmax: each code value is multiplied by the absmax of its block":
            code[high_first].to(dtype),
        "rounding: multiply code and absmax in float32 and round the product once to dtype; "
        "rounding both first rounds twice": code[high_first].to(dtype) * own.to(dtype),
    }


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])


@exercise(4)
def exercise_4(decode_by_lookup):
    """Your decode_by_lookup(packed, absmax, code, blocksize, n, dtype) -> the n weights, checked
    bit for bit against the definition, decode_4bit."""
    for what, packed, absmax, code, blocksize, n, dtype in _decode_cases():
        state = QuantState(absmax=absmax, code=code, blocksize=blocksize, shape=torch.Size([n]),
                           dtype=dtype, quant_type="custom")
        want = decode_4bit(packed, state, dtype)                           # (n,) the definition
        got = call(decode_by_lookup, "decode_by_lookup", packed.clone(), absmax.clone(),
                   code.clone(), blocksize, n, dtype, on=what)
        if not isinstance(got, torch.Tensor):
            raise Stop(f"not yet.\n  hint: return a tensor of the {n} weights, got "
                       f"{type(got).__name__}")
        if got.numel() != n:
            pad = " (an odd n leaves a padding nibble in the last byte: drop it)" if (
                got.numel() == n + 1) else ""
            return [f"{what}: expected {n} outputs, got {got.numel()}{pad}"]
        if got.dtype != dtype:
            return [f"{what}: return the dtype asked for, {dtype}, got {got.dtype}"]
        if not torch.equal(_as_bits(got), _as_bits(want)):
            wrong = _mistakes(packed, absmax, code, blocksize, n, dtype)
            hints = diagnose(got, wrong, lambda a, b: torch.equal(_as_bits(a), _as_bits(b)))
            return hints or [f"wrong bits on {what}: per block, its 16 outputs (code times the "
                             "block's absmax, in float32, rounded once to dtype), then each "
                             "weight looks up its nibble"]
    return True
