"""FLUX.1-dev and FLUX.1-schnell on diffusers' ``FluxPipeline``.

Conditioning is the pipeline's ``encode_prompt``: T5 token embeddings and the pooled CLIP-L embedding.
FLUX.1 is guidance-distilled: there is no CFG; FLUX.1-dev takes the guidance scale as an embedding
(``transformer.config.guidance_embeds``), FLUX.1-schnell ignores it. The transformer works on packed
2×2 latent patches with positional ids; packing, unpacking and the ids are done here, so the policy
takes and returns unpacked [B, C, H, W] latents like every other flow policy. The transformer takes
timestep = σ (the pipeline passes its 1000-scaled timesteps divided by 1000).
"""

from __future__ import annotations

import torch

from flowalign.models.base import (
    Cond,
    FlowPolicy,
    _per_sample_sigma,
    check_flow_scheduler,
)
from flowalign.sampling.schedules import flux_sigmas


def pack_latents(x_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), 4C]: 2×2 patches as tokens, row-major (FluxPipeline._pack_latents)."""
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens_BLD: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent of ``height`` × ``width``."""
    B, _, D = tokens_BLD.shape
    x = tokens_BLD.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def latent_image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """[h2·w2, 3] positional ids (0, row, col) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def flux_schedule(scheduler_config, num_steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """The N+1 sigmas ``FluxPipeline`` uses for ``image_seq_len`` packed tokens: dynamic shift
    (FLUX.1-dev) or the static ``shift`` (FLUX.1-schnell: 1.0), from the scheduler config. An explicit
    ``shift`` overrides the config with that static shift."""
    check_flow_scheduler(scheduler_config)
    return flux_sigmas(
        num_steps,
        image_seq_len,
        dynamic=shift is None and bool(scheduler_config.get("use_dynamic_shifting")),
        shift=scheduler_config["shift"] if shift is None else shift,
        base_seq_len=scheduler_config["base_image_seq_len"],
        max_seq_len=scheduler_config["max_image_seq_len"],
        base_shift=scheduler_config["base_shift"],
        max_shift=scheduler_config["max_shift"],
    )


class FluxPolicy(FlowPolicy):
    """FLUX.1-dev (guidance embedding) and FLUX.1-schnell (no guidance input)."""

    family = "flux"
    denoiser_name = "transformer"
    required_components = (
        "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
    )
    text_encoder_names = ("text_encoder", "text_encoder_2")
    uses_cfg = False

    def __init__(self, pipe, **options):
        length = options.get("max_sequence_length")
        if length is not None and length > 512:
            raise ValueError(f"FLUX.1's T5 takes at most 512 tokens: set model.max_sequence_length <= 512 ({length})")
        super().__init__(pipe, **options)

    @property
    def guidance_embeds(self) -> bool:
        """True for FLUX.1-dev (guidance is an input), False for FLUX.1-schnell."""
        return bool(self.denoiser.config.guidance_embeds)

    def _encode_texts(self, texts: list[str]):
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(f"FLUX image height and width must be multiples of {multiple}, got {height}x{width}")
        vsf = self.vae_scale_factor
        return self.denoiser.config.in_channels // 4, height // vsf, width // vsf

    def sigmas(self, num_steps: int, height: int, width: int, shift: float | None = None) -> torch.Tensor:
        _, h, w = self.latent_shape(height, width)
        return flux_schedule(self.pipe.scheduler.config, num_steps, (h // 2) * (w // 2), shift)

    def velocity(self, x_BCHW: torch.Tensor, sigma_B, cond: Cond, guidance_scale: float) -> torch.Tensor:
        """v at σ. ``guidance_scale`` is embedded for FLUX.1-dev and ignored by FLUX.1-schnell."""
        B, _, H, W = x_BCHW.shape
        assert len(cond) == B, f"cond has {len(cond)} rows for a batch of {B}"
        sigma = _per_sample_sigma(sigma_B, B, x_BCHW.device)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((B,), float(guidance_scale), device=x_BCHW.device, dtype=torch.float32)
        out = self.run_denoiser(
            hidden_states=pack_latents(x_BCHW.to(self.dtype)),
            timestep=sigma.to(self.dtype),
            guidance=guidance,
            pooled_projections=cond.pooled.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_BCHW.device, dtype=self.dtype),
            img_ids=latent_image_ids(H // 2, W // 2, x_BCHW.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out.float(), H, W)
