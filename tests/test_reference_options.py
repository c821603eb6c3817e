"""The options that let a recipe match its reference exactly, each against a value computed by hand:
KL form, trained-step selection, EMA schedule, group std estimator and epsilon, per-reward advantage
weights, MixGRPO's window roll-back; and the ratio sanity check of the trainer's first update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from flowalign.config import ConfigError, load_config
from flowalign.ema import EMA
from flowalign.grpo.advantages import group_advantages, multi_reward_advantages
from flowalign.grpo.losses import mean_kl
from flowalign.grpo.objectives import PPOClip
from flowalign.grpo.trainer import _columns
from flowalign.sampling.plans import progressive_window_plan
from flowalign.sampling.steps import step_std

ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path, data: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


# ------------------------------------------------------------------ KL form


def test_kl_forms_exact_and_flow_grpo_code():
    # Flow-GRPO SDE, a = 0.7, step σ 0.8 → 0.7: σ_t = 0.7·√(0.8/0.2) = 1.4, transition std 1.4·√0.1
    std = step_std("flow_grpo", torch.tensor([0.8]), torch.tensor([0.7]), 0.7)
    assert float(std) == pytest.approx(1.4 * math.sqrt(0.1), rel=1e-6)
    mean = torch.zeros(1, 4, 2, 2)
    ref = torch.full((1, 4, 2, 2), 0.1)  # (μ_θ − μ_ref)² = 0.01 everywhere
    exact = mean_kl(mean, ref, std.reshape(1, 1, 1, 1))
    code = mean_kl(mean, ref, std.reshape(1, 1, 1, 1), "flow_grpo", torch.tensor([0.1]))
    assert float(exact) == pytest.approx(0.01 / (2 * 1.4 ** 2 * 0.1), rel=1e-5)  # 0.025510
    assert float(code) == pytest.approx(0.01 / (2 * 1.4 ** 2), rel=1e-5)  # 0.0025510: ÷2σ_t², no √Δt
    with pytest.raises(ValueError, match="needs dt_B"):
        mean_kl(mean, ref, std.reshape(1, 1, 1, 1), "flow_grpo")


def test_flow_grpo_kl_form_is_refused_for_other_sdes(tmp_path):
    with pytest.raises(ConfigError, match="train.kl_form=flow_grpo .* sampling.sde_kind=dance use train.kl_form=exact"):
        _load(tmp_path, {"model": {"family": "sd3"}, "sampling": {"sde_kind": "dance", "noise_level": 0.3},
                         "train": {"kl_form": "flow_grpo"}})


# ------------------------------------------------------------------ trained-step selection


def test_trained_steps_first_in_order_or_random():
    assert PPOClip.trained_columns(type("T", (), {"timestep_fraction": 0.99})(), 10) == 9  # int(10·0.99)
    first = _columns(3, 10, 9, False, torch.Generator().manual_seed(0))
    assert first.tolist() == [list(range(9))] * 3  # Flow-GRPO: steps 0..8, the last never trained
    drawn = _columns(3, 10, 9, True, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert drawn.tolist() == [torch.randperm(10, generator=g)[:9].tolist() for _ in range(3)]
    assert any(9 in row for row in drawn.tolist())  # DanceGRPO-style draws can train the last step


# ------------------------------------------------------------------ EMA schedule


def test_ema_every_step_constant_decay():
    p = torch.zeros(1)
    ema = EMA([p], 0.9)
    p.fill_(1.0)
    ema.update()
    assert float(ema.shadow[0]) == pytest.approx(0.1)
    ema.update()
    assert float(ema.shadow[0]) == pytest.approx(0.19)


def test_ema_flow_grpo_schedule_every_8_steps_with_warmup():
    p = torch.zeros(1)
    ema = EMA([p], 0.9, every=8, warmup=True)
    p.fill_(1.0)
    values = []
    for _ in range(15):
        ema.update()
        values.append(float(ema.shadow[0]))
    assert values[:6] == [0.0] * 6  # steps 1..6: (k+1) not a multiple of 8
    assert values[6] == pytest.approx(1 - 8 / 17)  # step 7: d = min(8/17, 0.9)
    assert values[13] == pytest.approx(1 - 8 / 17)
    assert values[14] == pytest.approx((16 / 25) * (9 / 17) + (9 / 25) * 1.0)  # step 15: d = 16/25 → 0.69882
    assert ema.current_decay(100) == 0.9 and ema.steps == 15


# ------------------------------------------------------------------ std estimator and epsilon


def test_group_std_population_or_unbiased_with_eps():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.zeros(4, dtype=torch.long)
    pop, _ = group_advantages(r, g)  # Flow-GRPO: np.std (÷n) + 1e-4
    assert pop.tolist() == pytest.approx([-1.5 / (math.sqrt(1.25) + 1e-4), -0.5 / (math.sqrt(1.25) + 1e-4),
                                          0.5 / (math.sqrt(1.25) + 1e-4), 1.5 / (math.sqrt(1.25) + 1e-4)], rel=1e-6)
    unb, _ = group_advantages(r, g, unbiased=True, eps=1e-8)  # DanceGRPO: torch .std() (÷(n−1)) + 1e-8
    assert unb.tolist() == pytest.approx([-1.5 / math.sqrt(5 / 3), -0.5 / math.sqrt(5 / 3), 0.5 / math.sqrt(5 / 3),
                                          1.5 / math.sqrt(5 / 3)], rel=1e-6)
    two = torch.tensor([0, 0, 1, 1])
    glob, _ = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.5]), two, std_mode="global", unbiased=True, eps=1e-8)
    # global unbiased std of [1, 3, 2, 2.5]: mean 2.125, Σ dev² = 2.1875, ÷3
    s = math.sqrt(2.1875 / 3)
    assert glob.tolist() == pytest.approx([-1 / s, 1 / s, -0.25 / s, 0.25 / s], rel=1e-5)


def test_std_options_reach_the_config(tmp_path):
    cfg = _load(tmp_path, {"model": {"family": "sd3"}, "train": {"adv_std": "unbiased", "adv_eps": 1e-8}})
    assert cfg.train.adv_std == "unbiased" and cfg.train.adv_eps == 1e-8
    with pytest.raises(ConfigError, match="train.adv_std"):
        _load(tmp_path, {"model": {"family": "sd3"}, "train": {"adv_std": "sample"}})


# ------------------------------------------------------------------ per-reward advantage weights


def test_pref_grpo_advantage_is_0_7_win_plus_1_4_clip():
    win = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    clip = torch.tensor([0.30, 0.31, 0.29, 0.30])
    g = torch.zeros(4, dtype=torch.long)
    adv, masked = multi_reward_advantages({"win_rate": win, "clip": clip}, {"win_rate": 0.7, "clip": 1.4}, g,
                                          mode="per_reward", unbiased=True, eps=1e-8, clip_max=5.0)
    # A_win: deviations ±1/2, ±1/6 over the unbiased std √(0.5556/3) = 0.430331; A_clip: ±0.01 / 0.0081650
    a_win = [-0.5 / 0.4303315, -1 / 6 / 0.4303315, 1 / 6 / 0.4303315, 0.5 / 0.4303315]
    a_clip = [0.0, 0.01 / 0.00816497, -0.01 / 0.00816497, 0.0]
    expected = [0.7 * w + 1.4 * c for w, c in zip(a_win, a_clip)]  # [-0.8133, 1.4435, -1.4435, 0.8133]
    assert adv.tolist() == pytest.approx(expected, abs=2e-4)
    assert not masked.any()


# ------------------------------------------------------------------ MixGRPO window roll-back


def test_progressive_window_rolls_back_like_mixgrpo():
    def recorded(it, **kw):
        return progressive_window_plan(10, 3, it, 1, **kw).record

    # capped (default): the window stops at the last full position N − w = 7
    assert [recorded(it) for it in (0, 7, 8, 20)] == [(0, 1, 2), (7, 8, 9), (7, 8, 9), (7, 8, 9)]
    # MixGRPO (roll_back, max_timesteps = N − 2 = 8): windows cut at step 8, back to the start after 7
    back = [recorded(it, rollback=True) for it in range(10)]
    assert back[:3] == [(0, 1, 2), (1, 2, 3), (2, 3, 4)]
    assert back[5:] == [(5, 6, 7), (6, 7), (7,), (0, 1, 2), (1, 2, 3)]
    # stride 2 from start 1: positions 1, 3, 5, 7, then 1 again
    assert [progressive_window_plan(10, 2, it, 2, stride=2, start=1, rollback=True).record[0]
            for it in range(0, 10, 2)] == [1, 3, 5, 7, 1]
    plan = progressive_window_plan(10, 3, 6, 1, rollback=True)
    assert plan.sde == tuple(i in (6, 7) for i in range(10))  # only the window is stochastic


def test_window_rollback_needs_the_progressive_window(tmp_path):
    with pytest.raises(ConfigError, match="sampling.window_rollback applies to sampling.plan=progressive_window"):
        _load(tmp_path, {"model": {"family": "sd3"}, "sampling": {"window_rollback": True}})
    with pytest.raises(ConfigError, match="window_start=8 must be below it"):
        _load(tmp_path, {"model": {"family": "sd3"}, "sampling": {"plan": "progressive_window", "window_size": 2,
                                                                   "window_start": 8, "window_rollback": True}})


# ------------------------------------------------------------------ the ratio sanity check


def test_ratio_is_one_before_the_first_update_and_a_mismatch_warns(tmp_path, capsys):
    from flowalign.grpo.trainer import GRPOTrainer
    from flowalign.models.testing import MAX_SEQUENCE_LENGTH, force_hub_offline, tiny_pipeline_dir

    force_hub_offline()
    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog on a cube\n")
    cfg = _load(tmp_path, {
        "model": {"family": "sd3", "path": str(tiny_pipeline_dir("sd3")), "dtype": "float32", "device": "cpu",
                  "lora_rank": 4, "lora_alpha": 8.0, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0},
        "train": {"prompts": str(prompts), "group_size": 4, "prompts_per_iteration": 2, "micro_batch_size": 4,
                  "num_iterations": 3, "mixed_precision": "fp32", "lr": 1e-2, "clip_range": 0.2,
                  "ratio_dev_warn": 0.005, "ema": True, "ema_every": 2, "ema_warmup": True},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "run": {"output_dir": str(tmp_path / "run"), "tracker": "none", "progress": False},
    })
    trainer = GRPOTrainer(cfg, log=lambda *_: None)
    batch = trainer.rollout(0)
    trainer.score(batch)
    metrics = trainer.update(batch, 0)
    assert metrics["train/optimizer_steps"] == 2
    assert metrics["train/ratio_dev_first_step"] < 1e-5  # fp32, same rows: the recomputed log-prob is the rollout's
    assert "train/ratio_dev" not in metrics and "warning" not in capsys.readouterr().err
    # a rollout whose recorded log-probs are 0.01 too low: before the first step every ratio is e^0.01
    batch = trainer.rollout(1)
    trainer.score(batch)
    batch.log_probs -= 0.01
    metrics = trainer.update(batch, 1)
    assert metrics["train/ratio_dev_first_step"] == pytest.approx(math.exp(0.01) - 1, abs=2e-5)
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "iteration 2: before any update" in warned[0] and "train.ratio_dev_warn" in warned[0]
    batch = trainer.rollout(2)  # the warning comes once a run; the metric every iteration
    trainer.score(batch)
    batch.log_probs -= 0.01
    assert trainer.update(batch, 2)["train/ratio_dev_first_step"] == pytest.approx(math.exp(0.01) - 1, abs=2e-5)
    assert "warning" not in capsys.readouterr().err
    # the EMA schedule (every 2 optimizer steps, warm-up) survives a checkpoint
    assert trainer.state.ema.steps == 6
    path = trainer.state.save(3)
    again = GRPOTrainer(cfg, log=lambda *_: None)
    assert again.state.load(path) == 3 and again.state.ema.steps == 6


# ------------------------------------------------------------------ DanceGRPO's --ignore_last


def test_ignore_last_keeps_the_last_step_stochastic_but_untrained(tmp_path):
    from flowalign.sampling.plans import full_sde_plan

    plan = full_sde_plan(16, include_last=True, record_last=False)
    assert plan.sde == (True,) * 16 and plan.record == tuple(range(15))
    assert PPOClip.trained_columns(type("T", (), {"timestep_fraction": 0.6})(), 15) == 9  # int(15·0.6)
    assert full_sde_plan(16, include_last=False).sde[-1] is False  # the other way: an ODE last step
    with pytest.raises(ConfigError, match="record_last_step=false.*include_last_step=true"):
        _load(tmp_path, {"model": {"family": "sd3"}, "sampling": {"include_last_step": False,
                                                                   "record_last_step": False}})
