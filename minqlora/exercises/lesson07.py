"""Checks for lesson 07's exercises (the QLoRA layer); the library is the answer key.

>>> exercise_3(dict(changed=13, keeps_float32="yes"))
Exercise 3: answer_3['keeps_float32'] should be True or False, got 'yes'.
False
"""
import torch
from torch import nn

from ..backends import dequantize_4bit
from ..linear4bit import Linear4bit
from ..nf4 import NF4
from ..qlora import trainable_summary
from ..quant_state import quantize_4bit
from ._core import Stop, choice, exercise, number, whole


def _section1_layers():
    """Section 1's `linear` (2048 x 2048, N(0, 0.02), no bias) and `layer4` built from it."""
    torch.manual_seed(1)                         # as section 1 (its own seed, then put back)
    linear = nn.Linear(2048, 2048, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    return linear, Linear4bit.from_linear(linear)


@exercise(1, keys=["fp4_128", "nf4_128_dq"])
def exercise_1(answer):
    """answer = dict(fp4_128=..., nf4_128_dq=...): bits per weight of the two layers."""
    for key, quant_type, dq in [("fp4_128", "fp4", False), ("nf4_128_dq", "nf4", True)]:
        layer = Linear4bit(1024, 1024, bias=False, quant_type=quant_type, blocksize=128,
                           double_quant=dq)
        measured = trainable_summary(layer).bits_per_4bit_param      # includes the code table
        if not abs(number(answer, key) - measured) < 1e-3:           # by hand or measured: fine
            yield (f"{key}: 4 bits per index, plus the constants of a block of 128 shared by "
                   "its 128 weights" + (": an 8-bit absmax per block and a float32 absmax2 "
                                        "per 256 blocks" if dq else ": one float32 absmax"))


@exercise(2, keys=["bf16", "fp32", "weight", "why"])
def exercise_2(answer):
    """answer = dict(bf16=..., fp32=..., weight=..., why="a", "b" or "c"): relative errors."""
    why = choice(answer, "why", ["a", "b", "c"])
    state = torch.get_rng_state()
    linear, layer4 = _section1_layers()
    torch.set_rng_state(state)
    x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(30))
    reference = nn.functional.linear(x.double(), layer4.dequantize(torch.float32).double())
    relative = lambda y: ((y.double() - reference).norm() / reference.norm()).item()  # noqa: E731
    with torch.no_grad():
        bf16_error, weight_error = relative(layer4(x)), relative(linear(x))
    if not bf16_error / 3 < number(answer, "bf16") < 3 * bf16_error:
        yield ("bf16: the relative error of layer4 (bf16 compute) against a float64 matmul "
               "with the same dequantized weight, ||y - y64|| / ||y64||")
    if not 0 <= number(answer, "fp32") < 1e-5:
        yield "fp32: the same with a Linear4bit built with compute_dtype=torch.float32"
    if not weight_error / 1.5 < number(answer, "weight") < 1.5 * weight_error:
        yield ("weight: the float32 layer with the original weight, against the same float64 "
               "reference: the error that 4-bit storage itself makes")
    if why != "b":
        yield "why: put the three numbers next to each other: which error dominates?"


@exercise(3, keys=["changed", "keeps_float32"])
def exercise_3(answer):
    """answer = dict(changed=..., keeps_float32=True or False)."""
    keeps_answer = choice(answer, "keeps_float32", [True, False])
    changed = int((NF4.to(torch.bfloat16).float() != NF4).sum())
    cast = Linear4bit.from_linear(nn.Linear(32, 16, bias=False)).to(torch.bfloat16)
    keeps = cast.code.dtype == cast.absmax2.dtype == cast.offset.dtype == torch.float32
    if whole(answer, "changed", lowest=0) != changed:
        yield "changed: round mq.NF4 to bf16 and back, and count the values that differ"
    if keeps_answer != keeps:
        yield ("keeps_float32: build a Linear4bit, call .to(torch.bfloat16) and look at the "
               "dtypes of its buffers")


