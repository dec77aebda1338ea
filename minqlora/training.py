"""The training loop shared by pretraining (toy.py) and fine-tuning (finetune.py) (lesson 09).

The toy task's loss is the cross-entropy of the 3 answer digits, predicted from the prompt:

    loss = mean over rows and the 3 answer positions t of -log softmax(logits[t])[seqs[t + 1]]

Accuracy is exact match of all three under argmax, which is what greedy decoding would produce.
One step: a random batch (from a seeded generator), loss, backward, gradient clipping at 1.0,
optimizer step, scheduler step. Worked example: a batch of 64 rows of 9 tokens feeds the model
(64, 8) ids and scores its logits at the last 3 positions, (64, 3, 14), against (64, 3) digits.

Which parameters train and with which optimizer is the caller's business (toy.pretrain,
finetune.finetune); this module only runs the steps, on one thread (tiny matrices).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def answer_loss(model: nn.Module, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the 3 answer digits of seqs (n, 9), and which rows are all right."""
    logits = model(seqs[:, :-1])[:, -3:].float()          # predicts seqs[:, -3:]: (n, 3, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, -3:].reshape(-1))
    return loss, (logits.argmax(-1) == seqs[:, -3:]).all(1)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside the block: for 64 x 128 matrices a second thread only adds
    waiting (and, on a busy machine, spinning). The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def evaluate(model: nn.Module, seqs: torch.Tensor) -> tuple[float, float]:
    """(held-out loss, exact-match accuracy) of model on seqs, as Python floats (one thread)."""
    was_training = model.training
    model.eval()
    with one_thread():
        loss, correct = answer_loss(model, seqs)
    model.train(was_training)
    return loss.item(), correct.float().mean().item()


def train(model, seqs, params, optimizer, steps, batch_size, seed, desc="train", progress=False,
          scheduler=None, heldout=None, eval_every=0):
    """`steps` of training on random batches of seqs; returns (loss per step, held-out curve).

    The curve holds (step, held-out loss) at step 0 and every `eval_every` steps when a
    `heldout` set is given. progress=True shows a tqdm bar (on stderr).
    """
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(seed)
    losses, curve = [], []
    with one_thread():
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            if heldout is not None and step % max(eval_every, 1) == 0:
                curve.append((step, evaluate(model, heldout)[0]))
            model.train()
            batch = seqs[torch.randint(len(seqs), (batch_size,), generator=gen)]   # (batch, 9)
            loss, _ = answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
        if heldout is not None:
            curve.append((steps, evaluate(model, heldout)[0]))
    return losses, curve
