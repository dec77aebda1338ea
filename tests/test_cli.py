"""The command line: its --help, and the two commands people run, end to end in quick mode:
`python -m minqlora --quick` (the tour, about 35 s here) and `python -m minqlora bench --quick`
(about 12 s). They check that every section still runs and prints its table, not the numbers
(those are the lessons' and the other tests' business; timings are not asserted)."""
import shutil
import subprocess
import sys

import pytest


def run(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "minqlora", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_tour_runs_every_section():
    out = run("--quick")
    for heading in ("1. Quantization", "2. The dequantization kernel", "3-4. Fine-tuning",
                    "5. Memory"):
        assert f"== {heading}" in out
    for method in ("full", "lora16", "qlora", "qlora-fp4", "qlora-int4"):
        assert f"\n{method} " in out
    assert "page-ins" in out and "llama-65b" in out
    if shutil.which("c++") or shutil.which("g++"):       # the kernel check needs a compiler here
        assert "bit-identical to the torch path" in out


def test_the_bench_prints_every_section():
    out = run("bench", "--quick")
    for section in ("[quant]", "kernel (CPU", "[lora]", "[paged]"):
        assert section in out


def test_cli_help_lists_the_subcommands_and_options(capsys):
    from minqlora.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for word in ("tour", "bench", "--seed", "--quick", "--device", "--plot", "--only"):
        assert word in out
