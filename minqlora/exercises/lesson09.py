"""Checks for lesson 09's exercises (fine-tuning and the memory budget); the library is the
answer key.

>>> exercise_4(3.02e9)
Exercise 4: not yet.
  hint: that is bytes: give GB
False
"""
import copy

import torch

from ..finetune import convert, weight_error
from ..llama_shapes import PRESETS, linear_shapes
from ..memory import estimate
from ..qlora import prepare_qlora
from ..toy import ToyLM, make_data
from ..training import evaluate
from ._core import (Stop, answer_dict, call, choice, close, diagnose, exercise, number, verdict,
                    whole)

TYPES = {"nf4": "qlora", "fp4": "qlora-fp4", "int4": "qlora-int4"}   # quant_type -> method


@exercise(1)
def exercise_1(answer):
    """answer = trainable parameters of the toy model with r = 8 on all 14 linears (an int)."""
    mine = whole(answer, lowest=0)
    model = prepare_qlora(ToyLM(), r=8, dropout=0.0, compute_dtype=torch.float32)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mine == counted:
        return True
    if mine == counted // 2:
        return ["that is one block; the toy model has two"]
    return ["a LoRA pair on a linear from `in` to `out` features holds r * (in + out) parameters; "
            "add the seven linears of a block, then both blocks"]


@exercise(2)
def exercise_2(answer, base):
    """answer = dict(nf4=loss, fp4=loss, int4=loss, agree=True or False) for the lesson's `base`
    (pass it too: exercise_2(answer_2, base))."""
    answer = answer_dict(answer, ["nf4", "fp4", "int4", "agree"])
    if not isinstance(base, ToyLM):
        raise Stop("pass the lesson's pretrained model as the second argument: "
                   "check.exercise_2(answer_2, base).")
    heldout = make_data("add", seed=0)["heldout"]
    losses = {qt: evaluate(prepare_qlora(copy.deepcopy(base), r=8, dropout=0.0, quant_type=qt,
                                         compute_dtype=torch.float32), heldout)[0]
              for qt in TYPES}
    hints = []
    wrong = [qt for qt in TYPES if not close(number(answer, qt), losses[qt])]
    if wrong:
        hints.append(f"losses of {', '.join(wrong)}: quantize a copy of the base at that "
                     "quant_type, then its held-out addition loss (evaluate(...)[0]); no training")
    errors = {qt: weight_error(base, convert(base, m)) for qt, m in TYPES.items()}
    agree = min(losses, key=losses.get) == min(errors, key=errors.get)
    if choice(answer, "agree", [True, False]) is not agree:
        hints.append("agree: is the type with the lowest loss on this run the one with the lowest "
                     "weight error (section 7's table)?")
    return verdict(hints)


def _largest_fitting(**assumptions):
    fits = [n for n in PRESETS if estimate(n, "qlora", **assumptions).total < 24e9]
    return fits[-1] if fits else None


@exercise(3)
def exercise_3(answer):
    """answer = dict(checkpointed=preset name, long=preset name or None)."""
    answer = answer_dict(answer, ["checkpointed", "long"])
    hints = []
    for key, assumptions in (("checkpointed", {}),
                             ("long", dict(seq_len=2048, gradient_checkpointing=False))):
        if answer[key] != _largest_fitting(**assumptions):
            hints.append(f"{key}: the QLoRA total of every preset in mq.memory.PRESETS"
                         + (" at 2048 tokens without gradient checkpointing" if key == "long"
                            else "") + "; keep the largest under 24e9 bytes")
    return verdict(hints)


@exercise(4)
def exercise_4(answer):
    """answer = GB saved by double quantization at 65B (a float, GB = 1e9 bytes)."""
    mine = number(answer)
    saved = (estimate("llama-65b", "qlora", double_quant=False).quant_constants
             - estimate("llama-65b", "qlora").quant_constants) / 1e9
    if close(mine, saved, rel=1e-2):
        return True
    if close(mine, saved * 1e9, rel=1e-2):
        return ["that is bytes: give GB"]
    return ["compare the quantization constants of the 65B QLoRA estimate with and without "
            "double quantization, in GB (1e9 bytes)"]