def _cases():
    """(what, x, bias or None): inputs for a 64 -> 32 layer (not square: a transpose shows)."""
    g = torch.Generator().manual_seed(70)
    return [("x of shape (8, 64), with a bias", torch.randn(8, 64, generator=g),
             torch.randn(32, generator=g)),
            ("x of shape (2, 3, 64) (batch, sequence, features), with a bias",
             torch.randn(2, 3, 64, generator=g), torch.randn(32, generator=g)),
            ("x of shape (5, 64), no bias (None)", torch.randn(5, 64, generator=g), None)]


def _hint_for(error: Exception, function: str):
    text = str(error)
    if "incorrect number of gradients" in text:
        return ("backward returns one gradient per input of forward, in order: "
                "(grad_x, grad_bias, None, None); None for the bytes and the state")
    if "invalid gradient at index 0" in text:
        return "grad_x has the shape of x: grad_out (..., out) @ W (out, in)"
    if "cannot be multiplied" in text:
        return ("grad_x = grad_out @ W: grad_out is (..., out) and W is (out, in), so no "
                "transpose")
    if "invalid gradient at index 1" in text:
        return ("grad_bias has the bias's shape (out,): sum grad_out over every leading "
                "dimension, grad_out.reshape(-1, out).sum(0)")
    return f"{function} raised {type(error).__name__}: {text.splitlines()[0]}"


@exercise(4)
def exercise_4(function):
    """Your torch.autograd.Function `function`: apply(x, bias, packed, state) -> y, whose backward
    gives dL/dx = grad_out @ W and dL/dbias = grad_out summed, and saves no float weight."""
    if function is None:
        raise Stop("no answer yet. Set answer_{n} as the exercise says and run the cell again.")
    if not (isinstance(function, type) and issubclass(function, torch.autograd.Function)):
        raise Stop(f"pass your torch.autograd.Function class itself, got {function!r}.")
    name = f"{function.__name__}.backward"
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(71)) * 0.02
    packed, state = quantize_4bit(weight)
    W = dequantize_4bit(packed, state, torch.float32)
    for what, x, bias in _cases():
        x = x.clone().requires_grad_(True)
        b = None if bias is None else bias.clone().requires_grad_(True)
        grad_out = torch.randn(*x.shape[:-1], 32, generator=torch.Generator().manual_seed(72))
        saved = []
        keep = lambda t: saved.append(t) or t                        # noqa: E731

        def run():
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                y = function.apply(x, b, packed, state)
            y.backward(grad_out)
            return y
        try:
            run()
        except NotImplementedError:
            raise Stop(f"not implemented yet. Write the body of {name} (in place of "
                       "`raise NotImplementedError`) and run the cell again.") from None
        except Exception as e:                              # the learner's bug, as a hint
            return [_hint_for(e, name)]
        if x.grad is None:
            return [f"backward must return dL/dx first (it returned None for x, on {what})"]
        if any(t.is_floating_point() and t.numel() >= W.numel() for t in saved):
            return ["save only the bytes and the state for backward (ctx.save_for_backward("
                    "packed)), and dequantize W again there: never keep the float W alive"]
        want = grad_out @ W
        if x.grad.shape != x.shape:
            return ["grad_x has the shape of x: grad_out (..., out) @ W (out, in)"]
        if not torch.allclose(x.grad, want, rtol=1e-4, atol=1e-6):
            if torch.allclose(x.grad, -want, rtol=1e-4, atol=1e-6):
                return ["grad_x: no minus sign; y = x @ W.T, so dL/dx = grad_out @ W"]
            return [f"grad_x = grad_out @ W, with W dequantized again in backward (wrong on "
                    f"{what})"]
        if b is not None:
            want_b = grad_out.reshape(-1, 32).sum(0)
            if b.grad is None or not torch.allclose(b.grad, want_b, rtol=1e-4, atol=1e-5):
                return ["grad_bias: grad_out summed over every leading dimension (each output "
                        "feature's bias is added to every row)"]
    return True
