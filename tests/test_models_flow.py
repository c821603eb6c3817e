"""Flow policies (SD3/SD3.5 with and without T5, FLUX.1-dev, FLUX.1-schnell) against stock diffusers.

Every pipeline here is tiny and randomly initialised (flowalign.models.testing), saved to a folder
and loaded back through the adapters' real ``from_pretrained`` path, offline.
"""

import pytest
import torch

from flowalign.models import policy_class
from flowalign.models.base import Cond
from flowalign.models.flux import pack_latents, unpack_latents
from flowalign.models.testing import (
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    force_hub_offline,
    load_stock_pipeline,
    tiny_pipeline_dir,
)
from flowalign.sampling.steps import ode_step

force_hub_offline()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost

GUIDANCE = {"sd3": 5.0, "sd3_no_t5": 5.0, "flux_dev": 3.5, "flux_schnell": 0.0}
PROMPTS = ["a red cat on a blue cube", "a photo of a green ball"]
OPTIONS = dict(device="cpu", dtype="float32", max_sequence_length=MAX_SEQUENCE_LENGTH, lora_rank=4, lora_alpha=8.0)
TOL = 1e-4


@pytest.fixture(scope="session", params=sorted(GUIDANCE))
def kind(request):
    tiny_pipeline_dir(request.param)  # build and save once per session
    return request.param


def make_policy(kind, **options):
    family = "sd3" if kind.startswith("sd3") else "flux"
    return policy_class(family).from_pretrained(tiny_pipeline_dir(kind), **{**OPTIONS, **options})


def make_noise(policy, batch=len(PROMPTS), seed=0):
    shape = policy.latent_shape(IMAGE_SIZE, IMAGE_SIZE)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def ode_latents(policy, noise, cond, num_steps, guidance_scale):
    """Euler ODE sampling as flowalign's samplers do it: policy.velocity + sampling.ode_step."""
    sigmas = policy.sigmas(num_steps, IMAGE_SIZE, IMAGE_SIZE)
    x = noise
    for i in range(num_steps):
        v = policy.velocity(x, sigmas[i], cond, guidance_scale)
        x = ode_step(x, v, sigmas[i], sigmas[i + 1]).x_next
    return x


def stock_output(kind, pipe, noise, num_steps, output_type):
    flux = kind.startswith("flux")
    out = pipe(
        PROMPTS,
        latents=pack_latents(noise) if flux else noise,
        num_inference_steps=num_steps,
        guidance_scale=GUIDANCE[kind],
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type=output_type,
    ).images
    if flux and output_type == "latent":
        out = unpack_latents(out, *noise.shape[-2:])
    return out


def forward_batch_sizes(module):
    """Record the batch size of each forward of ``module`` (a hook, not a mock)."""
    sizes = []
    handle = module.register_forward_hook(lambda m, args, kwargs, out: sizes.append(kwargs["hidden_states"].shape[0]),
                                          with_kwargs=True)
    return sizes, handle


@torch.no_grad()
def test_ode_sampling_reproduces_the_stock_pipeline(kind):
    policy = make_policy(kind, train_mode="none")
    stock = load_stock_pipeline(kind)
    noise = make_noise(policy)
    cond = policy.encode(PROMPTS)

    latents = ode_latents(policy, noise, cond, 3, GUIDANCE[kind])
    ref_latents = stock_output(kind, stock, noise, 3, "latent")
    assert (latents - ref_latents).abs().max() <= TOL

    images = policy.decode(latents)
    ref_images = stock_output(kind, stock, noise, 3, "pt")
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (images - ref_images).abs().max() <= TOL
    assert images.std() > 1e-2  # not a constant image that would match anything

    generated = policy.generate(noise, cond, num_steps=3, guidance_scale=GUIDANCE[kind])
    assert (generated - ref_images).abs().max() <= TOL


@torch.no_grad()
def test_prompts_reach_the_velocity(kind):
    policy = make_policy(kind, train_mode="none")
    x = make_noise(policy, batch=1)
    v_a = policy.velocity(x, 0.6, policy.encode(PROMPTS[:1]), GUIDANCE[kind])
    v_b = policy.velocity(x, 0.6, policy.encode(PROMPTS[1:]), GUIDANCE[kind])
    assert v_a.dtype == torch.float32 and v_a.shape == x.shape
    assert (v_a - v_b).abs().max() > 1e-4


