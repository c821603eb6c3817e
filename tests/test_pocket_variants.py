"""benchmarks/pocket_variants.py: the variant table from grpo_pocket.py run folders (known inputs, known answers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("pocket_variants", ROOT / "benchmarks" / "pocket_variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_folder(folder: Path, base, tuned, cats, curve, rewards, wall):
    folder.mkdir(parents=True)
    prompts = [f"p{i}" for i in range(len(base))]
    (folder / "per_prompt_strict.json").write_text(json.dumps(
        {"prompts": prompts, "categories": cats, "correct": {"base": base, "tuned": tuned}}))
    (folder / "benchmark.json").write_text(json.dumps({"config": "c.yaml", "overrides": [], "train_wall_s": wall}))
    rows = [{"iteration": i + 1, "reward/total/mean": r} for i, r in enumerate(rewards)]
    rows += [{"iteration": it, "eval/pocket_gold/strict": v} for it, v in curve.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_table_pairs_seeds_per_prompt_and_averages_curves(tmp_path, capsys):
    mod = _load()
    cats = ["a", "a", "b", "b"]
    base = [0.0, 1.0, 0.0, 0.0]
    # seed 0 fixes prompts 0 and 2; seed 1 fixes prompt 0 and breaks prompt 1
    _run_folder(tmp_path / "arm_s0", base, [1.0, 1.0, 1.0, 0.0], cats, {0: 0.5, 10: 0.7}, [1, 1, 2, 2, 3, 3], 100)
    _run_folder(tmp_path / "arm_s1", base, [1.0, 0.0, 0.0, 0.0], cats, {0: 0.5, 10: 0.5}, [1, 1, 1, 1, 1, 1], 300)
    (tmp_path / "not_a_run").mkdir()
    out = tmp_path / "table.json"
    assert mod.main([str(tmp_path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["arms"]
    # per prompt over seeds: +1, -0.5, +0.5, 0 -> mean +0.25; sample std of (1, -0.5, 0.5, 0) / 2
    assert row["diff"] == pytest.approx(0.25)
    d = [1.0, -0.5, 0.5, 0.0]
    m = sum(d) / 4
    assert row["se"] == pytest.approx((sum((x - m) ** 2 for x in d) / 3) ** 0.5 / 2)
    assert row["wins"] == 3 and row["losses"] == 1
    assert row["per_category"]["a"]["diff"] == pytest.approx(0.25)
    assert row["per_category"]["b"]["diff"] == pytest.approx(0.25)
    assert row["tuned_per_seed"] == [0.75, 0.25]
    assert row["quick_eval"] == {"0": 0.5, "10": pytest.approx(0.6)}
    assert row["train_reward_thirds"] == [1.0, 1.5, 2.0]
    assert row["verdicts"] == {"arm_s0": "1110", "arm_s1": "1000"} and row["base_verdicts"] == "0100"
    assert "+0.250" in capsys.readouterr().out


def test_a_root_without_runs_names_the_fix(tmp_path, capsys):
    mod = _load()
    assert mod.main([str(tmp_path)]) == 2
    assert "run benchmarks/grpo_pocket.py first" in capsys.readouterr().err
    assert mod.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
