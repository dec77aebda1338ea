"""Verdicts, hints and answer validation shared by every lesson's checks.

A check is a function `exercise_n(answer)` wrapped in `@exercise(n)`. It gives one hint per
mistake it finds: a question's check yields them (every mistake at once), an implement-it check
returns them as a list (those of the first input it gets wrong); no hint (or True) means right.
The decorator prints exactly one verdict and returns True only when the answer is right:

    Exercise n: right!
    Exercise n: not yet.          followed by one "hint:" line per mistake found
    Exercise n: no answer yet.    the answer is still None
    Exercise n: not implemented yet.   the learner's function still raises NotImplementedError

`@exercise(n, keys=[...])` first makes sure the answer is a dict holding those keys
(`answer_dict`). Inside a check, `number`, `whole`, `choice` and `call` stop the check with a
message (raise `Stop`) when the answer has the wrong type, or the learner's function cannot run.

>>> @exercise(7, keys=["bits"])
... def exercise_7(answer):
...     if number(answer, "bits") != 4:
...         yield "bits: 4 per weight"
>>> exercise_7(None)
Exercise 7: no answer yet. Set answer_7 as the exercise says and run the cell again.
False
>>> exercise_7(dict(bits=4.5))
Exercise 7: not yet.
  hint: bits: 4 per weight
False
>>> exercise_7(dict(bits=4))
Exercise 7: right!
True
"""
import functools


class Stop(Exception):
    """Ends a check early; its message (with {n} for the exercise number) is the verdict."""


def exercise(n: int, keys: list = None):
    """Decorator: number the check's verdicts `n`; with `keys`, the answer must be a dict holding
    them; the check's hints (yielded or returned) make the verdict; a `Stop` inside prints its
    message and gives False."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs):
            try:
                if keys is not None:
                    args = (answer_dict(args[0], keys),) + args[1:]
                given = check(*args, **kwargs)
                hints = [] if given is True else list(given)     # a generator runs here
            except Stop as stop:
                print(f"Exercise {n}: " + str(stop).replace("{n}", str(n)))
                return False
            print(f"Exercise {n}: not yet." if hints else f"Exercise {n}: right!")
            for hint in hints:
                print(f"  hint: {hint}")
            return not hints
        return run
    return wrap


def verdict(hints: list):
    """True when no hint was collected, else the hints: what a check may return instead of
    yielding its hints one by one."""
    return list(hints) if hints else True


def no_answer(answer) -> None:
    if answer is None:
        raise Stop("no answer yet. Set answer_{n} as the exercise says and run the cell again.")


def answer_dict(answer, keys) -> dict:
    """`answer` as a dict holding every key in `keys`, or Stop saying what is missing."""
    no_answer(answer)
    if not isinstance(answer, dict):
        raise Stop(f"answer_{{n}} should be a dict with the keys {', '.join(keys)}, "
                   f"got a {type(answer).__name__}.")
    missing = [k for k in keys if k not in answer]
    if missing:
        raise Stop(f"answer_{{n}} is missing the key(s) {', '.join(missing)}.")
    for k in keys:
        if answer[k] is None:
            raise Stop(f"answer_{{n}}[{k!r}] is still None: fill it in and run the cell again.")
    return answer


def number(answer, key: str = None) -> float:
    """answer[key] (or, with no key, the answer itself) as a float: a Python or NumPy number, or a
    one-element tensor; else Stop."""
    no_answer(answer)
    value, name = (answer, "answer_{n}") if key is None else (answer[key], f"answer_{{n}}[{key!r}]")
    if isinstance(value, (bool, str)) or not hasattr(value, "__float__"):
        raise Stop(f"{name} should be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise Stop(f"{name} should be a single number, got {value!r}.") from None


def whole(answer, key: str = None, lowest=None, power_of_two: bool = False) -> int:
    """answer[key] (or the answer itself) as an int: no fraction, no bool, at least `lowest`, a
    power of two if asked; else Stop."""
    value = number(answer, key)
    name = "answer_{n}" if key is None else f"answer_{{n}}[{key!r}]"
    if not value.is_integer():
        raise Stop(f"{name} should be a whole number, got {value!r}.")
    value = int(value)
    if lowest is not None and value < lowest:
        raise Stop(f"{name} should be at least {lowest}, got {value}.")
    if power_of_two and (value < 1 or value & (value - 1)):
        raise Stop(f"{name} should be a power of two (1, 2, 4, 8, ...), got {value}.")
    return value


def choice(answer: dict, key: str, options: list):
    """answer[key] if it is one of `options` (same type too: True is not 1), else Stop."""
    if not any(type(answer[key]) is type(o) and answer[key] == o for o in options):
        listed = ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}"
        raise Stop(f"answer_{{n}}[{key!r}] should be {listed}, got {answer[key]!r}.")
    return answer[key]


def numbers(values):
    """values (a list, tuple or tensor of numbers) as a list of floats, or None."""
    if isinstance(values, (str, bytes, dict)):
        return None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError, RuntimeError):
        return None


def close(value, target, rel=1e-3, abs_tol=1e-4) -> bool:
    try:
        return abs(float(value) - target) <= max(abs_tol, rel * abs(target))
    except (TypeError, ValueError, RuntimeError):
        return False


def all_close(values, targets, **tolerances) -> bool:
    mine = numbers(values)
    return mine is not None and len(mine) == len(targets) and all(
        close(a, b, **tolerances) for a, b in zip(mine, targets))


def call(fn, name: str, *args, on: str = None):
    """The learner's `fn(*args)`, or Stop: not a function yet, not implemented yet, or raised
    (saying `on` what input, when given)."""
    no_answer(fn)
    if not callable(fn):
        raise Stop(f"pass your function {name} itself (no parentheses), got {fn!r}.")
    name = getattr(fn, "__name__", name)                    # the learner's own name for it
    try:
        return fn(*args)
    except NotImplementedError:
        raise Stop(f"not implemented yet. Write the body of {name} (in place of "
                   "`raise NotImplementedError`) and run the cell again.") from None
    except Exception as e:                                  # the learner's bug, reported as a hint
        raise Stop(f"not yet.\n  hint: {name} raised {type(e).__name__}: {e}"
                   + (f" (on {on})" if on else "")) from None


def diagnose(mine, wrong: dict, same) -> list:
    """The hints of the known mistakes `wrong` ({hint: what that mistake returns}) that `mine`
    matches under `same`; empty when it matches none."""
    return [hint for hint, theirs in wrong.items() if same(mine, theirs)]
