"""Checks for lesson 13's exercises (QLoRA sharded with FSDP2); the library is the answer key.

>>> exercise_2(2.5)
Exercise 2: answer_2 should be a whole number, got 2.5.
False
"""
from ..distributed import shard_rows
from ..memory import estimate
from ._core import call, exercise, whole

CASES = [(10, 2), (10, 4), (9, 2), (5, 4), (2, 4), (7, 3), (1, 1), (0, 2), (64, 8)]


def _hint(got, want, rows, world):
    """The hint for the first kind of mistake that `got` (one (start, stop) per rank) shows."""
    if not all(isinstance(g, tuple) and len(g) == 2
               and all(isinstance(v, int) and not isinstance(v, bool) for v in g) for g in got):
        return "return a tuple of two ints, (start, stop)"
    if got == [(start, stop - start) for start, stop in want]:
        return "the second number is where the rows stop, not how many there are"
    if any(stop > rows for _, stop in got):
        return "a stop past the last row: clip it to `rows`"
    if any(start > rows for start, _ in got):
        return "a rank that torch.chunk leaves out holds nothing: start == stop == rows"
    if all(stop - start == rows // world for start, stop in got):
        return ("with rows // world rows per rank the last rows belong to no rank: torch.chunk "
                "rounds up, ceil(rows / world)")
    if [stop - start for start, stop in got] == [rows // world + (r < rows % world)
                                                 for r in range(world)]:
        return ("torch.chunk gives every rank ceil(rows / world) rows, the last ones fewer; it "
                "does not spread the remainder one row per rank")
    return (f"rows={rows}, world={world}: print torch.arange(rows).chunk(world) and compare with "
            "your ranges")


@exercise(1)
def exercise_1(shard_rows_fn):
    """Your shard_rows(rows, world, rank) -> (start, stop), FSDP2's rows for that rank, on
    several sizes: uneven ones, more ranks than rows, zero rows."""
    for rows, world in CASES:                             # the first wrong case gets a hint
        want = [shard_rows(rows, world, rank) for rank in range(world)]
        got = [call(shard_rows_fn, "my_shard_rows", rows, world, rank) for rank in range(world)]
        if got != want:
            return [_hint(got, want, rows, world)]
    return True


def _fits(gpus, r=64):
    return estimate("llama-2-70b", "qlora", r=r, gpus=gpus).total < 24e9


@exercise(2)
def exercise_2(answer):
    """answer = the fewest GPUs (an int) on which LLaMA-2-70B, QLoRA, r = 64 fits 24e9 bytes."""
    gpus = whole(answer, lowest=1)
    want = next(n for n in range(1, 65) if _fits(n))
    if gpus == want:
        return True
    naive = -(-estimate("llama-2-70b", "qlora", r=64).total // int(24e9))
    if gpus == naive:
        return ["dividing one GPU's total by 24 GB forgets the parts that do not shrink with N: "
                "the activations and the gathered layers"]
    if gpus > want and _fits(gpus - 1):
        return ["it fits on fewer: try one GPU less"]
    return ["call mq.memory.estimate('llama-2-70b', 'qlora', r=64, gpus=n) for n = 1, 2, 3, ... "
            "and stop at the first total under 24e9 bytes"]
