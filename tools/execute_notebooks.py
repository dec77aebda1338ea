"""Execute lessons top to bottom in a fresh python3 kernel and save them, as strict nbval wants.

    python tools/execute_notebooks.py lessons/03_nf4.ipynb [more.ipynb ...]

Each notebook runs in its own fresh kernel with the lessons/ folder as working directory; the
stored outputs, execution counts 1, 2, 3, ... and kernelspec python3 are written back, without
nbclient's per-cell timestamps (so a re-run changes the file only where an output changed). A cell
that raises stops that notebook (nothing is saved for it) and the script exits non-zero.
Prints each notebook's wall time, which is what the README's lesson table reports.
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                                 "name": "python3"}
    start = time.perf_counter()
    NotebookClient(nb, kernel_name="python3", timeout=900,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:                   # no run timestamps: re-runs diff only where outputs do
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return seconds


def main(paths) -> int:
    failed = 0
    for p in map(Path, paths):
        try:
            print(f"{p}: {execute(p):.1f} s", flush=True)
        except CellExecutionError as e:
            failed += 1
            print(f"{p}: FAILED\n{str(e)[-3000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