@torch.no_grad()
def test_sd3_cfg_is_one_batched_forward_equal_to_two_separate_ones():
    policy = make_policy("sd3", train_mode="none")
    x, cond, s = make_noise(policy), policy.encode(PROMPTS), 4.5
    sigma_B = torch.tensor([0.9, 0.4])

    sizes, handle = forward_batch_sizes(policy.denoiser)
    v = policy.velocity(x, sigma_B, cond, s)
    handle.remove()
    assert sizes == [2 * len(PROMPTS)]

    v_cond = policy.velocity(x, sigma_B, Cond(cond.embeds, cond.pooled), 1.0)
    v_uncond = policy.velocity(x, sigma_B, Cond(cond.neg_embeds, cond.neg_pooled), 1.0)
    assert (v_cond - v_uncond).abs().max() > 1e-3
    torch.testing.assert_close(v, v_uncond + s * (v_cond - v_uncond), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flux_guidance_is_an_embedding_for_dev_and_ignored_by_schnell():
    for kind, embedded in [("flux_dev", True), ("flux_schnell", False)]:
        policy = make_policy(kind, train_mode="none")
        assert policy.guidance_embeds is embedded
        x, cond = make_noise(policy), policy.encode(PROMPTS)
        sizes, handle = forward_batch_sizes(policy.denoiser)
        v1, v5 = policy.velocity(x, 0.5, cond, 1.0), policy.velocity(x, 0.5, cond, 5.0)
        handle.remove()
        assert sizes == [len(PROMPTS)] * 2  # no CFG batch
        assert bool((v1 - v5).abs().max() > 1e-4) is embedded
        with pytest.raises(ValueError, match="without classifier-free guidance"):
            policy.encode(PROMPTS, negative_prompts=["blurry", "blurry"])


@torch.no_grad()
def test_encode_caches_per_prompt_and_matches_uncached_encoding():
    cached = make_policy("sd3", train_mode="none")
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    cond = cached.encode(texts, negative_prompts=["blurry", "", ""])
    assert len(cached._cache) == 4  # two prompts, two negatives
    assert torch.equal(cond.embeds[0], cond.embeds[2]) and not torch.equal(cond.embeds[0], cond.embeds[1])
    assert torch.equal(cond.neg_embeds[1], cond.neg_embeds[2])
    assert not torch.equal(cond.neg_embeds[0], cond.neg_embeds[1])

    fresh = make_policy("sd3", train_mode="none", cache_text_embeddings=False).encode(texts, ["blurry", "", ""])
    for name in ("embeds", "pooled", "neg_embeds", "neg_pooled"):
        torch.testing.assert_close(getattr(cond, name), getattr(fresh, name), atol=0, rtol=0)
    # the stock pipeline's own encoding of the same prompts (the T5 part is padded to our length)
    stock = load_stock_pipeline("sd3")
    embeds, neg, pooled, neg_pooled = stock.encode_prompt(
        texts, None, None, device="cpu", negative_prompt=["blurry", "", ""], max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    # different batch compositions (we encode the distinct texts together) round differently
    torch.testing.assert_close(cond.embeds, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.neg_pooled, neg_pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind_", ["sd3", "flux_dev"])
def test_lora_changes_outputs_reference_is_the_base_and_saves_for_the_stock_pipeline(kind_, tmp_path, capfd):
    policy = make_policy(kind_, train_mode="lora")
    base = make_policy(kind_, train_mode="none")
    x, cond, s = make_noise(policy), policy.encode(PROMPTS), GUIDANCE[kind_]
    params = policy.trainable_parameters()
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    lora_names = [n for n, p in policy.denoiser.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in lora_names)
    assert any("add_q_proj" in n for n in lora_names) and any("to_out.0" in n for n in lora_names)

    with torch.no_grad():
        v_base = base.velocity(x, 0.7, cond, s)
        torch.testing.assert_close(policy.velocity(x, 0.7, cond, s), v_base, atol=1e-6, rtol=0)  # B = 0 at init
        gen = torch.Generator().manual_seed(0)
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
        v_lora = policy.velocity(x, 0.7, cond, s)
        assert (v_lora - v_base).abs().max() > 1e-3
        with policy.reference() as ref:
            torch.testing.assert_close(ref.velocity(x, 0.7, cond, s), v_base, atol=1e-6, rtol=0)
        torch.testing.assert_close(policy.velocity(x, 0.7, cond, s), v_lora, atol=0, rtol=0)
    assert all(p.requires_grad for p in params)

    policy.save_adapter(tmp_path / "lora")
    stock = load_stock_pipeline(kind_)
    stock.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        ours = ode_latents(policy, x, cond, 2, s)
        theirs = stock_output(kind_, stock, x, 2, "latent")
    assert (ours - theirs).abs().max() <= TOL
    assert (ours - ode_latents(base, x, cond, 2, s)).abs().max() > 1e-3

    capfd.readouterr()
    resumed = make_policy(kind_, train_mode="lora", lora_init_path=str(tmp_path / "lora"))
    # our adapters hold the denoiser's LoRA only: no per-text-encoder "No LoRA keys" notice on loading
    assert "No LoRA keys" not in "".join(capfd.readouterr())
    assert sum(p.numel() for p in resumed.trainable_parameters()) == sum(p.numel() for p in params)
    with torch.no_grad():
        torch.testing.assert_close(resumed.velocity(x, 0.7, cond, s), v_lora, atol=1e-5, rtol=0)
    frozen = make_policy(kind_, train_mode="none", lora_init_path=str(tmp_path / "lora"))
    assert frozen.trainable_parameters() == []


def test_bfloat16_base_trains_float32_lora():
    policy = make_policy("sd3_no_t5", dtype="bfloat16", train_mode="lora")
    assert policy.denoiser.pos_embed.proj.weight.dtype == torch.bfloat16
    assert policy.vae.dtype == torch.float32
    params = policy.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    v = policy.velocity(make_noise(policy), 0.5, policy.encode(PROMPTS), 4.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_full_finetuning_trains_everything_and_saves_a_model_folder(tmp_path):
    from diffusers import SD3Transformer2DModel

    policy = make_policy("sd3_no_t5", train_mode="full")
    assert len(policy.trainable_parameters()) == len(list(policy.denoiser.parameters()))
    assert not any(p.requires_grad for p in policy.vae.parameters())
    with pytest.raises(ValueError, match="train_mode='full' needs a frozen copy"):
        with policy.reference():
            pass
    with torch.no_grad():
        policy.denoiser.proj_out.weight.add_(1.0)
    policy.save_adapter(tmp_path / "transformer")
    saved = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer")
    torch.testing.assert_close(saved.proj_out.weight, policy.denoiser.proj_out.weight, atol=0, rtol=0)


def test_generator_gradients_reach_the_noise(kind):
    policy = make_policy(kind, train_mode="none", gradient_checkpointing=True)
    assert policy.denoiser.is_gradient_checkpointing
    cond = policy.encode(PROMPTS[:1])
    grads = []
    for checkpoint in (True, False):
        noise = make_noise(policy, batch=1).requires_grad_(True)
        images = policy.generate(noise, cond, num_steps=2, guidance_scale=GUIDANCE[kind], checkpoint=checkpoint)
        assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
        images.mean().backward()
        grads.append(noise.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_options_fail_loudly_or_leave_outputs_unchanged():
    from diffusers import EulerDiscreteScheduler

    from flowalign.models.testing import tiny_sd3_pipeline

    reference = make_policy("sd3", train_mode="none").encode(PROMPTS)
    offloaded = make_policy("sd3", train_mode="none", offload_text_encoders=True)
    cond = offloaded.encode(PROMPTS)
    torch.testing.assert_close(cond.embeds, reference.embeds, atol=0, rtol=0)
    assert all(p.device.type == "cpu" for enc in offloaded.text_encoders for p in enc.parameters())

    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ValueError, match="xformers is not installed"):
            make_policy("sd3_no_t5", train_mode="none", attention_backend="xformers")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        make_policy("sd3_no_t5", train_mode="none", attention_backend="flash")
    with pytest.raises(ValueError, match="at most 512 tokens"):
        make_policy("flux_schnell", train_mode="none", max_sequence_length=600)
    with pytest.raises(ValueError, match="multiples of 4"):
        make_policy("flux_schnell", train_mode="none").latent_shape(30, 32)

    pipe = tiny_sd3_pipeline(with_t5=False)
    pipe.scheduler = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="scheduler is EulerDiscreteScheduler"):
        policy_class("sd3")(pipe, device="cpu", train_mode="none")


@torch.no_grad()
def test_absent_t5_tokens_collapse_exactly():
    """Without T5 the pipeline appends max_sequence_length identical zero tokens; the adapter runs them
    as one token with a log-count bias and must match the stock pipeline at its default length (256)."""
    from flowalign.models.sd3 import CollapsedNullTokensProcessor

    collapsed = make_policy("sd3_no_t5", train_mode="none", max_sequence_length=256)
    plain = make_policy("sd3_no_t5", train_mode="none", max_sequence_length=256, collapse_null_t5=False)
    assert collapsed.null_t5_tokens == 256 and plain.null_t5_tokens is None
    assert all(isinstance(p, CollapsedNullTokensProcessor) for p in collapsed.denoiser.attn_processors.values())
    c_cond, p_cond = collapsed.encode(PROMPTS), plain.encode(PROMPTS)
    assert c_cond.embeds.shape[1] + 255 == p_cond.embeds.shape[1]
    noise = make_noise(collapsed)
    a = ode_latents(collapsed, noise, c_cond, 2, 5.0)
    b = ode_latents(plain, noise, p_cond, 2, 5.0)
    stock = load_stock_pipeline("sd3_no_t5")
    ref = stock(PROMPTS, latents=noise, num_inference_steps=2, guidance_scale=5.0, height=IMAGE_SIZE,
                width=IMAGE_SIZE, output_type="latent").images  # the stock default: 256 zero tokens
    assert (a - b).abs().max() <= TOL and (a - ref).abs().max() <= TOL
