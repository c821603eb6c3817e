"""Model adapters: Cond batching, loading errors, dispatch, schedules read from scheduler configs."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowalign.models import load_policy, policy_class
from flowalign.models.base import Cond
from flowalign.models.testing import force_hub_offline, tiny_pipeline_dir

force_hub_offline()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost


def test_import_flowalign_models_is_light():
    code = (
        "import sys, flowalign, flowalign.models, flowalign.models.base\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cond_indexing_repeat_and_cat_keep_rows_aligned():
    cond = Cond(
        embeds=torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4),
        pooled=torch.arange(3.0).view(3, 1).expand(3, 5),
        neg_embeds=-torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4),
    )
    rep = cond.repeat_interleave(2)
    assert len(rep) == 6
    assert rep.embeds[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert rep.pooled[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert rep.neg_embeds[:, 0, 0].tolist() == [0, 0, -1, -1, -2, -2]
    assert rep.neg_pooled is None
    one = cond[1]
    assert one.embeds.shape == (1, 2, 4) and one.pooled[0, 0] == 1
    assert cond[-1].pooled[0, 0] == 2
    picked = cond[torch.tensor([2, 0])]
    assert picked.pooled[:, 0].tolist() == [2, 0]
    both = Cond.cat([cond[0:1], cond[2:3]])
    assert both.neg_embeds[:, 0, 0].tolist() == [0, -2]


def test_bad_path_raises_with_the_fix():
    with pytest.raises(ValueError, match="does not exist and is not a hub id"):
        policy_class("sd3").from_pretrained("/no/such/folder/sd35")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_unreachable_hub_id_raises_with_the_fix():
    with pytest.raises(ValueError, match="loading it as a hub id failed"):
        policy_class("sd3").from_pretrained("no-such-org/no-such-model")


def test_folder_without_model_index_raises(tmp_path):
    with pytest.raises(ValueError, match="has no model_index.json"):
        policy_class("flux").from_pretrained(tmp_path)


def test_wrong_family_names_both_pipelines_and_the_fix():
    expected = r"holds a FluxPipeline pipeline \(that is family 'flux'.*expects a StableDiffusion3Pipeline"
    with pytest.raises(ValueError, match=expected):
        policy_class("sd3").from_pretrained(tiny_pipeline_dir("flux_dev"))
    with pytest.raises(ValueError, match="family 'sd3'.*'sd_turbo' expects a StableDiffusionPipeline"):
        policy_class("sd_turbo").from_pretrained(tiny_pipeline_dir("sd3"))


def test_missing_component_is_named(tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(tiny_pipeline_dir("sd3"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no 'text_encoder_2' component.*needs \\['transformer'"):
        policy_class("sd3").from_pretrained(folder)

    shutil.rmtree(folder)
    shutil.copytree(tiny_pipeline_dir("sd3"), folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match="lists 'vae' \\(AutoencoderKL\\) but the folder .*vae is missing"):
        policy_class("sd3").from_pretrained(folder)


def test_load_policy_dispatches_on_family_with_model_config():
    from flowalign.config import ModelConfig

    cfg = ModelConfig(
        family="sd3", path=str(tiny_pipeline_dir("sd3_no_t5")), dtype="float32", device="cpu",
        train_mode="lora", lora_rank=4, lora_alpha=8.0, max_sequence_length=16,
    )
    policy = load_policy(cfg)
    assert type(policy).__name__ == "SD3Policy"
    assert policy.pipe.text_encoder_3 is None  # the pocket format: an SD3 folder without T5
    assert policy.denoiser.peft_config["default"].r == 4
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())

    with pytest.raises(ValueError, match="unknown model.family 'sdxl'"):
        load_policy(SimpleNamespace(family="sdxl"))


def test_lora_targets_that_match_nothing_name_the_family_defaults():
    cls = policy_class("sd_turbo")
    with pytest.raises(ValueError, match=r"match no module of the sd_turbo unet.*\['to_q', 'to_k'"):
        cls.from_pretrained(tiny_pipeline_dir("sd_turbo"), device="cpu", lora_targets=["attn.add_q_proj"])


# ---------------------------------------------------------------- schedules from scheduler configs

SCHEDULER_CONFIGS = {
    "sd3": dict(shift=3.0),
    "sd3_dynamic": dict(shift=3.0, use_dynamic_shifting=True),
    "flux_dev": dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                     base_shift=0.5, max_shift=1.15),
    "flux_schnell": dict(shift=1.0, use_dynamic_shifting=False),
}


def _pipeline_sigmas(kind: str, num_steps: int, seq_len: int) -> torch.Tensor:
    """The sigmas the stock pipeline asks its scheduler for (StableDiffusion3Pipeline / FluxPipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[kind])
    c = sched.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    if kind.startswith("sd3"):
        sched.set_timesteps(num_steps, mu=mu if c.use_dynamic_shifting else None)
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched.sigmas


@pytest.mark.parametrize("kind", sorted(SCHEDULER_CONFIGS))
@pytest.mark.parametrize("num_steps", [1, 4, 28])
@pytest.mark.parametrize("seq_len", [64, 1024, 4096])
def test_family_schedules_match_the_pipelines_scheduler(kind, num_steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.models.flux import flux_schedule
    from flowalign.models.sd3 import sd3_schedule

    schedule = sd3_schedule if kind.startswith("sd3") else flux_schedule
    ours = schedule(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[kind]).config, num_steps, seq_len)
    ref = _pipeline_sigmas(kind, num_steps, seq_len)
    assert ours.shape == (num_steps + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_shift_override_gives_the_static_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.models.flux import flux_schedule
    from flowalign.sampling.schedules import flux_sigmas

    cfg = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["flux_dev"]).config
    torch.testing.assert_close(flux_schedule(cfg, 6, 1024, shift=2.0), flux_sigmas(6, dynamic=False, shift=2.0))
    assert not torch.allclose(flux_schedule(cfg, 6, 1024), flux_sigmas(6, dynamic=False, shift=2.0))


def test_unsupported_scheduler_options_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.models.sd3 import sd3_schedule

    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True).config
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        sd3_schedule(cfg, 4, 1024)


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    from flowalign.models.flux import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 4, 6, 10)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 10), atol=0, rtol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), x, atol=0, rtol=0)
    # the pipeline unpacks from pixel sizes (vae_scale_factor 8 here)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 80, 8), x, atol=0, rtol=0)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(3, 5, "cpu", torch.float32), ref_ids, atol=0, rtol=0)
