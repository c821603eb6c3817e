"""Full fine-tuning through the GRPO trainer: every transformer weight trained, the KL to a frozen copy
of the initial transformer (on the configured device and dtype), the EMA of the full weights, and the
final export as a diffusers transformer folder that the stock pipeline loads."""

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


def full_config(tmp_path: Path, **train) -> object:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog on a cube\n")
    data = {
        "model": {"family": "sd3", "path": str(tiny_pipeline_dir("sd3")), "dtype": "float32", "device": "cpu",
                  "train_mode": "full", "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0, "share_group_noise": False},
        "train": {"prompts": str(prompts), "group_size": 4, "prompts_per_iteration": 2, "micro_batch_size": 4,
                  "num_iterations": 2, "num_inner_epochs": 2, "mixed_precision": "fp32", "lr": 1e-3,
                  "clip_range": 1e-3, "kl_beta": 0.1, "ema": True, "ema_decay": 0.5, **train},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "run": {"output_dir": str(tmp_path / "run"), "tracker": "none", "progress": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _base_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(tiny_pipeline_dir("sd3") / "transformer")


def _velocities(policy, x, cond):
    with torch.no_grad():
        return policy.velocity(x, torch.full((len(x),), 0.6), cond, 2.0)


def test_full_finetuning_with_kl_to_a_frozen_copy_ema_and_a_stock_loadable_export(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    trainer = GRPOTrainer(full_config(tmp_path, reference_device="cpu"), log=lambda *_: None)
    policy = trainer.policy
    assert len(trainer.params) == len(list(policy.denoiser.parameters()))  # every weight is trained
    base = _base_transformer().state_dict()
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["train/optimizer_steps"] == 4 and rows[-1]["train/kl"] > 0  # the policy left its reference

    trained = policy.denoiser.state_dict()
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2  # full fine-tuning moved the base weights themselves
    # the reference is the transformer as loaded, untouched by training, on the configured device
    ref = policy._reference.module
    assert ref.device.type == "cpu" and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(base[k], v) for k, v in ref.state_dict().items())
    # policy.reference() runs it: the base model's velocity inside, the trained one's outside
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = policy.encode(["a red cat", "a green ball"])
    with policy.reference():
        v_ref = _velocities(policy, x, cond)
    v_policy = _velocities(policy, x, cond)
    with trainer.local_denoiser():
        trained_call = policy._denoiser_call
    policy.denoiser.load_state_dict(base)
    v_base = _velocities(policy, x, cond)
    policy.denoiser.load_state_dict(trained)
    torch.testing.assert_close(v_ref, v_base, rtol=0, atol=0)
    assert (v_policy - v_base).abs().max() > 1e-4
    assert trained_call is None and policy._denoiser_call is not None  # the wrapper is back after the context

    # the export is the EMA of the full weights (not the last step's), loadable by the stock pipeline
    final = tmp_path / "run/final/transformer"
    assert (final / "config.json").is_file()
    loaded = SD3Transformer2DModel.from_pretrained(final)
    ema = dict(zip(trainer.state.names, trainer.state.ema.shadow))
    exported = loaded.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(exported[k], trained[k]) for k in ema)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir("sd3"), transformer=loaded)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))

    def latents(p):
        return p("a red cat", num_inference_steps=2, guidance_scale=2.0, height=32, width=32, latents=noise.clone(),
                 max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent").images

    with trainer.state.ema_weights():
        in_memory = latents(StableDiffusion3Pipeline(**{**pipe.components, "transformer": policy.denoiser}))
    from_folder = latents(pipe)
    torch.testing.assert_close(from_folder, in_memory, rtol=0, atol=0)
    base_model = _base_transformer()
    from_base = latents(StableDiffusion3Pipeline(**{**pipe.components, "transformer": base_model}))
    assert (from_base - from_folder).abs().max() > 1e-4
    # and the trained policy's own sampler (EMA weights) draws the images the stock pipeline draws from the folder
    images = pipe("a red cat", num_inference_steps=2, guidance_scale=2.0, height=32, width=32, latents=noise.clone(),
                  max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt").images
    with trainer.local_denoiser(), trainer.state.ema_weights(), torch.no_grad():
        ours = policy.generate(noise, policy.encode(["a red cat"]), num_steps=2, guidance_scale=2.0)
    assert (ours - images).abs().max() < 1e-4 and images.std() > 1e-2


def test_the_reference_copy_can_be_kept_in_bfloat16(tmp_path):
    trainer = GRPOTrainer(full_config(tmp_path, reference_dtype="bfloat16", num_iterations=1), log=lambda *_: None)
    policy = trainer.policy
    ref = policy._reference.module
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.denoiser.parameters()} == {torch.float32}
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = policy.encode(["a red cat", "a green ball"])
    with policy.reference():
        v_ref = _velocities(policy, x, cond)
    v_policy = _velocities(policy, x, cond)  # still the initial weights: equal up to bfloat16 rounding
    assert v_ref.dtype == torch.float32
    assert 0 < (v_ref - v_policy).abs().max() < 0.1 * v_policy.abs().max()
    metrics = trainer.train_iteration(0)
    assert metrics["train/optimizer_steps"] == 4 and torch.isfinite(torch.tensor(metrics["train/kl"]))
