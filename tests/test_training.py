"""The training loop shared by pretraining and fine-tuning: the answer-digit loss, exact-match
accuracy, evaluation on one thread, and `train`'s steps and held-out curve."""
import pytest
import torch
import torch.nn.functional as F

from minqlora import toy
from minqlora.training import answer_loss, evaluate, one_thread, train


@pytest.fixture
def model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return toy.ToyLM()


def test_answer_loss_scores_only_the_three_answer_digits(model):
    seqs = toy.make_data("add")["heldout"][:16]                            # (16, 9)
    loss, correct = answer_loss(model, seqs)
    logits = model(seqs[:, :-1])                                           # (16, 8, V)
    by_hand = F.cross_entropy(logits[:, 5:].reshape(-1, len(toy.VOCAB)), seqs[:, 6:].reshape(-1))
    assert torch.allclose(loss, by_hand) and correct.shape == (16,)
    assert torch.equal(correct, (logits[:, 5:].argmax(-1) == seqs[:, 6:]).all(1))
    changed = seqs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 10     # the last digit is a target, never an input
    assert not torch.allclose(answer_loss(model, changed)[0], loss)
    assert torch.equal(model(changed[:, :-1]), logits)


@torch.no_grad()
def test_accuracy_is_exact_match_under_greedy_decoding(toy_base):
    """answer_loss's `correct` (all 3 teacher-forced argmaxes right) is exactly 'greedy decoding
    from the prompt writes the right answer': the first wrong digit is the same in both. The
    base is pretrained on addition and has never seen '-', so subtraction gives both kinds."""
    seqs = torch.cat([toy.make_data(task)["heldout"][:100] for task in ("add", "sub")])
    _, correct = answer_loss(toy_base, seqs)
    ids = seqs[:, :6]                                                      # "ab+cd="
    for _ in range(3):
        ids = torch.cat([ids, toy_base(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(correct, (ids == seqs).all(1))
    assert 0 < correct.sum() < 200                                         # both kinds occur


def test_one_thread_restores_the_setting_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_evaluate_gives_floats_and_restores_the_mode(model):
    seqs = toy.make_data("sub")["heldout"][:50]
    model.train()
    loss, acc = evaluate(model, seqs)
    assert model.training and isinstance(loss, float) and isinstance(acc, float)
    assert loss == pytest.approx(answer_loss(model, seqs)[0].item(), rel=1e-5) and 0 <= acc <= 1
    model.eval()
    evaluate(model, seqs)
    assert not model.training


def test_train_takes_the_steps_and_records_the_heldout_curve(model):
    data = toy.make_data("add")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    state = torch.random.get_rng_state()
    losses, curve = train(model, data["train"], params, opt, 7, 8, seed=0, scheduler=sched,
                          heldout=data["heldout"][:64], eval_every=3)
    assert len(losses) == 7 and all(isinstance(x, float) for x in losses)
    assert [step for step, _ in curve] == [0, 3, 6, 7]
    assert curve[-1][1] == pytest.approx(evaluate(model, data["heldout"][:64])[0])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)            # 7 scheduler steps
    assert torch.equal(torch.random.get_rng_state(), state)                # batches: own generator
    assert train(model, data["train"], params, opt, 3, 8, seed=0)[1] == []  # no heldout, no curve


def test_train_draws_the_same_batches_for_a_seed():
    data = toy.make_data("add")["train"]
    runs = []
    for seed in (1, 1, 2):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = toy.ToyLM()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        runs.append(train(m, data, list(m.parameters()), opt, 4, 16, seed)[0])
    assert runs[0] == runs[1] and runs[0] != runs[2]
