"""Running a script under a multi-process launcher (``torch.distributed.run``, ``accelerate launch``) from a test.

Rarely (once in CI at stop 29; none in 44 launches of the same test script on a loaded 2-core machine here) a
launched CPU process is aborted by the C++ runtime with "terminate called without an active exception" although
its script ends its process group, with no Python error before it (where in torch or gloo is not known yet).
Such a launch is run once more, with a warning that carries its output; any other failure, or the same abort
twice, fails the test. ``PYTHONFAULTHANDLER`` makes an aborted process print where every thread of it was, so the
warning says where the abort happened."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

TEARDOWN_ABORT = "terminate called without an active exception"


def _tail(res: subprocess.CompletedProcess, chars: int = 6000) -> str:
    """The end of stdout and stderr without progress-bar lines (they fill the tail and say nothing)."""
    err = "\n".join(line for line in res.stderr.splitlines() if "it/s]" not in line and "%|" not in line)
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-chars // 2:]}\n--- stderr\n{err[-chars:]}"


def run_launched(cmd: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a launcher command) with one thread per process and the hub offline; the completed process,
    or an ``AssertionError`` that shows the end of its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    res = launch()
    if res.returncode != 0 and TEARDOWN_ABORT in res.stderr:
        warnings.warn(f"a launched process was aborted ({TEARDOWN_ABORT!r}); launched once more. Its output:\n"
                      + _tail(res), stacklevel=2)
        res = launch()
    if res.returncode != 0:
        raise AssertionError(_tail(res))
    return res
