"""The toy model, its data and pretraining."""
import pytest
import torch

from minqlora import memory, toy
from minqlora.training import evaluate


def decode(row) -> str:
    return "".join(toy.VOCAB[i] for i in row.tolist())


@pytest.mark.parametrize("task", ["add", "sub"])
def test_data_is_every_problem_once_and_correct(task):
    d = toy.make_data(task, seed=1)
    rows = torch.cat([d["train"], d["heldout"]])
    assert len(d["heldout"]) == 1000 and len(rows) == (10_000 if task == "add" else 5050)
    assert len({tuple(r.tolist()) for r in rows}) == len(rows)            # no repeats
    for text in map(decode, rows[::37]):
        a, b, c = int(text[:2]), int(text[3:5]), int(text[6:])
        assert text[2] == toy.TASKS[task] and text[5] == "=" and len(text) == 9
        assert c == (a + b if task == "add" else a - b) and c >= 0
    assert torch.equal(toy.make_data(task, seed=1)["heldout"], d["heldout"])
    assert not torch.equal(toy.make_data(task, seed=2)["heldout"], d["heldout"])


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match=r"characters \['x'\] are not in the vocabulary"):
        toy.encode("1x2")
    with pytest.raises(ValueError, match="task must be one of"):
        toy.make_data("mul")


def test_model_is_a_causal_mini_llama():
    """Same parameter count as memory.py's LLaMA formula; logits at t ignore tokens after t."""
    torch.manual_seed(0)
    model = toy.ToyLM()
    assert sum(p.numel() for p in model.parameters()) == memory.count_params(toy.CONFIG)
    ids = toy.make_data("add")["train"][:4, :-1]                           # (4, 8)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 10
    a, b = model(ids), model(changed)
    assert a.shape == (4, 8, len(toy.VOCAB))
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("theta", [10.0, 10000.0])
def test_rope_keeps_norms_and_makes_scores_depend_on_the_offset_only(theta):
    """rope rotates feature pairs: norms stay, position 0 is unchanged, and the score of a query
    at t against a key at s depends only on t - s (how attention finds "3 tokens back")."""
    torch.manual_seed(0)
    q, k = torch.randn(8).expand(1, 1, 9, 8), torch.randn(8).expand(1, 1, 9, 8)   # (1,1,T,D)
    rq, rk = toy.rope(q, theta), toy.rope(k, theta)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(rq[..., 0, :], q[..., 0, :])
    scores = rq[0, 0] @ rk[0, 0].T                                         # (9, 9): [t, s]
    for offset in range(-8, 9):
        diagonal = scores.diagonal(offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5)


def test_the_model_uses_the_configs_rope_theta():
    ids = toy.make_data("add")["train"][:4, :-1]
    outs = []
    for theta in (10.0, 10000.0):
        torch.manual_seed(0)
        outs.append(toy.ToyLM(dict(toy.CONFIG, rope_theta=theta))(ids))
    assert toy.CONFIG["rope_theta"] == 10.0 and not torch.allclose(*outs)


def test_pretrain_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    m1, m2 = toy.pretrain(seed=3, steps=5), toy.pretrain(seed=3, steps=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    pairs = zip(m1.state_dict().values(), m2.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(m1.lm_head.weight, toy.pretrain(seed=4, steps=5).lm_head.weight)


def test_pretraining_learns_addition_not_subtraction(toy_base):
    """toy.pretrain(seed=s) for seeds 0..4 on PyTorch's CPU kernel paths default and avx2 (the
    course machine has no avx512), held-out accuracy on make_data(task, seed=s), measured with
    tools/training_grid.py:

                          seed 0  seed 1  seed 2  seed 3  seed 4
        addition, avx2     1.000   0.999   1.000   1.000   0.989
        addition, default  0.999   0.999   1.000   0.998   0.998
        subtraction, avx2  0.003   0.017   0.006   0.004   0.005
        subtr., default    0.005   0.013   0.005   0.005   0.005

    Bounds: >= 0.95 (lowest measured 0.989) and < 0.05 (highest 0.017)."""
    assert evaluate(toy_base, toy.make_data("add")["heldout"])[1] >= 0.95
    assert evaluate(toy_base, toy.make_data("sub")["heldout"])[1] < 0.05


@pytest.mark.parametrize("n_heldout", [-5, 10000, 2.5, None])
def test_make_data_refuses_a_held_out_count_it_cannot_hold(n_heldout):
    """Issue 10, item 13: n_heldout=-5 returned 5 training rows and 9,995 held out."""
    with pytest.raises(ValueError, match=r"n_heldout must be an int from 0 to 9999 .* got"):
        toy.make_data("add", n_heldout=n_heldout)
    assert toy.make_data("sub", n_heldout=0)["heldout"].shape == (0, 9)
