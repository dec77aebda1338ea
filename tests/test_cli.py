"""The command line (__main__.py) and what it runs: the tour (tour.py) in quick mode with its
training cut short, every section checked for its table; `python -m minqlora bench --quick`
end to end; the tour's tables one by one; and every argument checked before any work.
Timings are never asserted."""
import shutil
import subprocess
import sys

import pytest
import torch

from minqlora.nf4 import CODES
from minqlora.tour import memory_table, quantization_table


def run(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "minqlora", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_tour_runs_every_section(capsys, monkeypatch):
    """The tour in quick mode, in this process, with its training cut to 40 steps of 64: every
    section runs and prints its table (the numbers are lesson 09's and the other tests'
    business; the command line's wiring is tested below, the tour's tables one by one too)."""
    from minqlora import finetune, toy, tour
    def short(real):                    # at most 40 steps of at most 64 problems
        return lambda *args, steps=40, batch_size=64, **kw: real(
            *args, steps=min(steps, 40), batch_size=min(batch_size, 64), **kw)
    monkeypatch.setattr(toy, "pretrain", short(toy.pretrain))
    monkeypatch.setattr(finetune, "finetune", short(finetune.finetune))
    tour.tour(seed=0, quick=True)
    out = capsys.readouterr().out
    for heading in ("1. Quantization", "2. The dequantization kernel", "3-4. Fine-tuning",
                    "5. Memory", "6. Is NF4 optimal"):
        assert f"== {heading}" in out
    for method in ("full", "lora16", "qlora", "qlora-fp4", "qlora-int4"):
        assert f"\n{method} " in out
    assert "page-ins" in out and "llama-65b" in out and "accuracy: QLoRA (NF4) " in out
    if shutil.which("c++") or shutil.which("g++"):       # the kernel check needs a compiler here
        assert "bit-identical to the torch path" in out


def test_the_bench_prints_every_section():
    out = run("bench", "--quick")
    for section in ("[quant]", "kernel (CPU", "[lora]", "[paged]", "[limit]", "[goals]"):
        assert section in out


def test_the_tour_prints_the_memory_table(capsys):
    memory_table()
    out = capsys.readouterr().out
    assert "llama-65b" in out and "(here 784 GB)" in out and "(here 44.7 GB)" in out
    assert out.splitlines()[5].split()[-2:] == ["48", "GB"]       # 65B with QLoRA: one 48 GB GPU


def test_the_tours_quantization_table_covers_every_code():
    """One row per named code, without and with double quantization, at the format's bits:
    (256 * 256 / 2 + 1024 * 4) / 65536 * 8 = 4.5; (32768 + 1024 + 4 * 4 + 4) * 8 / 65536."""
    rows = quantization_table(seed=0, size=256)
    assert [(qt, dq) for qt, dq, *_ in rows] == [(qt, dq) for qt in CODES for dq in (False, True)]
    for qt, dq, rmse, max_err, bits in rows:
        assert bits == (4.5 if not dq else (32768 + 1024 + 16 + 4) * 8 / 65536)
        assert 0 < rmse < max_err < 0.05                    # a N(0, 0.02) weight, 4-bit error
    assert rows[0][2] < rows[2][2]                          # NF4 beats FP4 on Gaussian weights


def test_cli_help_lists_the_subcommands_and_options(capsys):
    from minqlora.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for word in ("tour", "bench", "--seed", "--quick", "--device", "--plot", "--only"):
        assert word in out
# ---- issue 10, item 17: every argument checked before any work ----

BAD = [(["bench", "--only", "nope"], "argument --only: invalid choice: 'nope' (choose from "
                                     "'quant', 'kernel', 'lora', 'paged', 'limit')"),
       (["bench", "--only", "os.path"], "invalid choice: 'os.path' (choose from 'quant'"),
       (["bench", "--only"], "argument --only: expected at least one argument"),
       (["--device", "foo"], "argument --device: expected cpu"),
       (["--device", "mps"], "argument --device: expected cpu"),
       (["--device", "cpu:1"], "argument --device: expected cpu"),
       (["--plot", "/nonexistent/x.png"], "the folder '/nonexistent' does not exist"),
       (["--plot", "curves.txt"], "the file name must end in one of .*\\.png"),
       (["--seed", "1e23"], "argument --seed: expected an integer from 0 to 4294967295, got "
                            "'1e23'"),
       (["--seed", "100000000000000000000000"], "expected an integer from 0 to 4294967295"),
       (["--seed", "-1"], "expected an integer from 0 to 4294967295"),
       (["bench", "--seed", "3", "--plot", "x.png"], "--seed, --plot: for the tour only"),
       (["tour", "--only", "quant"], "--only: for bench only"),
       (["bogus"], "invalid choice: 'bogus' (choose from 'tour', 'bench')")]


@pytest.mark.parametrize("argv, message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list)
                         else "")
def test_a_bad_argument_stops_before_any_work(argv, message, monkeypatch, capsys):
    """`--only nope` printed 'not built yet' and exited 0, `--only os.path` and `--seed 1e23`
    raised tracebacks, `--device cpu:1` failed after pretraining and `--plot /nonexistent/x.png`
    after the whole fine-tuning run. Now: exit status 2, one line naming what was expected,
    and neither the tour nor the bench is ever called."""
    import re

    from minqlora import __main__ as cli
    from minqlora import bench, tour
    called = []
    monkeypatch.setattr(tour, "tour", lambda *a, **k: called.append("tour"))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: called.append("bench"))
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and called == []
    assert err.count("\n") == 1 and err.startswith("python -m minqlora: error: ")
    assert re.search(message if ".*" in message else re.escape(message), err), err


def test_good_arguments_reach_the_commands(monkeypatch, tmp_path):
    from minqlora import __main__ as cli
    from minqlora import bench, tour
    calls, real_run_bench = [], bench.run_bench
    monkeypatch.setattr(tour, "tour", lambda *a: calls.append(("tour", a)))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: calls.append(("bench", a, k)))
    cli.main(["--seed", "7", "--quick", "--device", "cpu", "--plot", str(tmp_path / "c.png")])
    cli.main(["bench", "--only", "quant", "paged"])
    cli.main([])
    assert calls == [("tour", (7, True, "cpu", str(tmp_path / "c.png"))),
                     ("bench", (["quant", "paged"],), {"quick": False}),
                     ("tour", (0, False, "cuda" if torch.cuda.is_available() else "cpu", None))]
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['nope'\]; choose from"):
        real_run_bench(["nope"])


def test_the_exit_status_of_a_bad_argument_is_2():
    done = subprocess.run([sys.executable, "-m", "minqlora", "bench", "--only", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1
