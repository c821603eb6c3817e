"""Tiny, seeded pipelines of every supported family, built offline from the real classes.

Tests (and the pocket world, which needs the same tokenizers) use these instead of hub downloads.
Sizes follow the spirit of diffusers' own ``get_dummy_components``: 1–2 layers, widths of 8–32, so a
pipeline builds, saves and runs in well under a second on a CPU. Weights are random: these
pipelines exercise the code paths (conditioning, CFG, scaling, packing, LoRA, loading), never the
quality of any real model.

Tokenizers are built locally with no hub and no sentencepiece model file:

* ``tiny_clip_tokenizer``: a real byte-level BPE ``CLIPTokenizer`` whose vocabulary is the 256
  byte symbols (alone and word-final) plus a few merges, so any text tokenizes without unknowns.
* ``tiny_t5_tokenizer``: a real ``T5Tokenizer`` (transformers' tokenizers-backed Unigram model,
  exposed by diffusers pipelines as ``T5TokenizerFast``) over a small vocabulary of letters and words.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

# Widths chosen distinct so that a mix-up of encoders or of the padding of the SD3 joint sequence
# shows up as a shape error rather than passing silently.
CLIP_1_WIDTH = 8  # SD3 text_encoder / SDXL text_encoder
CLIP_2_WIDTH = 16  # SD3 text_encoder_2 / SDXL text_encoder_2
T5_WIDTH = 32  # SD3 joint_attention_dim, FLUX joint_attention_dim
LATENT_CHANNELS = 4
IMAGE_SIZE = 32  # pixels; the tiny VAEs downsample by 2
MAX_SEQUENCE_LENGTH = 16  # T5 tokens used in tests (the real default is 256/512)

_WORDS = ["a", "an", "the", "of", "on", "and", "photo", "red", "blue", "green", "cat", "dog", "cube", "ball"]


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A byte-level BPE CLIP tokenizer that covers any input text (no unknown tokens)."""
    from flowalign.models.tokenizers import word_clip_tokenizer

    return word_clip_tokenizer(_WORDS, model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A Unigram T5 tokenizer over letters, digits and a few words (unknowns map to <unk>)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -4.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_config(tokenizer, width: int, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _vae(**factors):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        **factors,
    )


def tiny_sd3_pipeline(with_t5: bool = True, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` (two CLIP encoders of different widths, optional T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=CLIP_1_WIDTH + CLIP_2_WIDTH,
        pos_embed_max_size=16,
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, CLIP_1_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, CLIP_2_WIDTH))
    tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
    text_encoder_3 = _t5_encoder(tokenizer_3) if with_t5 else None
    vae = _vae(scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(guidance_embeds: bool = True, seed: int = 0):
    """A ``FluxPipeline``: FLUX.1-dev-like (guidance embedding, dynamic shift) or, with
    ``guidance_embeds=False``, FLUX.1-schnell-like (no guidance, static shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_2_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer, CLIP_2_WIDTH))
    text_encoder_2 = _t5_encoder(tokenizer_2)
    vae = _vae(scaling_factor=0.3611, shift_factor=0.1159)
    if guidance_embeds:  # FLUX.1-dev's scheduler config (tiny base/max seq lens for 8x8 tokens)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
            base_shift=0.5, max_shift=1.15,
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _tiny_unet(cross_attention_dim: int, **sdxl):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        **sdxl,
    )


def _turbo_scheduler(ancestral: bool):
    # The scheduler configs SD-Turbo (Euler) and SDXL-Turbo (Euler ancestral) ship with.
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    return cls(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
        timestep_spacing="trailing", steps_offset=1,
    )


def tiny_sd_turbo_pipeline(seed: int = 0):
    """A ``StableDiffusionPipeline`` shaped like SD-Turbo (one CLIP encoder, epsilon UNet, Euler)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_unet(CLIP_2_WIDTH)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer, CLIP_2_WIDTH))
    return StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_turbo_scheduler(ancestral=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_turbo_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` shaped like SDXL-Turbo (two CLIP encoders, text_time
    conditioning, epsilon UNet, Euler ancestral)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim = 8
    unet = _tiny_unet(
        CLIP_1_WIDTH + CLIP_2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=CLIP_2_WIDTH + 6 * time_dim,
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer, CLIP_1_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, CLIP_2_WIDTH))
    return StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_turbo_scheduler(ancestral=True),
        add_watermarker=False,
    )


TINY_BUILDERS = {
    "sd3": tiny_sd3_pipeline,
    "sd3_no_t5": lambda seed=0: tiny_sd3_pipeline(with_t5=False, seed=seed),
    "flux_dev": tiny_flux_pipeline,
    "flux_schnell": lambda seed=0: tiny_flux_pipeline(guidance_embeds=False, seed=seed),
    "sd_turbo": tiny_sd_turbo_pipeline,
    "sdxl_turbo": tiny_sdxl_turbo_pipeline,
}


def save_tiny_pipeline(kind: str, directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline ``kind`` (a key of ``TINY_BUILDERS``) and save it as a diffusers folder."""
    if kind not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {sorted(TINY_BUILDERS)}")
    directory = Path(directory)
    TINY_BUILDERS[kind](seed=seed).save_pretrained(directory)
    return directory


@functools.cache
def _scratch_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="flowalign-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def tiny_pipeline_dir(kind: str) -> Path:
    """The tiny pipeline ``kind`` saved once per process in a scratch folder (removed at exit)."""
    return save_tiny_pipeline(kind, _scratch_root() / kind)


def force_hub_offline() -> None:
    """Make hub lookups in this process fail at once instead of retrying the network (for tests)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_stock_pipeline(kind: str):
    """The stock diffusers pipeline of ``tiny_pipeline_dir(kind)``, loaded the way users load it."""
    import json

    import diffusers

    path = tiny_pipeline_dir(kind)
    name = json.loads((path / "model_index.json").read_text())["_class_name"]
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3_no_t5" else {}
    pipe = getattr(diffusers, name).from_pretrained(path, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
