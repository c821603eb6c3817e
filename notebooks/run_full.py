"""Execute the notebooks top to bottom and save their outputs in place (what gets committed).

    python notebooks/run_full.py                       # all five, full budget, outputs saved in the .ipynb files
    python notebooks/run_full.py 02_grpo_variants      # one of them
    python notebooks/run_full.py --quick --no-save     # the tiny budget the tests use, files left unchanged

Each notebook runs in a fresh kernel (the ``python3`` kernel of this interpreter) with the notebooks
folder as its working folder; runs are written under ``--out`` (``FLOWALIGN_NOTEBOOK_OUT``, default
``runs/notebooks``). Prints each notebook's wall time. Needs ``pip install -e ".[notebooks]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ["01_quickstart", "02_grpo_variants", "03_reward_hacking", "04_noise_optimization", "05_objectives"]


def execute(path: Path, *, quick: bool, out: Path, save: bool) -> float:
    """Run one notebook in a fresh kernel; returns its wall time in seconds (raises on a cell error)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {"FLOWALIGN_NOTEBOOK_OUT": str(out)}
    if quick:
        env["FLOWALIGN_NOTEBOOK_QUICK"] = "1"
    saved = {k: os.environ.get(k) for k in (*env, "FLOWALIGN_NOTEBOOK_QUICK")}
    os.environ.pop("FLOWALIGN_NOTEBOOK_QUICK", None)
    os.environ.update(env)  # the kernel inherits this environment
    try:
        t0 = time.time()
        NotebookClient(nb, timeout=None, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        wall = time.time() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if save:
        nbformat.write(nb, path)
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=NOTEBOOKS, help=f"notebooks to run (default: all: {NOTEBOOKS})")
    ap.add_argument("--quick", action="store_true", help="tiny budget (FLOWALIGN_NOTEBOOK_QUICK=1)")
    ap.add_argument("--no-save", action="store_true", help="do not write the outputs into the .ipynb files")
    ap.add_argument("--out", default=os.environ.get("FLOWALIGN_NOTEBOOK_OUT", str(HERE.parent / "runs" / "notebooks")),
                    help="folder for the notebooks' runs")
    ns = ap.parse_args(argv)
    unknown = [n for n in ns.names if n.removesuffix(".ipynb") not in NOTEBOOKS]
    if unknown:
        print(f"unknown notebook(s) {unknown}; choose from {NOTEBOOKS}", file=sys.stderr)
        return 2
    total = 0.0
    for name in ns.names:
        name = name.removesuffix(".ipynb")
        wall = execute(HERE / f"{name}.ipynb", quick=ns.quick, out=Path(ns.out), save=not ns.no_save)
        total += wall
        print(f"{name}: {wall:.0f} s ({wall / 60:.1f} min)", flush=True)
    print(f"total: {total:.0f} s ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
