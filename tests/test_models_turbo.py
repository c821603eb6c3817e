"""One-step UNet generators (SD-Turbo, SDXL-Turbo) against the stock diffusers pipelines."""

import pytest
import torch

from flowalign.models import policy_class
from flowalign.models.testing import (
    IMAGE_SIZE,
    force_hub_offline,
    load_stock_pipeline,
    tiny_pipeline_dir,
    tiny_sd_turbo_pipeline,
)

force_hub_offline()

PROMPTS = ["a red cat on a blue cube", "a photo of a green ball"]
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost


@pytest.fixture(scope="session", params=["sd_turbo", "sdxl_turbo"])
def kind(request):
    tiny_pipeline_dir(request.param)
    return request.param


def make_policy(kind, **options):
    return policy_class(kind).from_pretrained(tiny_pipeline_dir(kind), **{"device": "cpu", **options})


def make_noise(policy, batch=len(PROMPTS), seed=0):
    shape = policy.latent_shape(IMAGE_SIZE, IMAGE_SIZE)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def stock_output(pipe, noise, output_type):
    return pipe(
        PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
        output_type=output_type,
    ).images


@torch.no_grad()
def test_one_step_generation_reproduces_the_stock_pipeline(kind):
    policy = make_policy(kind, train_mode="none")
    assert policy.timestep == 999.0
    stock = load_stock_pipeline(kind)
    noise, cond = make_noise(policy), policy.encode(PROMPTS)

    x0 = policy.denoise(noise, cond)
    assert (x0 - stock_output(stock, noise, "latent")).abs().max() <= TOL
    images = policy.generate(noise, cond)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and images.std() > 1e-2
    assert (images - stock_output(stock, noise, "pt")).abs().max() <= TOL

    other = policy.denoise(noise, policy.encode(PROMPTS[::-1]))
    assert (other - x0).abs().max() > 1e-4  # the prompt reaches the output


def test_generator_gradients_reach_the_noise(kind):
    policy = make_policy(kind, train_mode="none")
    noise = make_noise(policy, batch=1).requires_grad_(True)
    policy.generate(noise, policy.encode(PROMPTS[:1])).mean().backward()
    assert torch.isfinite(noise.grad).all() and noise.grad.abs().max() > 0


def test_unet_lora_saves_for_the_stock_pipeline(tmp_path):
    policy = make_policy("sd_turbo", train_mode="lora", lora_rank=4, lora_alpha=8.0)
    noise, cond = make_noise(policy), policy.encode(PROMPTS)
    with torch.no_grad():
        base = policy.denoise(noise, cond)
        gen = torch.Generator().manual_seed(0)
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
        adapted = policy.denoise(noise, cond)
        assert (adapted - base).abs().max() > 1e-3
        with policy.reference():
            torch.testing.assert_close(policy.denoise(noise, cond), base, atol=1e-6, rtol=0)
    policy.save_adapter(tmp_path)
    stock = load_stock_pipeline("sd_turbo")
    stock.load_lora_weights(tmp_path)
    with torch.no_grad():
        assert (stock_output(stock, noise, "latent") - adapted).abs().max() <= TOL


def test_a_scheduler_other_than_euler_is_refused():
    from diffusers import DDIMScheduler

    pipe = tiny_sd_turbo_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.*this pipeline has DDIMScheduler"):
        policy_class("sd_turbo")(pipe, device="cpu", train_mode="none")
