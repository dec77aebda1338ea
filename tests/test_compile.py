"""torch.compile(fullgraph=True) on every configuration of Linear4bit, as bitsandbytes' own
test_linear4bit_torch_compile runs its layer: NF4 / FP4, with and without double quantization,
with and without bias, float32 / bfloat16 / float16 compute; the forward output and the input
gradient against eager, within torch.testing.assert_close's default tolerances for the dtype
(bitsandbytes' check). Also LoRA over Linear4bit (the adapters' gradients too) and a
checkpointed block (torch.utils.checkpoint: the backward runs the forward again).

Layers are chained (4 per net), because one compiled-vs-eager difference shows only there:
inductor fuses one layer's rounding of dx to bf16 with the next layer's widening of it and
drops both, so a backward that widens dy to float32 by hand (what linear4bit.py does in eager on
a CPU) gave compiled gradients up to 2e-3 away from eager's. Compiled, Linear4bit multiplies
in compute_dtype instead: in bf16 that gives eager's bits (the bf16 GEMM accumulates in float32
and rounds once, as eager's widened product does), at bitsandbytes' tolerance with room to
spare. In fp16 the CPU's fp16 GEMM and eager's float32 one sum in different orders; both are
rounded once, but where a sum cancels the two differ by more than fp16's rtol of 1e-3 relative
to the small result (up to 3x the tolerance over a few seeds), so fp16's dx is compared at two
fp16 steps of dx's largest value. (bitsandbytes' own grid has no fp16 compute.) The same
fusion keeps a float32 bias's gradient unrounded where eager rounds it to compute_dtype, so
parameter gradients are compared the same way, at the dtype they were computed in.

Every test compiles into its own inductor cache folder: kernels cached under one
ATEN_CPU_CAPABILITY (e.g. avx512) and loaded under another (CI's avx2 rerun) gave garbage
(torch 2.13: differences of 1e37, NaN), an inductor cache fault that has nothing to do with
minqlora. About a minute on one core for the whole file, most of it inductor's C++ builds.
"""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear

from helpers import gaussian

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYERS = [("nf4", True), ("fp4", True), ("nf4", False), ("fp4", False)]   # (quant_type, bias)


