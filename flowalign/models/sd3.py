"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) on diffusers' ``StableDiffusion3Pipeline``.

Conditioning is the pipeline's own ``encode_prompt``: CLIP-L and CLIP-G penultimate hidden states
concatenated and zero-padded to the T5 width, followed by the T5 tokens (all zeros when the folder
has no ``text_encoder_3``, as diffusers does), and the two pooled CLIP embeddings concatenated.
CFG is one batched forward over [uncond; cond], v = v_u + s·(v_c − v_u). The transformer takes
timestep = 1000·σ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from flowalign.models.base import Cond, FlowPolicy, _per_sample_sigma, check_flow_scheduler
from flowalign.sampling.schedules import exponential_time_shift, flux_mu, sd3_sigmas


def sd3_schedule(scheduler_config, num_steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """The N+1 sigmas ``StableDiffusion3Pipeline`` uses for ``image_seq_len`` patch tokens.

    Static shift (SD3, SD3.5): ``sd3_sigmas(N, shift)``. Dynamic shifting (a scheduler config with
    ``use_dynamic_shifting``): the unshifted grid linspace(1, 1/T, N) under FLUX's exponential shift
    with μ from ``image_seq_len``, as the pipeline computes it. An explicit ``shift`` overrides the
    config with that static shift.
    """
    check_flow_scheduler(scheduler_config)
    num_train = scheduler_config["num_train_timesteps"]
    if shift is not None or not scheduler_config.get("use_dynamic_shifting"):
        shift = scheduler_config["shift"] if shift is None else shift
        return sd3_sigmas(num_steps, shift=shift, num_train_timesteps=num_train)
    mu = flux_mu(
        image_seq_len,
        scheduler_config["base_image_seq_len"],
        scheduler_config["max_image_seq_len"],
        scheduler_config["base_shift"],
        scheduler_config["max_shift"],
    )
    sigma_min = float(np.float32(1.0 / num_train))  # the scheduler's unshifted training grid ends at 1/T
    base = np.linspace(1.0, sigma_min, num_steps)
    return torch.cat([torch.from_numpy(exponential_time_shift(base, mu)).float(), torch.zeros(1)])


class CollapsedNullTokensProcessor:
    """SD3 joint attention where the *last* context token stands for ``count`` identical tokens.

    Identical keys/values contribute count·exp(q·k) to the softmax, i.e. one token with its logit
    raised by log(count); everything else is diffusers' ``JointAttnProcessor2_0``.
    """

    def __init__(self, count: int):
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        assert encoder_hidden_states is not None, "collapsed null tokens need the joint (context) stream"
        B, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(t):
            return t.view(B, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_count
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(B, -1, heads * q.shape[-1]).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx


def use_collapsed_null_tokens(transformer, count: int) -> None:
    """Install ``CollapsedNullTokensProcessor`` on every attention layer of an SD3 transformer."""
    transformer.set_attn_processor(CollapsedNullTokensProcessor(count))


class SD3Policy(FlowPolicy):
    """SD3 / SD3.5 (medium, large, large-turbo). ``text_encoder_3`` (T5) is optional."""

    family = "sd3"
    denoiser_name = "transformer"
    required_components = (
        "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
    )
    optional_components = ("text_encoder_3", "tokenizer_3")
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    uses_cfg = True

    def __init__(self, pipe, *, collapse_null_t5: bool = True, **options):
        """``collapse_null_t5``: without T5, run the pipeline's ``max_sequence_length`` all-zero T5
        tokens as one token with a log-count attention bias (exact, and far cheaper; SDPA only)."""
        super().__init__(pipe, **options)
        self.null_t5_tokens = None
        if pipe.text_encoder_3 is None and collapse_null_t5 and options.get("attention_backend", "sdpa") == "sdpa":
            self.null_t5_tokens = self.max_sequence_length
            use_collapsed_null_tokens(self.denoiser, self.max_sequence_length)

    def _encode_texts(self, texts: list[str]):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=1 if self.null_t5_tokens else self.max_sequence_length,
        )
        return embeds, pooled

    @property
    def patch_size(self) -> int:
        return self.denoiser.config.patch_size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        multiple = self.vae_scale_factor * self.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"SD3 image height and width must be multiples of {multiple}, got {height}x{width}")
        vsf = self.vae_scale_factor
        return self.denoiser.config.in_channels, height // vsf, width // vsf

    def sigmas(self, num_steps: int, height: int, width: int, shift: float | None = None) -> torch.Tensor:
        _, h, w = self.latent_shape(height, width)
        seq_len = (h // self.patch_size) * (w // self.patch_size)
        return sd3_schedule(self.pipe.scheduler.config, num_steps, seq_len, shift)

    def velocity(self, x_BCHW: torch.Tensor, sigma_B, cond: Cond, guidance_scale: float) -> torch.Tensor:
        """v at σ; with ``guidance_scale > 1``, CFG in one batched forward (uncond rows first)."""
        B = x_BCHW.shape[0]
        assert len(cond) == B, f"cond has {len(cond)} rows for a batch of {B}"
        timestep_B = 1000 * _per_sample_sigma(sigma_B, B, x_BCHW.device)
        x_in, embeds, pooled = x_BCHW.to(self.dtype), cond.embeds, cond.pooled
        cfg = guidance_scale > 1
        if cfg:
            if cond.neg_embeds is None:
                raise ValueError(
                    "guidance_scale > 1 needs the unconditional embeddings; build cond with policy.encode()"
                )
            x_in = torch.cat([x_in, x_in])
            timestep_B = torch.cat([timestep_B, timestep_B])
            embeds = torch.cat([cond.neg_embeds, embeds])
            pooled = torch.cat([cond.neg_pooled, pooled])
        out = self.run_denoiser(
            hidden_states=x_in,
            timestep=timestep_B,
            encoder_hidden_states=embeds.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            return_dict=False,
        )[0].float()
        if not cfg:
            return out
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
