"""Two processes (gloo, CPU) train as one: whole GRPO iterations (rollout, pairwise scoring with groups
gathered, backward, gradient accumulation, optimizer step, EMA) under ``torch.distributed.run`` leave
the same weights after every optimizer step as one process updating on the same images."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _launch import run_launched

from flowalign.config import ConfigError, load_config
from flowalign.grpo.config import Sizes
from flowalign.grpo.objectives import RolloutBatch
from flowalign.grpo.trainer import GRPOTrainer
from flowalign.models.base import Cond
from flowalign.models.testing import MAX_SEQUENCE_LENGTH, force_hub_offline, tiny_pipeline_dir

force_hub_offline()
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

ITERATIONS = 2
_BATCH_FIELDS = ("latents", "next_latents", "log_probs", "sigmas", "sigmas_next", "weights", "images", "finals",
                 "group_ids")


def ddp_config(tmp_path: Path, **train) -> dict:
    """4 prompt groups of 4 on the tiny SD3 model, scored by Pref-GRPO's win rate (a pairwise reward: whole
    groups judged on one process) plus a pointwise reward; per process 8 images in micro-batches of 4,
    accumulated into one optimizer step per inner epoch, 2 inner epochs (the second one clips)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog on a cube\na green ball\nthe photo of a cat\n")
    return {
        "model": {"family": "sd3", "path": str(tiny_pipeline_dir("sd3")), "dtype": "float32", "device": "cpu",
                  "lora_rank": 4, "lora_alpha": 8.0, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0,
                     "share_group_noise": False},
        "train": {"prompts": str(prompts), "group_size": 4, "prompts_per_iteration": 4, "micro_batch_size": 4,
                  "gradient_accumulation_steps": 2, "num_inner_epochs": 2, "num_iterations": ITERATIONS,
                  "mixed_precision": "fp32", "lr": 3e-3, "clip_range": 1e-4, "kl_beta": 0.04,
                  "max_grad_norm": 0.05, "ema": True, "ema_decay": 0.5, **train},
        "rewards": [{"name": "win_rate", "args": {"judge": "from_pointwise",
                                                 "judge_args": {"reward": "jpeg_incompressibility"}}},
                    {"name": "jpeg_incompressibility", "weight": 0.5}],
        "run": {"output_dir": str(tmp_path / "run"), "tracker": "none", "progress": False},
    }


# Each process runs the iterations as GRPOTrainer.train_iteration does (rollout, score, update), keeping its
# rollout and the weights after every optimizer step; then it checks that a pairwise reward whose groups
# cannot be placed whole on a process is refused.
DDP_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from flowalign.config import ConfigError, load_config
from flowalign.grpo.trainer import GRPOTrainer
cfg = load_config(sys.argv[1])
tr = GRPOTrainer(cfg, log=lambda *_: None)
after_steps, ema, batches, metrics = [], [], [], []
snapshot = lambda: [p.detach().clone() for p in tr.params]
tr.optimizer.optimizer.register_step_post_hook(lambda *_: after_steps.append(snapshot()))
for it in range(cfg.train.num_iterations):
    batch = tr.rollout(it)
    m = tr.score(batch)
    batches.append({k: getattr(batch, k) for k in %r} | {"prompts": batch.prompts, "metadata": batch.metadata,
                   "cond": batch.cond, "advantages": batch.advantages})
    m.update(tr.update(batch, it))
    ema.append([e.clone() for e in tr.state.ema.shadow])
    metrics.append(m)
torch.save({"rank": tr.rank, "world": tr.world, "after_steps": after_steps, "ema": ema, "batches": batches,
            "metrics": metrics}, sys.argv[2] + f".{tr.rank}.pt")
try:
    GRPOTrainer(load_config(sys.argv[1], ["train.prompts_per_iteration=3", "train.group_size=2"]),
                log=lambda *_: None)
    refused = None
except ConfigError as err:
    refused = str(err)
