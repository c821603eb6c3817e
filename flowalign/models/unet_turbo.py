"""One-step UNet generators for noise optimization: SD-Turbo and SDXL-Turbo (ReNO's base models).

Both are epsilon-prediction ``UNet2DConditionModel``s distilled (ADD) to generate in one step
without CFG, shipped with Euler schedulers (SD-Turbo: ``EulerDiscreteScheduler``, SDXL-Turbo:
``EulerAncestralDiscreteScheduler``, ``timestep_spacing="trailing"``), so one step runs at t = 999.
In the scheduler's k-diffusion parametrisation x = x0 + σ·ε, the stock pipeline's one step is:

    x_T   = noise · init_noise_sigma            (prepare_latents)
    ε̂     = unet(x_T / √(σ² + 1), t)            (scale_model_input)
    x0    = x_T − σ·ε̂                           (Euler step to σ = 0; the ancestral noise is 0 there)

``generate`` does exactly this, differentiably, and decodes. σ, t and init_noise_sigma are read from
the pipeline's scheduler after ``set_timesteps(1)``. Only a single step is offered: these models
are used with one step in ReNO, and a multi-step ancestral sampler would need injected noise.
"""

from __future__ import annotations

import torch

from flowalign.models.base import UNET_LORA_TARGETS, Cond, Policy

_SUPPORTED_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


class TurboPolicy(Policy):
    """Shared one-step epsilon-prediction generator; SD and SDXL differ in conditioning only."""

    denoiser_name = "unet"
    default_lora_targets = UNET_LORA_TARGETS

    def __init__(self, pipe, **options):
        scheduler = pipe.scheduler
        name = type(scheduler).__name__
        if name not in _SUPPORTED_SCHEDULERS:
            raise ValueError(f"{self.family} one-step generation needs one of {_SUPPORTED_SCHEDULERS} "
                             f"(the schedulers SD-Turbo/SDXL-Turbo ship with); this pipeline has {name}")
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"{self.family} one-step generation supports epsilon prediction, this UNet's "
                             f"scheduler says prediction_type={scheduler.config.prediction_type!r}")
        super().__init__(pipe, **options)
        one_step = type(scheduler).from_config(scheduler.config)
        one_step.set_timesteps(1)
        assert float(one_step.sigmas[-1]) == 0.0, "a one-step Euler schedule ends at sigma 0"
        self.timestep = float(one_step.timesteps[0])
        self.sigma = float(one_step.sigmas[0])
        self.init_noise_sigma = float(one_step.init_noise_sigma)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        vsf = self.vae_scale_factor
        if height % vsf or width % vsf:
            raise ValueError(f"{self.family} image height and width must be multiples of {vsf}, got {height}x{width}")
        return self.denoiser.config.in_channels, height // vsf, width // vsf

    def _added_cond(self, cond: Cond, height: int, width: int) -> dict:
        return {}

    def denoise(self, noise_BCHW: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One step from unit-variance ``noise`` to the predicted clean latent x0 (float32)."""
        B, _, h, w = noise_BCHW.shape
        assert len(cond) == B, f"cond has {len(cond)} rows for a batch of {B}"
        x_T = noise_BCHW.float() * self.init_noise_sigma
        model_in = (x_T / (self.sigma**2 + 1) ** 0.5).to(self.dtype)
        timestep = torch.full((B,), self.timestep, device=noise_BCHW.device)
        vsf = self.vae_scale_factor
        eps = self.run_denoiser(
            model_in,
            timestep,
            encoder_hidden_states=cond.embeds.to(self.dtype),
            return_dict=False,
            **self._added_cond(cond, h * vsf, w * vsf),
        )[0].float()
        return x_T - self.sigma * eps

    def generate(self, noise_BCHW: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Differentiable one-step generation: noise [B, C, h, w] → images [B, 3, H, W] in [0, 1]."""
        return self.decode(self.denoise(noise_BCHW, cond))


class SDTurboPolicy(TurboPolicy):
    """SD-Turbo (``StableDiffusionPipeline``; one OpenCLIP-H text encoder, no pooled embedding)."""

    family = "sd_turbo"
    required_components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    text_encoder_names = ("text_encoder",)

    def _encode_texts(self, texts: list[str]):
        embeds, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        return embeds, None


class SDXLTurboPolicy(TurboPolicy):
    """SDXL-Turbo (``StableDiffusionXLPipeline``; two CLIP encoders, pooled + size conditioning)."""

    family = "sdxl_turbo"
    required_components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def _encode_texts(self, texts: list[str]):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def _added_cond(self, cond: Cond, height: int, width: int) -> dict:
        # SDXL micro-conditioning as the pipeline's defaults: original = target size, no crop.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=cond.embeds.device, dtype=self.dtype)
        added = {"text_embeds": cond.pooled.to(self.dtype), "time_ids": time_ids.expand(len(cond), -1)}
        return {"added_cond_kwargs": added}
