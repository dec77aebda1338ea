"""`python -m minqlora [tour|bench]`: the course's story in one command.

    python -m minqlora [tour] [--seed N] [--quick] [--device cpu|cuda] [--plot PATH]
    python -m minqlora bench [--only SECTION ...] [--quick]

The tour (about 70 s on a 2-core CPU; --quick: about 35 s) prints, in the paper's order, the
sections listed in minqlora/tour.py (shown below in --help).
The bench runs speed checks against torchao / bitsandbytes where installed (minqlora/bench/).
What has and has not run on a GPU: the README's GPU section.
"""
import argparse

import torch


def main(argv=None) -> None:
    from . import tour as tour_module                     # its docstring lists the sections
    sections = tour_module.__doc__.split("\n\n")[1]
    parser = argparse.ArgumentParser(prog="python -m minqlora",
                                     description=f"{__doc__}\n{sections}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="tour", choices=["tour", "bench"],
                        help="tour (default): the whole story; bench: speed checks")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random tensor")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="tour: cpu or cuda (default: cuda when available)")
    parser.add_argument("--plot", metavar="PATH",
                        help="tour: save the loss curves (needs matplotlib)")
    parser.add_argument("--only", nargs="*", help="bench: only these sections")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.command == "bench":
        from .bench import run_bench
        run_bench(args.only, quick=args.quick)
    else:
        from .tour import tour
        tour(args.seed, args.quick, args.device, args.plot)


if __name__ == "__main__":
    main()
