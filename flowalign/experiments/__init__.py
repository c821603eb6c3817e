"""Experiment helpers for notebooks and scripts, by theme: ``runs`` (train a config and read its
curves), ``statistics`` (compare variants over seeds and prompts), ``diagnostics`` (the advantages of
real groups, snapshots of a noise search).

    cfg = scale_budget(load_config("configs/pocket/flow_grpo.yaml", ["run.output_dir=runs/a"]),
                       num_iterations=10, prompts_per_iteration=4, group_divisor=2)
    run = run_grpo(cfg)                                  # a fresh run; RunResult
    run.curve("eval/pocket_gold/strict")                 # (iterations, values)
    run.curve("eval/pocket_gold/strict", x="train_s")    # against cumulative training seconds
    band = seed_band([r.curve(key) for r in runs])       # mean ± std over seeds

Everything here drives the public pieces (``GRPOTrainer``, ``read_metrics``, the advantage rules,
the noise-search callbacks) and returns plain numbers, so a notebook only plots.
"""

from .diagnostics import GroupScores, SearchSnapshots, collect_groups, group_advantage_stats, pair_agreement
from .runs import RunResult, run_grpo, scale_budget
from .statistics import Band, arm_difference, arm_summary, paired_difference, seed_band

__all__ = [
    "scale_budget", "RunResult", "run_grpo", "Band", "seed_band", "arm_summary", "arm_difference",
    "paired_difference", "GroupScores", "collect_groups",
    "group_advantage_stats", "pair_agreement", "SearchSnapshots",
]
