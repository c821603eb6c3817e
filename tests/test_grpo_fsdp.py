"""FSDP2 through accelerate on 2 CPU processes (gloo), launched with the shipped launch file
(``accelerate launch --config_file configs/accelerate/fsdp_full_ft.yaml``): full fine-tuning with KL and
EMA trains on shards exactly as one process does on the same images; checkpoints hold the gathered
weights and the sharded optimizer state, a resume is exact, and the final export is a whole diffusers
transformer folder, not a shard; LoRA on shards exports a LoRA the stock pipeline loads; FSDP1 is refused."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from _launch import run_launched
from test_grpo_distributed import _BATCH_FIELDS, _joined

from flowalign.models.testing import MAX_SEQUENCE_LENGTH, force_hub_offline, tiny_pipeline_dir

force_hub_offline()
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# the one-process comparison: 2 inner epochs (the second one's ratios move), no eval; per process 4 images in
# micro-batches of 2, accumulated into one optimizer step per epoch (one process: 8 images, 4 micro-batches)
EQUALITY = ["train.num_inner_epochs=2", "eval.prompts=null"]

# accelerate turns FSDP on only for accelerator devices (on CPUs its state stays MULTI_CPU), while torch's
# FSDP2 runs on CPUs with gloo; so the script selects FSDP on the accelerator the trainer is given, with the
# plugin accelerate builds from the launch file's settings (the FSDP_* variables `accelerate launch` set).
FSDP_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from flowalign.config import ConfigError, load_config
from flowalign.grpo.trainer import GRPOTrainer

acc = Accelerator(cpu=True, mixed_precision="no")
# (on PartialState too: every AcceleratorState() copies its fields)
PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP
acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
assert acc.is_fsdp2, acc.state.fsdp_plugin


EQUALITY, FIELDS = %r, %r


def run(overrides):
    acc.free_memory()  # forget the previous run's model and optimizer (one trainer per process in real runs)
    tr = GRPOTrainer(load_config(sys.argv[1], overrides), accelerator=acc, log=print)
    tr.train()
    return tr


straight = run([f"run.output_dir={sys.argv[2]}/straight"])
assert all(isinstance(p, DTensor) for p in straight.params)
local = sum(p.to_local().numel() for p in straight.params)
full = sum(p.numel() for p in straight.params)
weights, ema = straight.state._gathered(straight.params), straight.state._gathered(straight.state.ema.shadow)
run([f"run.output_dir={sys.argv[2]}/resumed", "train.num_iterations=1"])
resumed = run([f"run.output_dir={sys.argv[2]}/resumed"])
assert resumed.state.sharded and all(isinstance(p, DTensor) for p in resumed.params)
weights_r, ema_r = resumed.state._gathered(resumed.params), resumed.state._gathered(resumed.state.ema.shadow)
# LoRA under FSDP2: bfloat16 frozen base and float32 adapters sharded in the same blocks
lora = run([f"run.output_dir={sys.argv[2]}/lora", "model.train_mode=lora", "model.lora_rank=4", "model.dtype=bfloat16",
            "train.reference_device=model", "train.num_iterations=1"])
assert lora.state.sharded
assert {p.dtype for p in lora.policy.denoiser.parameters() if not p.requires_grad} == {torch.bfloat16}
lora_weights, lora_ema = lora.state._gathered(lora.params), lora.state._gathered(lora.state.ema.shadow)
# iterations as train_iteration runs them, keeping the rollouts and the gathered weights after every optimizer step
acc.free_memory()
eq = GRPOTrainer(load_config(sys.argv[1], EQUALITY + [f"run.output_dir={sys.argv[2]}/eq"]), accelerator=acc,
                 log=print)
after_steps, batches = [], []
eq.optimizer.optimizer.register_step_post_hook(lambda *_: after_steps.append(eq.state._gathered(eq.params)))
for it in range(2):
    batch = eq.rollout(it)
    eq.score(batch)
    batches.append({k: getattr(batch, k) for k in FIELDS} | {"prompts": batch.prompts, "metadata": batch.metadata,
                                                             "cond": batch.cond, "advantages": batch.advantages})
    batches[-1]["grad_norm"] = eq.update(batch, it)["train/grad_norm"]
torch.save({"batches": batches, "after_steps": after_steps}, f"{sys.argv[2]}/eq.{acc.process_index}.pt")
# FSDP1 (flat parameters) is refused with the fix
acc.free_memory()
acc.state.fsdp_plugin.fsdp_version = 1  # (accelerate builds an FSDP1 plugin only where a GPU is)
try:
    GRPOTrainer(load_config(sys.argv[1], [f"run.output_dir={sys.argv[2]}/fsdp1"]), accelerator=acc, log=print)
    refused = None
except ConfigError as err:
    refused = str(err)
if acc.is_main_process:
    open(f"{sys.argv[2]}/fsdp1.txt", "w").write(str(refused))
    torch.save({"names": lora.state.names, "weights": lora_weights, "ema": lora_ema}, f"{sys.argv[2]}/lora.pt")
if acc.is_main_process:
    torch.save({"names": straight.state.names, "weights": weights, "ema": ema, "weights_resumed": weights_r,
                "ema_resumed": ema_r, "local": local, "full": full, "world": acc.num_processes},
               f"{sys.argv[2]}/result.pt")
acc.end_training()  # a process leaving with the group alive may abort ("terminate called without an active exception")
""" % (EQUALITY, _BATCH_FIELDS)


