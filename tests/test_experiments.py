"""flowalign.experiments (the notebooks' helpers) on the pocket world: budget scaling, a real short
run and its curves, seed bands, advantage statistics against their formulas, noise-search snapshots."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowalign.config import load_config
from flowalign.experiments import (
    RunResult,
    SearchSnapshots,
    arm_difference,
    arm_summary,
    collect_groups,
    group_advantage_stats,
    pair_agreement,
    paired_difference,
    run_grpo,
    scale_budget,
    seed_band,
)
from flowalign.pocket.prompts import load_prompt_file, write_prompt_subset

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "pocket"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_write_prompt_subset(tmp_path):
    out = write_prompt_subset(ROOT / "prompts/pocket/test_96.jsonl", tmp_path / "sub.jsonl", 2)
    rows = load_prompt_file(out)
    cats = [r["category"] for r in rows]
    assert len(rows) == 12 and all(cats.count(c) == 2 for c in set(cats)) and len(set(cats)) == 6
    first = [json.loads(line) for line in (ROOT / "prompts/pocket/test_96.jsonl").read_text().splitlines()][:2]
    assert [r["prompt"] for r in rows[:2]] == [r["prompt"] for r in first]
    with pytest.raises(ValueError, match="jsonl"):
        write_prompt_subset(ROOT / "prompts/pocket/test_96.jsonl", tmp_path / "sub.txt", 2)


@pytest.mark.parametrize("preset, divisor", [("flow_grpo", 2), ("tempflow_grpo", 2), ("dance_grpo", 4)])
def test_scale_budget_keeps_optimizer_steps_per_iteration(preset, divisor):
    cfg = load_config(PRESETS / f"{preset}.yaml")
    recipe_iterations = cfg.train.num_iterations
    small = scale_budget(cfg, num_iterations=9, prompts_per_iteration=4, group_divisor=divisor)
    t0, t1 = cfg.train, small.train
    assert (t1.num_iterations, t1.prompts_per_iteration, t1.group_size) == (9, 4, t0.group_size // divisor)
    steps = lambda t: math.ceil(t.group_size * t.prompts_per_iteration / t.micro_batch_size)
    assert steps(t1) == steps(t0)
    assert cfg.train.num_iterations == recipe_iterations != 9  # the recipe itself is untouched


@pytest.mark.parametrize("preset", ["prdp", "dragon"])
def test_scale_budget_keeps_whole_groups_per_micro_batch_for_group_objectives(preset):
    cfg = load_config(PRESETS / f"{preset}.yaml")  # 8 groups of 16, micro-batches of 32 = 2 groups
    small = scale_budget(cfg, num_iterations=2, prompts_per_iteration=2, group_divisor=4)  # 2 groups of 4
    # 32·8/128 = 2 images would split a group of 4 (validate_config refuses it): one whole group instead
    assert (small.train.group_size, small.train.micro_batch_size) == (4, 4)
    small = scale_budget(cfg, num_iterations=2, prompts_per_iteration=4, group_divisor=2)
    assert (small.train.group_size, small.train.micro_batch_size) == (8, 8)


def test_scale_budget_moves_the_mix_window_over_the_shorter_run():
    cfg = load_config(PRESETS / "mix_grpo.yaml")  # 30 iterations, window moves every 10
    assert (cfg.train.num_iterations, cfg.sampling.window_shift_interval) == (30, 10)
    small = scale_budget(cfg, num_iterations=6, prompts_per_iteration=2)
    assert small.sampling.window_shift_interval == 2


def test_load_config_finds_recipe_prompts_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(PRESETS / "flow_grpo.yaml")
    assert Path(cfg.train.prompts) == ROOT / "prompts/pocket/train.jsonl"
    assert Path(cfg.eval.prompts) == ROOT / "prompts/pocket/test_96.jsonl"
    cfg = load_config(PRESETS / "flow_grpo.yaml", ["train.prompts=nowhere.txt"])
    assert cfg.train.prompts == "nowhere.txt"  # not found anywhere: left for the trainer to report


def _tiny_pocket_cfg(tmp_path, preset="flow_grpo", *extra):
    evalset = write_prompt_subset(ROOT / "prompts/pocket/test_96.jsonl", tmp_path / "eval.jsonl", 1)
    cfg = load_config(PRESETS / f"{preset}.yaml", [
        f"eval.prompts={evalset}", "eval.every=1", "sampling.eval_num_steps=4", "run.tracker=none",
        "run.progress=false", f"run.output_dir={tmp_path / 'run'}", "train.lr=0.01", *extra])
    return scale_budget(cfg, num_iterations=2, prompts_per_iteration=2, group_divisor=8)


def test_run_grpo_trains_and_reads_its_curves(tmp_path):
    """Also after something else in this process (a notebook cell, a bf16 recipe) set up accelerate
    with another mixed precision: accelerate refuses a second Accelerator with another one."""
    from accelerate import Accelerator

    Accelerator(mixed_precision="bf16", cpu=True)
    cfg = _tiny_pocket_cfg(tmp_path)
    assert cfg.train.mixed_precision != "bf16"
    run = run_grpo(cfg)
    key = "eval/pocket_gold/strict"
    its, vals = run.curve(key)
    assert its == [0.0, 1.0, 2.0] and all(0 <= v <= 1 for v in vals)
    secs, _ = run.curve(key, x="train_s")
    assert secs[0] == 0 and secs[0] < secs[1] < secs[2] < run.wall_s
    assert (run.output_dir / "final/lora").is_dir()
    # the run did train: the LoRA weights left their zero start
    from safetensors.torch import load_file

    weights = load_file(str(next((run.output_dir / "final/lora").glob("*.safetensors"))))
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k or "lora_up" in k)
    # fresh: a second call starts over instead of resuming the finished run
    again = run_grpo(cfg)
    assert [r["iteration"] for r in again.metrics] == [r["iteration"] for r in run.metrics]
    with pytest.raises(ValueError, match="missing"):
        run.curve("eval/missing")


def test_run_grpo_refuses_to_delete_a_folder_that_is_not_a_run(tmp_path):
    cfg = _tiny_pocket_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        run_grpo(cfg)
    assert (tmp_path / "run" / "notes.txt").exists()


def test_seed_band_and_arm_summary():
    band = seed_band([([0, 1, 2], [0.5, 0.6, 0.7]), ([0, 2, 4], [0.5, 0.4, 0.9])])
    np.testing.assert_allclose(band.x, [0, 1.5, 3])
    np.testing.assert_allclose(band.mean, [0.5, 0.5, 0.8])
    np.testing.assert_allclose(band.std, [0, np.std([0.6, 0.4], ddof=1), np.std([0.7, 0.9], ddof=1)])
    np.testing.assert_allclose(band.min, [0.5, 0.4, 0.7])
    assert seed_band([([0, 1], [1.0, 2.0])]).std.tolist() == [0, 0]
    with pytest.raises(ValueError, match="same iterations"):
        seed_band([([0, 1], [1, 2]), ([0], [1])])

    cfg = load_config(PRESETS / "flow_grpo.yaml", ["train.num_iterations=4"])

    def fake(values, secs):  # metrics rows as the trainer logs them
        rows = [{"iteration": 0, "eval/x": values[0]}]
        rows += [{"iteration": i, "time/iteration_s": secs, **({"eval/x": values[i // 2]} if i % 2 == 0 else {})}
                 for i in range(1, 5)]
        return RunResult(cfg, Path("."), rows, 0.0)

    rows = arm_summary({"a": [fake([0.5, 0.6, 0.7], 1.0), fake([0.5, 0.5, 0.9], 3.0)]}, "eval/x")
    (row,) = rows
    assert row["seeds"] == 2 and row["start"] == 0.5 and row["final"] == pytest.approx(0.8)
    assert row["gain"] == pytest.approx(0.3) and row["final_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert row["mean_curve"] == pytest.approx(np.mean([0.6, 0.7, 0.5, 0.9]))
    assert row["train_s"] == pytest.approx(8.0) and row["s_per_iter"] == pytest.approx(2.0)

    rows = arm_summary({"a": [fake([0.5, 0.6, 0.7], 1.0), fake([0.5, 0.5, 0.9], 3.0)],
                        "b": [fake([0.5, 0.5, 0.5], 1.0)]}, "eval/x")
    d, se = arm_difference(rows, "a", "b", "final")
    assert d == pytest.approx(0.3) and se == pytest.approx(np.std([0.7, 0.9], ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="no arm 'c'"):
        arm_difference(rows, "a", "c")


def test_group_advantage_stats_against_the_formula():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.001, 7.0, 7.0, 7.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    s = group_advantage_stats(r, g)
    assert s["group_id"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(s["reward_std"], [np.std([1, 2, 3]), np.std([5, 5, 5.001]), 0], rtol=1e-3)
    np.testing.assert_allclose(s["reward_range"], [2, 0.001, 0], atol=1e-6)
    # per-prompt std: the 0.001 gap gets (almost) the advantage size of the 2.0 gap
    expect = np.mean(np.abs([-1, 0, 1])) / np.std([1, 2, 3])
    assert s["adv_per_prompt"][0] == pytest.approx(expect, rel=1e-3)
    assert s["adv_per_prompt"][1] > 0.8 * expect and s["adv_per_prompt"][2] == 0
    # global std: the tiny gap stays tiny
    gstd = float(r.std(unbiased=False))
    assert s["adv_global"][0] == pytest.approx(np.mean(np.abs([-1, 0, 1])) / gstd, rel=1e-3)
    assert s["adv_global"][1] < 1e-3


def test_pair_agreement_bins_pairs_by_proxy_gap():
    # group 0: proxy agrees with gold on a large gap; group 1: tiny gap, reversed; group 2: gold tie
    proxy = torch.tensor([0.0, 10.0, 5.0, 5.01, 3.0, 4.0])
    gold = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    scale = float(proxy.double().std(unbiased=False))
    rows = pair_agreement(proxy, gold, ids, edges=[0.0, 0.5])
    assert [(r["lo"], r["hi"], r["pairs"]) for r in rows] == [(0.0, 0.5, 1), (0.5, math.inf, 1)]
    assert rows[0]["agree"] == 0.0 and rows[1]["agree"] == 1.0
    assert 0.01 / scale < 0.5 < 10 / scale
    assert math.isnan(pair_agreement(proxy, gold, ids, edges=[0.0, 100.0])[1]["agree"])


def test_collect_groups_scores_real_groups(tmp_path):
    from flowalign.grpo import GRPOTrainer
    from flowalign.rewards import build_reward

    cfg = _tiny_pocket_cfg(tmp_path)  # 2 prompts × group of 2
    trainer = GRPOTrainer(cfg, log=lambda *_: None)
    before = [p.detach().clone() for p in trainer.params]
    got = collect_groups(trainer, range(2), {"gold": build_reward("pocket_gold", score="partial"),
                                             "pref": build_reward("win_rate", judge="from_pointwise",
                                                                  judge_args={"reward": "pocket_gold"})})
    assert got.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert got.images.shape == (8, 3, 32, 32) and len(got.prompts) == 8
    assert ((got.scores["gold"] >= 0) & (got.scores["gold"] <= 1)).all()
    # win rates within a pair of images are p and 1 - p
    pref = got.scores["pref"].view(4, 2)
    torch.testing.assert_close(pref.sum(1), torch.ones(4))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))  # nothing trained


def test_search_snapshots_keep_the_best_so_far():
    from flowalign.noise_opt import best_of_n_batch, reno_batch
    from flowalign.pocket.sample import load_pocket_policy
    from flowalign.rewards import build_reward

    policy = load_pocket_policy()
    reward = build_reward("pocket_clip", device="cpu")
    prompts = ["a red circle", "two blue squares"]
    snaps = SearchSnapshots([1, 3])
    res = reno_batch(policy, reward, prompts, iterations=3, optimizer="adam", lr=0.3, num_steps=2,
                     checkpoint=False, on_iteration=snaps)
    torch.testing.assert_close(snaps.iterate[1], torch.stack([r.initial_image for r in res]))
    torch.testing.assert_close(snaps.best[3], torch.stack([r.best_image for r in res]))
    for b, r in enumerate(res):
        assert snaps.best_reward[1][b] == pytest.approx(r.history[0]["reward_total"])
        assert snaps.best_reward[3][b] == pytest.approx(max(h["reward_total"] for h in r.history))
    snaps = SearchSnapshots([2])
    res = best_of_n_batch(policy, reward, prompts, num=2, num_steps=2, on_iteration=snaps)
    torch.testing.assert_close(snaps.best[2], torch.stack([r.best_image for r in res]))
    with pytest.raises(ValueError, match=">= 1"):
        SearchSnapshots([0])


def test_paired_difference_averages_seeds_per_prompt_before_the_standard_error():
    # two seeds, four prompts: per-prompt mean differences 1, 0, 0.5, -0.5 -> diff 0.25
    a = [[1, 1, 1, 0], [1, 0, 1, 0]]
    b = [[0, 1, 0, 1], [0, 0, 1, 0]]
    r = paired_difference(a, b)
    d = np.array([1.0, 0.0, 0.5, -0.5])
    assert r["diff"] == pytest.approx(0.25) == pytest.approx(r["mean_a"] - r["mean_b"])
    assert r["se"] == pytest.approx(d.std(ddof=1) / 2)  # over 4 prompts, not 8 cells
    assert r["ci95"] == pytest.approx((0.25 - 1.96 * r["se"], 0.25 + 1.96 * r["se"]))
    assert (r["wins"], r["losses"], r["ties"], r["prompts"], r["seeds"]) == (3, 1, 4, 4, 2)
    same = paired_difference([1, 0, 1], [1, 0, 1])
    assert same["diff"] == 0 and same["se"] == 0 and same["wins"] == same["losses"] == 0
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([1, 0], [1, 0, 1])
