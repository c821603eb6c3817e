"""The real `flowalign` command, run as a user runs it."""

import json
import subprocess
import sys

import pytest

import flowalign


def flowalign_cli(*args, check=False):
    return subprocess.run([sys.executable, "-m", "flowalign.cli", *args], capture_output=True, text=True, check=check)


def test_config_show_prints_resolved_config(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("sampling:\n  num_steps: 12\n")
    r = flowalign_cli("config", "show", str(p), "train.lr=1e-4")
    assert r.returncode == 0, r.stderr
    assert "num_steps: 12" in r.stdout and "lr: 0.0001" in r.stdout


def test_config_error_exit_code_and_message():
    r = flowalign_cli("config", "show", "train.lrr=1")
    assert r.returncode == 2
    assert "unknown config key 'train.lrr'; did you mean 'train.lr'?" in r.stderr


def test_config_keys_lists_help():
    r = flowalign_cli("config", "keys")
    assert r.returncode == 0 and "sampling.noise_level" in r.stdout and "SDE noise level" in r.stdout


def test_check_sampler_end_to_end(tmp_path):
    out = tmp_path / "report.json"
    r = flowalign_cli("check-sampler", "configs/check_sampler.yaml", "sampling.num_steps=100",
                      "--samples", "4000", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["match"] is True and report["samples"] == 4000
    assert max(abs(a - b) for a, b in zip(report["true_mass"], report["sampled_mass"])) <= 0.02
    # CPS is reported as not preserving the mixture, with exit code 1
    r = flowalign_cli("check-sampler", "configs/check_sampler.yaml", "sampling.sde_kind=cps",
                      "sampling.include_last_step=false", "sampling.num_steps=100", "--samples", "4000")
    assert r.returncode == 1 and "do NOT match" in r.stdout


def test_import_is_light():
    code = "import sys, flowalign, flowalign.config, flowalign.sampling; print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers','transformers','open_clip','peft','accelerate')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
