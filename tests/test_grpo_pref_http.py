"""Pref-GRPO over HTTP: one training iteration whose reward is win rates from `flowalign judge-server`."""

from pathlib import Path

import torch
import yaml

from flowalign.config import load_config
from flowalign.grpo.logging import read_metrics
from flowalign.grpo.trainer import GRPOTrainer
from test_judges_http import Server

ROOT = Path(__file__).resolve().parents[1]


def test_pref_grpo_http_preset_trains_on_judge_win_rates(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = Server("--reward", "pocket_gold", "--reward-args", '{"score": "partial"}')
    try:
        cfg = yaml.safe_load((ROOT / "configs/pocket/pref_grpo_http.yaml").read_text())
        cfg["rewards"][0]["args"]["judge_args"]["endpoint"] = server.url
        cfg["sampling"].update(num_steps=4)
        cfg["train"].update(group_size=4, prompts_per_iteration=2, micro_batch_size=4, num_iterations=1)
        cfg["eval"]["prompts"] = None
        cfg["run"].update(output_dir=str(tmp_path / "run"), tracker="none", progress=False)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        trainer = GRPOTrainer(load_config(path), log=lambda *_: None)
        trainer.train()
    finally:
        server.close()
        torch.set_num_threads(threads)
    row = read_metrics(tmp_path / "run")[-1]
    # every image met every other image of its group once: the win rates of a group average 1/2
    assert abs(row["reward/win_rate/mean"] - 0.5) < 1e-6
    assert row["reward/win_rate/std"] > 0  # the judge told images apart
    assert row["train/optimizer_steps"] > 0