@exercise(5)
def exercise_5(answer):
    """answer = dict(winner="nf4", "fp4" or "int4", why="a", "b" or "c")."""
    answer = answer_dict(answer, ["winner", "why"])
    winner, why = choice(answer, "winner", list(TYPES)), choice(answer, "why", ["a", "b", "c"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = ToyLM()
    errors = {qt: weight_error(untrained, convert(untrained, m)) for qt, m in TYPES.items()}
    hints = []
    if winner != min(errors, key=errors.get):
        hints.append("winner: torch.manual_seed(0), toy.ToyLM(), then the weight error of each "
                     "4-bit conversion of it; the lowest error wins")
    if why != "a":
        hints.append("why: plot a histogram of one untrained weight; where does each codebook "
                     "place its 16 levels?")
    return verdict(hints)


PARTS = ("weights", "quant_constants", "adapters", "gradients", "optimizer", "activations")
SMALL = dict(vocab_size=100, hidden_size=40, intermediate_size=100, num_hidden_layers=2,
             num_attention_heads=4)              # 1,600- and 4,000-weight linears: short blocks
CASES = [("llama-65b", "qlora", 64, 512, True), ("llama-7b", "full16", 64, 512, True),
         ("llama-13b", "lora16", 8, 2048, True), ("llama-33b", "qlora", 16, 1024, False),
         ("small", "qlora", 4, 10, True)]
MISTAKES = {   # mistake -> its hint
    "table": "each 4-bit layer also keeps its own code table: 16 float32 values, 64 bytes",
    "no_dq": "double quantization stores each block's absmax as one uint8, plus one float32 "
             "absmax2 per 256 blocks and one float32 offset per layer",
    "floor": "a short last block still has its absmax, and a short last group of blocks its "
             "absmax2: round the counts up (ceil), as for the packed bytes",
    "all_4bit": "QLoRA stores only the seven linears of each block in 4 bits; the embedding, "
                "lm_head and norms stay 16-bit",
    "one_matrix": "a LoRA pair is A (r x in) and B (out x r): r * (in + out) parameters",
    "grads_all": "the frozen base gets no gradients: only the trainable parameters have one",
    "adam_one": "AdamW keeps two float32 moments per trainable parameter, m and v: 8 bytes",
    "ckpt_ignored": "without gradient checkpointing a block keeps about 10 h + 3 m values per "
                    "token for backward; with it, only its input (h values)",
    "tied": "LLaMA does not tie lm_head to the embedding: two vocab x h matrices",
}


def _budget(config, method, r, tokens, checkpointing, mistake=None) -> dict:
    """The six parts in bytes (16-bit weights, adapters, gradients and activations, batch 1), or
    what one mistake of MISTAKES gives."""
    h, m, L, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "vocab_size"))
    sizes = [i * o for _, i, o in linear_shapes(config)]           # the seven linears of a block
    n_rest = (1 if mistake == "tied" else 2) * V * h + (2 * L + 1) * h
    n_all = L * sum(sizes) + n_rest
    up = (lambda a, b: a // b) if mistake == "floor" else (lambda a, b: -(-a // b))
    per_adapter = (lambda i, o: r * i) if mistake == "one_matrix" else (lambda i, o: r * (i + o))
    n_adapter = 0 if method == "full16" else L * sum(per_adapter(i, o)
                                                     for _, i, o in linear_shapes(config))
    trainable = n_all if method == "full16" or mistake == "grads_all" else n_adapter
    parts = dict(weights=2 * n_all, quant_constants=0, adapters=2 * n_adapter,
                 gradients=2 * trainable, optimizer=(4 if mistake == "adam_one" else 8) *
                 (n_all if method == "full16" else n_adapter))
    if method == "qlora":
        blocks = [up(n, 64) for n in sizes]
        constants = [4 * b if mistake == "no_dq" else b + 4 * up(b, 256) + 4 for b in blocks]
        parts["weights"] = L * sum((n + 1) // 2 for n in sizes) + (
            (n_rest + 1) // 2 if mistake == "all_4bit" else 2 * n_rest)
        parts["quant_constants"] = L * sum(c + (0 if mistake == "table" else 64)
                                           for c in constants)
    saved = h if checkpointing and mistake != "ckpt_ignored" else 10 * h + 3 * m
    parts["activations"] = 2 * L * tokens * saved
    return parts


def _cases():
    for name, method, r, tokens, checkpointing in CASES:
        config = dict(SMALL if name == "small" else PRESETS[name])
        want = estimate(config, method, r=r, seq_len=tokens,
                        gradient_checkpointing=checkpointing).parts()
        yield f"{name}, {method}, r={r}, {tokens} tokens" + (
            "" if checkpointing else ", no checkpointing"), config, (method, r, tokens,
                                                                     checkpointing), want


@exercise(6)
def exercise_6(memory_budget):
    """Your memory_budget(config, method, r, tokens, checkpointing) -> {part: bytes} for the six
    parts, checked against mq.memory.estimate on four LLaMA sizes, the three methods and a small
    config whose layers end in short blocks."""
    for what, config, args, want in _cases():
        got = call(memory_budget, "memory_budget", dict(config), *args)
        if not isinstance(got, dict) or set(got) != set(PARTS):
            return [f"return a dict with exactly the keys {', '.join(PARTS)}"]
        try:
            got = {k: float(v) for k, v in got.items()}
        except (TypeError, ValueError, RuntimeError):
            return ["each part is a number of bytes"]
        if got == want:
            continue
        wrong = {hint: _budget(config, *args, mistake=m) for m, hint in MISTAKES.items()}
        return diagnose(got, wrong, lambda a, b: a == b) or [
            f"on {what}: {', '.join(k for k in PARTS if got[k] != want[k])} differ from the "
            "estimate; section 9 builds each part"]
    return True
