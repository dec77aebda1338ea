"""The five-way fine-tuning experiment: conversion, bytes, determinism, and what the runs show.

The training-dependent bounds below were measured with tools/training_grid.py on the grid of
base seeds 0..4 (base and fine-tuning seed alike) x PyTorch's CPU kernel paths; each test's
docstring gives the measured range and the margin. The suite runs seed 0 on the path the CPU
picks, and .ci/run again on another path.
"""
import pytest
import torch
from torch import nn

from minqlora import memory, toy
from minqlora.finetune import (METHODS, QUANT_TYPE_OF, Bf16Linear, convert,
                               default_compute_dtype, finetune)
from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear
from minqlora.training import evaluate

STEPS = 600          # finetune's default, lesson 09's setting (batches of 64, lr 3e-3, r 16)


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match="method must be one of"):
        finetune(toy.ToyLM(), "qlora-nf3")
    with pytest.raises(ValueError, match=r"steps must be an integer >= 20 .*, got 5"):
        finetune(toy.ToyLM(), "qlora", steps=5)


def test_convert_freezes_the_base_and_computes_in_the_chosen_dtype():
    torch.manual_seed(0)
    base = toy.ToyLM()
    assert default_compute_dtype("cpu") == torch.float32
    assert default_compute_dtype("cuda") == torch.bfloat16
    for method in METHODS[1:]:
        model = convert(base, method, compute_dtype=torch.float32)
        q = model.layers[0].q_proj
        assert isinstance(q, LoRALinear) and isinstance(model.lm_head, nn.Linear)
        assert q.base.compute_dtype == torch.float32
        if method in QUANT_TYPE_OF:
            assert isinstance(q.base, Linear4bit) and q.base.quant_type == QUANT_TYPE_OF[method]
        trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"lora_A", "lora_B"}
    assert all(p.requires_grad for p in convert(base, "full").parameters())
    x = torch.randn(5, 64)
    w = base.layers[0].q_proj.weight
    layer = Bf16Linear.from_linear(base.layers[0].q_proj, compute_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer(x), x @ w.bfloat16().float().T)               # bf16 W, float32 math


@pytest.fixture(scope="module")
def base_before(toy_base):
    """The base's tensors before any fine-tuning (results needs this, so it is taken first)."""
    return {k: v.clone() for k, v in toy_base.state_dict().items()}


@pytest.fixture(scope="module")
def results(toy_base, base_before):
    """One run per method on the one shared base, with finetune's defaults (lesson 09's)."""
    return {m: finetune(toy_base, m) for m in METHODS}


def test_every_method_learns_the_new_task_and_leaves_the_base_alone(toy_base, base_before,
                                                                       results):
    """Each run starts from its converted, untrained model (LoRA's B = 0), which is the base up
    to the rounding of its stored weights: held-out loss within 0.04 % of the base's for bf16,
    1.9 % for the 4-bit types (bounds 0.2 % and 10 %). After 600 steps the held-out loss is at
    least 180x below the start for every method on every base of the grid (bound: 10x)."""
    sub = toy.make_data("sub")["heldout"]
    base_loss = evaluate(toy_base, sub)[0]
    for m, r in results.items():
        start = evaluate(convert(toy_base, m), sub)[0]
        assert r.heldout_curve[0][1] == start, m
        assert start == pytest.approx(base_loss, rel=0.002 if m in ("full", "lora16") else 0.1)
        assert r.heldout_loss < start / 10 and len(r.losses) == STEPS, m
    assert all(torch.equal(base_before[k], v) for k, v in toy_base.state_dict().items())


def test_every_method_answers_90_percent_and_qlora_matches_lora(results):
    """Issue 20: held-out exact match of the 3-digit answer (the base: < 0.05) after finetune's
    defaults, on the bases of seeds 0-4 x PyTorch's CPU kernel paths (AMD EPYC with AVX-512, 2
    cores; tools/training_grid.py):

                     full   lora16   qlora    fp4    int4
        default  0  0.993  1.000  0.999  1.000  0.998
        default  1  0.996  0.999  1.000  0.999  0.998
        default  2  1.000  1.000  1.000  1.000  1.000
        default  3  0.998  1.000  0.995  0.988  1.000
        default  4  0.991  0.996  0.999  0.994  0.998
        avx2     0  0.999  0.976  0.997  0.997  0.999
        avx2     1  0.999  0.999  0.998  0.996  1.000
        avx2     2  1.000  1.000  1.000  1.000  1.000
        avx2     3  0.950  0.992  0.993  0.972  0.990
        avx2     4  0.993  0.995  0.988  0.998  0.990
        avx512   0  0.991  0.978  0.986  0.992  0.986   (lesson 09's run)
        avx512   1  0.997  1.000  1.000  0.999  1.000
        avx512   2  1.000  1.000  1.000  1.000  1.000
        avx512   3  0.982  0.998  0.996  0.995  0.996
        avx512   4  0.993  0.989  0.986  1.000  0.985

    Bounds: every method >= 0.90 (lowest measured 0.950), and |qlora - lora16| <= 0.05
    (largest measured 0.021).

    The former defaults (200 steps of 256, lr 1e-2, r 8) stalled some LoRA runs on a plateau
    (avx2, seed 0: lora16 0.159, its training loss 0.82 at the end, near ln(10) / 3 = 0.77,
    the ones digit right on 18 % of problems); finetune's docstring and lesson 09 say what was
    tried."""
    acc = {m: r.accuracy for m, r in results.items()}
    assert all(a >= 0.90 for a in acc.values()), acc
    assert abs(acc["qlora"] - acc["lora16"]) <= 0.05, acc


def test_nf4_reconstructs_the_base_best(results):
    """Relative error of the stored linear weights over the grid: int4's is 1.127x to 1.153x
    NF4's and FP4's 1.142x to 1.164x int4's (asserted: 1.05x each); bf16's about 0.0017."""
    err = {m: results[m].weight_error for m in METHODS}
    assert err["full"] == 0 and err["lora16"] < 0.005
    assert err["qlora-int4"] > 1.05 * err["qlora"] and err["qlora-fp4"] > 1.05 * err["qlora-int4"]


def test_finetune_is_deterministic_for_a_seed(toy_base):
    state = torch.random.get_rng_state()
    a, b, c = (finetune(toy_base, "lora16", steps=20, batch_size=64, seed=s) for s in (5, 5, 6))
    assert a.losses == b.losses and a.heldout_curve == b.heldout_curve and a.losses != c.losses
    assert torch.equal(torch.random.get_rng_state(), state)


def test_bytes_follow_the_memory_calculator(results):
    """Measured bytes of each run = memory.estimate at the toy's settings (float32 adapters and
    float32 embedding, norms and lm_head)."""
    n_all = memory.count_params(toy.CONFIG)
    full, lora, q = results["full"].bytes, results["lora16"].bytes, results["qlora"].bytes
    assert full == {"weights": 4 * n_all, "adapters": 0, "optimizer": 8 * n_all}
    e = memory.estimate(toy.CONFIG, "qlora", r=16, weight_bits=32, adapter_bits=32)
    assert q["weights"] == e.weights + e.quant_constants
    assert q["adapters"] == lora["adapters"] == e.adapters and q["optimizer"] == e.optimizer
    assert results["qlora"].trainable == 34_816 and results["full"].trainable == n_all
