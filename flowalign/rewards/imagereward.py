"""ImageReward v1.0 (Xu et al. 2023) rebuilt from transformers' BLIP classes.

ImageReward is BLIP (ViT-L/16 image encoder + BERT text encoder with cross-attention to the image,
Salesforce ``med.py``) and a linear MLP head on the text [CLS] state:
``reward = (mlp(text_encoder(prompt, image)[:, 0]) - 0.16717) / 1.03334``.

The ``image-reward`` package pins an old timm that conflicts with open_clip, so flowalign does not
depend on it: transformers' ``BlipVisionModel`` / ``BlipTextModel`` are ports of BLIP's ``vit.py`` /
``med.py``, and ``convert_state_dict`` maps the ``ImageReward.pt`` keys onto them (vision blocks are
renamed, the text encoder's names are already the same). The vision size is read off the
checkpoint's shapes; the text encoder's heads and layer-norm eps come from ``med_config.json``.
The tokenizer is ``bert-base-uncased`` with BLIP's two extra tokens (``[DEC]``, ``[ENC]``),
prompts padded to 35 tokens, images resized (bicubic) and center-cropped to 224 with CLIP's
normalization, as in ``ImageReward.score``.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from ..errors import UserError
from . import transforms as T
from .base import LinearMLPHead, freeze, resolve_device, resolve_dtype, resolve_file

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_TOKENS = 35

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]
# Parts of BLIP_Pretrain that ImageReward keeps in its checkpoint but never uses for the score.
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """``ImageReward.pt`` keys -> (BlipVisionModel, BlipTextModel, LinearMLPHead) state dicts."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_RENAMES:
                new = re.sub(pattern, repl, k)
                if new != k:
                    vision[new] = value
                    break
            else:
                raise UserError(f"unexpected ImageReward vision key {key!r}; is this an ImageReward checkpoint?")
        elif key.startswith("blip.text_encoder."):
            k = key[len("blip.text_encoder."):]
            if not k.endswith("position_ids"):  # a buffer, rebuilt by the model
                text[k] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        elif not key.startswith(_UNUSED_PREFIXES):
            raise UserError(f"unexpected ImageReward checkpoint key {key!r}; is this an ImageReward checkpoint?")
    if not vision or not text or not mlp:
        raise UserError("the checkpoint lacks the blip.visual_encoder / blip.text_encoder / mlp weights "
                         "of ImageReward")
    return vision, text, mlp


def _vision_config(vision: dict, num_heads: int):
    from transformers import BlipVisionConfig

    hidden = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision["embeddings.position_embedding"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=hidden, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=num_heads, image_size=grid * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP's vit.py: nn.LayerNorm(eps=1e-6), exact GELU
    )


def _text_config(text: dict, med: dict, encoder_width: int):
    from transformers import BlipTextConfig

    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    return BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=encoder_width,
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med.get("pad_token_id", 0),
    )


class ImageReward:
    differentiable = True
    name = "imagereward"

    def __init__(self, vision, text, mlp, tokenizer, device, dtype):
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.size = vision.config.image_size
        self.device, self.dtype = device, dtype

    def __call__(self, images, prompts, metadata=None):
        T.check_images(images)
        assert len(prompts) == images.shape[0], "one prompt per image"
        x = T.clip_preprocess(images.to(self.device), self.size).to(self.dtype)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt").to(self.device)
        img_BND = self.vision(pixel_values=x).last_hidden_state
        img_mask_BN = torch.ones(img_BND.shape[:2], dtype=torch.long, device=self.device)
        out = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        encoder_hidden_states=img_BND, encoder_attention_mask=img_mask_BN)
        cls_BD = out.last_hidden_state[:, 0].float()
        scores = (self.mlp(cls_BD).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        return scores.to(images.device), {}

    def __repr__(self) -> str:
        return f"ImageReward(device={self.device}, dtype={self.dtype})"


def load_tokenizer(tokenizer: str):
    """BLIP's ``init_tokenizer``: BERT's tokenizer plus ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(tokenizer)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def imagereward(
    checkpoint: str = "THUDM/ImageReward",
    med_config: str | None = None,
    tokenizer: str = "bert-base-uncased",
    vision_heads: int = 16,
    device: str | None = None,
    dtype: str = "float32",
) -> ImageReward:
    """ImageReward v1.0.

    Args:
        checkpoint: ``ImageReward.pt``, a folder holding it, or a hub repo id (``THUDM/ImageReward``);
            read with ``torch.load(weights_only=True)``.
        med_config: BLIP's ``med_config.json`` (path, folder or hub repo id); default: next to the
            checkpoint (same folder or repo).
        tokenizer: the BERT tokenizer (hub id or folder).
        vision_heads: attention heads of the ViT (16 for ViT-L; not recoverable from shapes).
    """
    from transformers import BlipTextModel, BlipVisionModel

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    ckpt_path = resolve_file(checkpoint, "ImageReward.pt")
    if med_config is None:
        med_config = os.path.dirname(ckpt_path) if os.path.isfile(checkpoint) else checkpoint
    with open(resolve_file(med_config, "med_config.json")) as f:
        med = json.load(f)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    vision_sd, text_sd, mlp_sd = convert_state_dict(state)

    vision = BlipVisionModel(_vision_config(vision_sd, vision_heads))
    vision.load_state_dict(vision_sd, strict=True)
    text = BlipTextModel(_text_config(text_sd, med, vision.config.hidden_size), add_pooling_layer=False)
    missing, unexpected = text.load_state_dict(text_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"ImageReward text encoder: missing keys {missing}, unexpected keys {unexpected}")
    mlp = LinearMLPHead(text.config.hidden_size)
    mlp.load_state_dict(mlp_sd, strict=True)
    vision, text = (freeze(m.to(device=dev, dtype=dt)) for m in (vision, text))
    return ImageReward(vision, text, freeze(mlp.to(dev)), load_tokenizer(tokenizer), dev, dt)
