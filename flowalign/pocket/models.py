"""The pocket models' architectures, tokenizer and helpers, in the standard library formats.

* Pocket CLIP: a transformers ``CLIPModel`` (ViT on 32×32 pixels, patch 4; a small text transformer)
  trained contrastively with hard negatives; its text tower is also the T2I model's text encoder.
* Pocket T2I: a diffusers Stable Diffusion 3 pipeline — ``SD3Transformer2DModel`` on the 8×8×4
  latents of a small ``AutoencoderKL`` (downsampling 4), both text encoders
  ``CLIPTextModelWithProjection`` (the pocket CLIP text tower), no T5, and a
  ``FlowMatchEulerDiscreteScheduler``.

The tokenizer is a real ``CLIPTokenizer`` (byte-level BPE) whose merges turn every word of the pocket
grammar into one token; any other text still tokenizes (byte by byte), so no input is rejected.

**The missing T5.** Without ``text_encoder_3``, ``StableDiffusion3Pipeline`` appends
``max_sequence_length`` all-zero T5 tokens to the prompt (default 256). The first world was trained
with those 256, collapsed into one token (``flowalign.models.sd3.CollapsedNullTokensProcessor``,
exact); they took so much of the attention that relations were never learned, so the rebuilt models
are trained with one (``BuildConfig.t2i_null_tokens``), recorded in the folder's ``flowalign.json``:
policies loaded from the folder use it, and the stock pipeline runs the same model with
``max_sequence_length=1``.
"""

from __future__ import annotations

import re

from .grammar import COLORS, NUMBER_WORDS, SHAPES

TOKENIZER_MAX_LENGTH = 20  # the longest grammar prompt is 16 tokens with <bos>/<eos>
_EXTRA_WORDS = ("an", "one", "and", "to", "the", "left", "right", "of", "above", "below", "photo", "image", "scene")


def grammar_words() -> list[str]:
    words = list(NUMBER_WORDS.values()) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
    words += list(_EXTRA_WORDS)
    return list(dict.fromkeys(words))


def build_tokenizer(model_max_length: int = TOKENIZER_MAX_LENGTH):
    """A byte-level BPE ``CLIPTokenizer`` with one token per grammar word (no hub needed)."""
    from ..models.tokenizers import word_clip_tokenizer

    return word_clip_tokenizer(grammar_words(), model_max_length)


def clip_config(tokenizer, width: int = 96, layers: int = 3, vision_width: int = 96, vision_layers: int = 3):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, hidden_act="gelu",
    )
    vision = CLIPVisionConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=vision_width, intermediate_size=2 * vision_width,
        projection_dim=width, num_hidden_layers=vision_layers, num_attention_heads=4, hidden_act="gelu",
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=width)


def image_processor():
    """The pocket CLIP's ``CLIPImageProcessor``: 32×32, mean/std 0.5 (images are mapped to [-1, 1])."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 32}, do_center_crop=True, crop_size={"height": 32, "width": 32},
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )


def vae_model(channels: tuple[int, ...] = (32, 64, 128)):
    """An ``AutoencoderKL`` 32×32×3 → 8×8×4 (three blocks, two downsamplings); ``channels`` per block
    (the first world used (16, 32, 64), which blurs small squares into circles: counting 0.83 strict
    on VAE reconstructions of exact renders)."""
    from diffusers import AutoencoderKL

    assert len(channels) == 3, channels
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(channels), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )


def transformer_model(text_width: int, pooled_width: int, layers: int = 6, heads: int = 4, head_dim: int = 32):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_width, pos_embed_max_size=8,
    )


# ---------------------------------------------------------------------------------------------
# hard negatives for contrastive training and for the zero-shot check


def hard_negatives(prompt: str, rng) -> list[str]:
    """Captions that differ from ``prompt`` in one binding-relevant detail: a swapped color, a changed
    count, a flipped relation, a changed shape, or the two objects' colors exchanged."""
    from .grammar import ObjectPhrase, PromptSpec, parse_prompt, spec_to_prompt

    spec = parse_prompt(prompt)
    out: set[str] = set()
    objs = list(spec.objects)

    def emit(objects, relation=spec.relation):
        try:
            out.add(spec_to_prompt(PromptSpec(tuple(objects), relation)))
        except ValueError:
            pass

    for i, o in enumerate(objs):
        for c in COLORS:
            if o.color is not None and c != o.color:
                emit(objs[:i] + [ObjectPhrase(o.shape, c, o.count)] + objs[i + 1:])
        for s in SHAPES:
            if s != o.shape:
                emit(objs[:i] + [ObjectPhrase(s, o.color, o.count)] + objs[i + 1:])
        if spec.relation is None:
            for n in range(1, 5):
                if n != o.count:
                    emit(objs[:i] + [ObjectPhrase(o.shape, o.color, n)] + objs[i + 1:])
    if spec.relation is not None:
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        emit(objs, flip[spec.relation])
    if len(objs) == 2 and objs[0].color and objs[1].color and objs[0].color != objs[1].color:
        a, b = objs
        emit([ObjectPhrase(a.shape, b.color, a.count), ObjectPhrase(b.shape, a.color, b.count)])
    out.discard(spec_to_prompt(spec))
    cands = sorted(out)
    rng.shuffle(cands)
    return cands


def normalize_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())