open(sys.argv[2] + f".{tr.rank}.refused", "w").write(json.dumps(refused))
tr.close()
""" % (_BATCH_FIELDS,)


def _launch_two(tmp_path: Path, cfg: dict) -> list[dict]:
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(path), str(tmp_path / "out")]
    run_launched(cmd, cwd=ROOT, timeout=300)
    return [torch.load(tmp_path / f"out.{r}.pt", weights_only=False) for r in (0, 1)]


def _joined(parts: list[dict], it: int) -> RolloutBatch:
    """The two processes' rollouts of iteration ``it`` as one batch, process 0's units first."""
    a, b = (p["batches"][it] for p in parts)
    return RolloutBatch(prompts=a["prompts"] + b["prompts"], metadata=a["metadata"] + b["metadata"],
                        cond=Cond.cat([a["cond"], b["cond"]]),
                        **{k: torch.cat([a[k], b[k]]) for k in _BATCH_FIELDS})


def test_two_processes_train_exactly_as_one_on_the_same_images(tmp_path):
    cfg = ddp_config(tmp_path)
    parts = _launch_two(tmp_path, cfg)
    assert [p["world"] for p in parts] == [2, 2]
    # 8 units per process in micro-batches of 4, 2 accumulated per step: one step per inner epoch
    assert [len(p["after_steps"]) for p in parts] == [2 * ITERATIONS] * 2
    for a, b in zip(parts[0]["after_steps"], parts[1]["after_steps"]):  # DDP keeps the replicas equal
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the groups were judged whole: group ids 0,1 on process 0 and 2,3 on process 1
    assert parts[0]["batches"][0]["group_ids"].unique().tolist() == [0, 1]
    assert parts[1]["batches"][0]["group_ids"].unique().tolist() == [2, 3]

    # one process: the same images, the global batch in micro-batches of 4 accumulated 4 times per step
    one = load_config(_write(tmp_path / "one.yaml", ddp_config(tmp_path, gradient_accumulation_steps=4)))
    tr = GRPOTrainer(one, log=lambda *_: None)
    start = [p.detach().clone() for p in tr.params]
    after_steps = []
    tr.optimizer.optimizer.register_step_post_hook(lambda *_: after_steps.append([p.detach().clone()
                                                                                   for p in tr.params]))
    for it in range(ITERATIONS):
        batch = _joined(parts, it)
        metrics = tr.score(batch)
        # the win rates within whole groups, normalised over all groups, equal the gathered ones
        torch.testing.assert_close(batch.advantages, torch.cat([p["batches"][it]["advantages"] for p in parts]),
                                   rtol=1e-5, atol=1e-6)
        assert metrics["reward/total/mean"] == pytest.approx(parts[0]["metrics"][it]["reward/total/mean"], rel=1e-6)
        assert not batch.masked.any()  # no flat group: every unit is trained in both runs
        metrics.update(tr.update(batch, it))
        assert metrics["train/optimizer_steps"] == parts[0]["metrics"][it]["train/optimizer_steps"] == 2
        assert metrics["train/clipfrac"] > 0  # the second inner epoch's ratios left the clip range
        assert metrics["train/grad_norm"] == pytest.approx(parts[0]["metrics"][it]["train/grad_norm"], rel=1e-4)
        for e_one, e_two in zip(tr.state.ema.shadow, parts[0]["ema"][it]):
            torch.testing.assert_close(e_one, e_two, rtol=1e-4, atol=1e-5)
    assert len(after_steps) == 2 * ITERATIONS
    for step, (mine, theirs) in enumerate(zip(after_steps, parts[0]["after_steps"])):
        for p_one, p_two in zip(mine, theirs):
            # Adam moves an element by ~lr whatever its gradient's size; one whose gradient is near Adam's eps
            # turns float noise into ~1e-6 (lr/3000), hence the absolute tolerance (the gradient's scale is
            # compared through grad_norm above, which Adam would hide)
            torch.testing.assert_close(p_one, p_two, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, step=step: f"step {step}: {m}")
    moved = sum(float((p - s).abs().max()) > 1e-4 for p, s in zip(after_steps[-1], start))
    assert moved > len(start) // 2  # the steps changed the weights well beyond the tolerance

    # a pairwise reward needs whole groups on one process: 3 groups over 2 processes are refused on both
    for r in (0, 1):
        refused = json.loads((tmp_path / f"out.{r}.refused").read_text())
        assert refused and "must be a multiple of the 2 processes" in refused


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_more_processes_than_images_is_refused_with_the_fix(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", ddp_config(tmp_path)))
    with pytest.raises(ConfigError, match="16 images per iteration cannot be split over 32 processes"):
        Sizes.of(cfg, 32, units_per_image=1, recorded_steps_per_unit=3)