def fsdp_config(tmp_path: Path) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog on a cube\n")
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("a green ball\n")
    return {
        "model": {"family": "sd3", "path": str(tiny_pipeline_dir("sd3")), "dtype": "float32", "device": "cpu",
                  "train_mode": "full", "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0, "share_group_noise": False,
                     "eval_num_steps": 2},
        "train": {"prompts": str(prompts), "group_size": 4, "prompts_per_iteration": 2, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 2, "num_iterations": 2, "mixed_precision": "fp32", "lr": 1e-3,
                  "clip_range": 1e-3, "kl_beta": 0.1, "reference_device": "cpu", "ema": True, "ema_decay": 0.5},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "eval": {"prompts": str(eval_prompts), "every": 1, "batch_size": 2},
        "run": {"output_dir": str(tmp_path / "run"), "tracker": "none", "progress": False, "save_every": 1},
    }


def test_fsdp2_full_finetuning_saves_whole_weights_and_resumes_exactly(tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(yaml.safe_dump(fsdp_config(tmp_path)))
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/fsdp_full_ft.yaml"), "--num_processes", "2", str(script), str(cfg),
           str(tmp_path)]
    res = run_launched(cmd, cwd=ROOT, timeout=600)
    assert "resumed from" in res.stdout
    out = torch.load(tmp_path / "result.pt", weights_only=False)
    assert out["world"] == 2
    assert out["local"] < 0.75 * out["full"]  # each process holds about half of the trained weights
    names = out["names"]

    base = SD3Transformer2DModel.from_pretrained(tiny_pipeline_dir("sd3") / "transformer").state_dict()
    assert len(names) == len(dict(SD3Transformer2DModel.from_pretrained(
        tiny_pipeline_dir("sd3") / "transformer").named_parameters()))  # full fine-tuning: every weight
    moved = [n for n, w in zip(names, out["weights"]) if not torch.equal(w, base[n])]
    assert len(moved) > len(names) // 2

    # the checkpoint: whole tensors (the gathered shards), the optimizer state sharded by both processes
    ck = tmp_path / "straight/checkpoints/iter_000002"
    saved = load_file(str(ck / "trainable.safetensors"))
    assert all(torch.equal(saved[n], w) for n, w in zip(names, out["weights"]))
    assert all(saved[n].shape == base[n].shape for n in names)
    ema_saved = load_file(str(ck / "ema.safetensors"))
    assert all(torch.equal(ema_saved[n], e) for n, e in zip(names, out["ema"]))
    assert not (ck / "optimizer.pt").exists()
    assert len(list((ck / "optimizer").glob("*.distcp"))) == 2
    from flowalign.grpo.state import verify_checkpoint

    assert verify_checkpoint(ck) is None  # the shard files are hashed with the others

    # stopped after iteration 1 and resumed: the same weights and EMA bit for bit
    assert all(torch.equal(a, b) for a, b in zip(out["weights"], out["weights_resumed"]))
    assert all(torch.equal(a, b) for a, b in zip(out["ema"], out["ema_resumed"]))

    # the export: the gathered EMA as a whole transformer folder the stock classes load
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "straight/final/transformer").state_dict()
    assert exported.keys() == base.keys()
    assert all(torch.equal(exported[n], e) for n, e in zip(names, out["ema"]))
    assert any(not torch.equal(exported[n], w) for n, w in zip(names, out["weights"]))  # EMA, not the last step
    resumed = SD3Transformer2DModel.from_pretrained(tmp_path / "resumed/final/transformer").state_dict()
    assert all(torch.equal(resumed[k], exported[k]) for k in exported)
    # sharded evaluation: every process sampled, the main one scored and wrote the grid
    assert (tmp_path / "straight/eval/iter_000002.png").is_file()

    # LoRA on shards (bfloat16 base, float32 adapters): the export is the gathered EMA, loadable by the stock pipeline
    import re

    from flowalign.models.testing import load_stock_pipeline

    lora = torch.load(tmp_path / "lora.pt", weights_only=False)
    assert all("lora_" in n for n in lora["names"])
    pipe = load_stock_pipeline("sd3")
    pipe.load_lora_weights(str(tmp_path / "lora/final/lora"))
    plain = lambda n: re.sub(r"\.default(_\d+)?\.", ".", n)
    loaded = {plain(n): p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    ema = {plain(n): e for n, e in zip(lora["names"], lora["ema"])}
    assert loaded.keys() == ema.keys()
    assert all(torch.equal(loaded[n].float(), ema[n].float()) for n in ema)
    assert any(not torch.equal(e, w) for e, w in zip(lora["ema"], lora["weights"]))
    assert "fsdp_version: 2" in (tmp_path / "fsdp1.txt").read_text()


    # one process on the same images (both processes' rollouts joined): the same weights after every step
    from flowalign.config import load_config
    from flowalign.grpo.trainer import GRPOTrainer

    parts = [torch.load(tmp_path / f"eq.{r}.pt", weights_only=False) for r in (0, 1)]
    one = GRPOTrainer(load_config(cfg, EQUALITY + ["train.gradient_accumulation_steps=4",
                                                   f"run.output_dir={tmp_path / 'one'}"]), log=lambda *_: None)
    after_steps = []
    one.optimizer.optimizer.register_step_post_hook(lambda *_: after_steps.append([p.detach().clone()
                                                                                    for p in one.params]))
    for it in range(2):
        batch = _joined(parts, it)
        one.score(batch)
        assert not batch.masked.any()
        torch.testing.assert_close(batch.advantages, torch.cat([p["batches"][it]["advantages"] for p in parts]))
        # the gradient's scale (which Adam would hide): FSDP averages over processes as one process does
        assert one.update(batch, it)["train/grad_norm"] == pytest.approx(parts[0]["batches"][it]["grad_norm"], rel=1e-4)
    assert len(after_steps) == len(parts[0]["after_steps"]) == 4  # 2 iterations × 2 inner epochs
    for step, (mine, theirs) in enumerate(zip(after_steps, parts[0]["after_steps"])):
        for a, b in zip(mine, theirs):  # (tolerance: see test_grpo_distributed)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, step=step: f"step {step}: {m}")
    assert sum(not torch.allclose(a, base[n], atol=1e-4) for n, a in zip(names, after_steps[-1])) > len(names) // 2
