"""The command line (__main__.py) and the tour it runs (tour.py): the two commands end to end
in quick mode, `python -m minqlora --quick` (the tour, about 35 s here) and
`python -m minqlora bench --quick` (about 12 s), which check that every section still runs and
prints its table; then the tour's tables, section by section. Timings are never asserted."""
import shutil
import subprocess
import sys

import pytest

from minqlora.nf4 import CODES
from minqlora.tour import memory_table, quantization_table


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
