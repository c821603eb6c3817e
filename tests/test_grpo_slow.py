"""Opt-in (FLOWALIGN_SLOW=1): the README's main job reaches its target on this machine's CPUs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flow_grpo_lifts_held_out_gold_accuracy(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/grpo_pocket.py"), "--out", str(out)], check=True,
                   cwd=ROOT, timeout=3600)
    report = json.loads((out / "benchmark.json").read_text())
    assert report["gain_strict"] >= 0.25, report["gain_strict"]
    assert report["train_wall_s"] <= 20 * 60, report["train_wall_s"]
