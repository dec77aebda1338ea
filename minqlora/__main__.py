"""`python -m minqlora [tour|bench]`: the course's story in one command.

    python -m minqlora [tour] [--seed N] [--quick] [--device cpu|cuda|cuda:N] [--plot PATH]
    python -m minqlora bench [--only SECTION ...] [--quick]

The tour (about 70 s on a 2-core CPU; --quick: about 35 s) prints, in the paper's order, the
sections listed in minqlora/tour.py (shown below in --help).
The bench runs speed checks against torchao / bitsandbytes where installed (minqlora/bench/).
Every argument is checked before any work starts: a bad one exits with status 2 and one line
naming what was expected. What has and has not run on a GPU: the README's GPU section.
"""
import argparse
import os
import re
from pathlib import Path

import torch

from ._checks import SetupError
from .bench import SECTIONS

SEEDS = 2 ** 32                       # seeds 0 .. 2**32 - 1, as numpy takes them


class Parser(argparse.ArgumentParser):
    def error(self, message):         # one line (no usage block), exit status 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def seed(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) >= SEEDS:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEEDS - 1}, "
                                         f"got {text!r}")
    return int(text)


def device(text: str) -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    choices = "cpu" + (f", cuda or cuda:0..cuda:{n - 1}" if n else " (torch sees no CUDA GPU)")
    found = re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if found is None or (text != "cpu" and not n) or int(found.group(1) or 0) >= max(n, 1):
        raise argparse.ArgumentTypeError(f"expected {choices}, got {text!r}")
    return text


def plot_path(text: str) -> str:
    from importlib.util import find_spec
    if find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("needs matplotlib (pip install matplotlib)")
    from matplotlib.backend_bases import FigureCanvasBase
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    path = Path(text)
    if path.exists() and not (path.is_file() and os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a file you can write "
                                         "(a folder?); choose a new file name")
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: the file name must end in one of "
                                         f"{', '.join('.' + f for f in formats)}")
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {str(folder)!r} does not exist "
                                         "or is not writable")
    return text


def main(argv=None) -> None:
    from . import tour as tour_module                     # its docstring lists the sections
    sections = tour_module.__doc__.split("\n\n")[1]
    parser = Parser(prog="python -m minqlora", description=f"{__doc__}\n{sections}",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="tour", choices=["tour", "bench"],
                        help="tour (default): the whole story; bench: speed checks")
    parser.add_argument("--seed", type=seed, help="tour: seed for every random tensor (0)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
    parser.add_argument("--device", type=device,
                        help="tour: cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--plot", metavar="PATH", type=plot_path,
                        help="tour: save the loss curves (needs matplotlib)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"bench: only these sections, of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    try:
        run(parser, args)
    except (SetupError, OSError) as error:   # the machine's setup (compiler, cache folder, a
        line = (str(error).splitlines() or [repr(error)])[0]       # full disk): one line, status 1
        parser.exit(1, f"{parser.prog}: error: {line}\n")


def run(parser, args) -> None:
    if args.command == "bench":
        tour_only = [f"--{name}" for name in ("seed", "device", "plot")
                     if getattr(args, name) is not None]
        if tour_only:
            parser.error(f"{', '.join(tour_only)}: for the tour only; bench takes --only and "
                         "--quick")
        from .bench import run_bench
        run_bench(args.only, quick=args.quick)
    else:
        if args.only:
            parser.error("--only: for bench only (python -m minqlora bench --only ...)")
        from .tour import tour
        tour(args.seed or 0, args.quick,
             args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.plot)


if __name__ == "__main__":
    main()
