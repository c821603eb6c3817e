"""The GRPO trainer when things go wrong: non-finite numbers, corrupt or incompatible checkpoints, a
killed checkpoint write, a judge that fails; and a stopped + resumed run bit-identical to an
uninterrupted one with the text-embedding cache on."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from flowalign.config import load_config
from flowalign.grpo.logging import read_metrics
from flowalign.grpo.trainer import GRPOTrainer
from flowalign.models.testing import MAX_SEQUENCE_LENGTH, force_hub_offline, tiny_pipeline_dir

force_hub_offline()
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cat", "a blue dog on a cube", "two green birds", "a yellow car", "a purple hat", "an orange fish"]


def tiny_config(tmp_path: Path, out: str = "run", **sections) -> object:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = {
        "model": {"family": "sd3", "path": str(tiny_pipeline_dir("sd3")), "dtype": "float32", "device": "cpu",
                  "lora_rank": 4, "lora_alpha": 8.0, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0},
        "train": {"prompts": str(prompts), "group_size": 4, "prompts_per_iteration": 2, "micro_batch_size": 4,
                  "num_iterations": 4, "mixed_precision": "fp32", "lr": 1e-2, "clip_range": 0.2, "ema": True},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "run": {"output_dir": str(tmp_path / out), "tracker": "none", "progress": False, "save_every": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _quiet(cfg):
    return GRPOTrainer(cfg, log=lambda *_: None)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _final_lora(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final/lora/pytorch_lora_weights.safetensors"))


def test_stopped_and_resumed_run_is_bit_identical_with_the_embedding_cache(tmp_path):
    straight = tiny_config(tmp_path, "straight")
    assert straight.model.cache_text_embeddings
    _quiet(straight).train()
    # the same run stopped after 2 iterations, then resumed by a fresh process-like trainer (empty cache)
    _quiet(tiny_config(tmp_path, "stopped", train={"num_iterations": 2})).train()
    resumed = _quiet(tiny_config(tmp_path, "stopped"))
    resumed.train()
    assert resumed.iteration == 4
    a, b = _comparable(read_metrics(tmp_path / "straight")), _comparable(read_metrics(tmp_path / "stopped"))
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert a == b  # exactly: every value of every row
    wa, wb = _final_lora(tmp_path / "straight"), _final_lora(tmp_path / "stopped")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(r["train/optimizer_steps"] > 0 for r in a)
