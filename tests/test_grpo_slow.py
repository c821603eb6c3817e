"""Opt-in (FLOWALIGN_SLOW=1): the README's main job reaches its target on this machine's CPUs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_main_job_lifts_held_out_gold_accuracy(tmp_path):
    """benchmarks/grpo_pocket.py with its default, the README's main job (configs/pocket/nft.yaml). Measured
    2026-11-30: +0.068 / +0.102 / +0.076 over 3 seeds, so this fails today: the target is not reached."""
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/grpo_pocket.py"), "--out", str(out)], check=True,
                   cwd=ROOT, timeout=3600)
    report = json.loads((out / "benchmark.json").read_text())
    assert report["gain_strict"] >= 0.25, report["gain_strict"]
    assert report["train_wall_s"] <= 20 * 60, report["train_wall_s"]