@pytest.fixture(autouse=True)
def fresh_compile(tmp_path, monkeypatch):
    """A new inductor cache folder and no graphs from earlier tests (see the module's text)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def net_of(compute_dtype, double_quant, dim=128, lora=False):
    """Four 4-bit layers, NF4 and FP4, with and without bias; LoRA over each if asked."""
    torch.manual_seed(0)
    layers = [Linear4bit(dim, dim, bias=bias, quant_type=quant_type, double_quant=double_quant,
                         compute_dtype=compute_dtype) for quant_type, bias in LAYERS]
    if lora:                    # B random: at zero (LoRA's start) the adapters change nothing
        layers = [LoRALinear(layer, r=8, alpha=16).to(compute_dtype) for layer in layers]
        for layer in layers:
            nn.init.normal_(layer.lora_B.weight, std=0.1)
    return nn.Sequential(*layers)


def eager_and_compiled(net, x, run=None):
    """(eager, compiled) runs of net on x: (output, dx, the trainable parameters' grads)."""
    results = []
    for model in (net, torch.compile(net, fullgraph=True)):
        x_ = x.detach().clone().requires_grad_()
        net.zero_grad(set_to_none=True)
        out = (run or (lambda m, t: m(t)))(model, x_)
        out.float().square().sum().backward()       # a gradient that differs per element
        grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
        results.append((out.detach(), x_.grad, grads))
    return results


def close(actual, expected, scaled=False):
    """assert_close at the defaults for the dtype (bitsandbytes' check); scaled=True: atol two
    steps of the dtype at the tensor's largest value (sums whose terms may cancel, each term
    rounded on one side and not on the other)."""
    atol = 2 * torch.finfo(expected.dtype).eps * expected.abs().max().item() if scaled else None
    rtol = None if atol is None else {torch.float32: 1.3e-6, torch.bfloat16: 1.6e-2,
                                      torch.float16: 1e-3}[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def assert_same(eager, compiled, lora=False):
    """Output and dx within bitsandbytes' tolerances (scaled: LoRA, see its test, and float16's
    dx, see the module's text); parameter gradients, float32 but made in out's dtype and summed
    over tokens, scaled at that dtype."""
    (out, dx, grads), (out_c, dx_c, grads_c) = eager, compiled
    assert out.dtype == out_c.dtype and dx.dtype == dx_c.dtype
    close(out_c, out, lora)
    close(dx_c, dx, lora or dx.dtype == torch.float16)
    for g, g_c in zip(grads, grads_c, strict=True):
        close(g_c.to(out.dtype), g.to(out.dtype), scaled=True)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_every_configuration_compiles_fullgraph_and_matches_eager(compute_dtype, double_quant):
    net = net_of(compute_dtype, double_quant)
    x = gaussian((16, 128), seed=1, dtype=compute_dtype)
    eager, compiled = eager_and_compiled(net, x)
    assert len(eager[2]) == 2                   # the two biases are trained, and compared
    assert_same(eager, compiled)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_over_linear4bit_compiles_fullgraph_and_matches_eager(compute_dtype):
    """Output, dx and the adapters' gradients (A and B of each layer, the biases frozen)."""
    net = net_of(compute_dtype, True, lora=True)
    for layer in net:
        layer.base.bias is None or layer.base.bias.requires_grad_(False)
    x = gaussian((16, 128), seed=2, dtype=compute_dtype)
    eager, compiled = eager_and_compiled(net, x)
    assert len(eager[2]) == 8
    # y = base(x) + B(A(x)) * scaling (and dx likewise): eager rounds both terms to compute_dtype
    # before adding, compiled adds them unrounded (lora.py's sum, fused), so where they cancel
    # the results differ by a rounding of the terms: a step of the dtype at the tensor's scale
    assert_same(eager, compiled, lora=True)


def test_a_checkpointed_block_compiles_fullgraph_and_matches_eager():
    """Activation checkpointing: the block's forward, decodes included, runs again in backward."""
    net = net_of(torch.bfloat16, True)
    x = gaussian((16, 128), seed=3, dtype=torch.bfloat16)
    run = lambda model, t: checkpoint(model, t, use_reentrant=False)   # noqa: E731
    assert_same(*eager_and_compiled(net, x, run))


def test_the_compiled_backward_is_what_the_module_says():
    """The fault this file guards against, shown: dx widened to float32 by hand in every layer
    (eager's CPU form) compiles to other bits than eager; the module's compiled form does not."""
    net = net_of(torch.bfloat16, True)
    x = gaussian((16, 128), seed=4, dtype=torch.bfloat16)

    class Widened(torch.autograd.Function):     # y = x @ W.T, dx = (dy.float() @ W.float())
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(weight)
            return x @ weight.T

        @staticmethod
        def backward(ctx, grad_out):
            (weight,) = ctx.saved_tensors
            return (grad_out.float() @ weight.float()).to(grad_out.dtype), None

    weights = [layer.dequantize(torch.bfloat16) for layer in net]

    def widened(t):                              # the same weights, eager's CPU backward
        for w in weights:
            t = Widened.apply(t, w)
        return t

    grads = []
    for run in (widened, torch.compile(widened, fullgraph=True)):
        x_ = x.clone().requires_grad_()
        run(x_).float().square().sum().backward()
        grads.append(x_.grad)
    assert not torch.equal(*grads)               # compiled: the roundings between layers dropped
    (_, dx, _), (_, dx_c, _) = eager_and_compiled(net, x)
    close(dx_c, dx)                              # the module's: eager's (bit for bit here)
