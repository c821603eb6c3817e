"""PickScore (Kirstain et al. 2023) on a transformers ``CLIPModel``.

A CLIP-H fine-tuned on Pick-a-Pic preferences; score = logit_scale.exp() · cos(image, text), with
the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (the model card's reference code).
The image side reproduces ``CLIPImageProcessor`` in torch (``transforms.ClipImageInput``):
shortest side to ``size`` (bicubic), center crop, normalize with the processor's mean and std.
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from ..io import check_safetensors
from . import transforms as T
from .base import freeze, resolve_device, resolve_dtype


def clip_features(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5 returns an output whose
    ``pooler_output`` holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScore:
    differentiable = True
    name = "pickscore"

    def __init__(self, model, processor, device, dtype, max_length: int = 77, name: str = "pickscore"):
        self.name = name
        self.model, self.tokenizer = model, processor.tokenizer
        self.image_input = T.ClipImageInput(processor.image_processor)
        self.device, self.dtype, self.max_length = device, dtype, max_length

    def __call__(self, images, prompts, metadata=None):
        T.check_images(images)
        assert len(prompts) == images.shape[0], "one prompt per image"
        x = self.image_input(images.to(self.device)).to(self.dtype)
        unique = list(dict.fromkeys(prompts))
        tok = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        img_BD = clip_features(self.model.get_image_features(pixel_values=x)).float()
        txt_PD = clip_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                        attention_mask=tok["attention_mask"])).float()
        img_BD = img_BD / img_BD.norm(dim=-1, keepdim=True)
        txt_PD = txt_PD / txt_PD.norm(dim=-1, keepdim=True)
        txt_BD = txt_PD[torch.tensor([unique.index(p) for p in prompts], device=self.device)]
        scores = self.model.logit_scale.exp().float() * (img_BD * txt_BD).sum(-1)
        return scores.to(images.device), {}

    def __repr__(self) -> str:
        return f"PickScore(name={self.name}, device={self.device}, dtype={self.dtype})"


def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str | None = None,
    dtype: str = "float32",
    name: str = "pickscore",
) -> PickScore:
    """PickScore. ``model``/``processor``: hub ids or local folders (``save_pretrained`` format).
    Any transformers ``CLIPModel`` scores the same way (``pocket_clip`` is one)."""
    clip_model, proc, dev, dt, max_length = load_hf_clip(model, processor, device, dtype)
    return PickScore(clip_model, proc, dev, dt, max_length=max_length, name=name)


def load_hf_clip(model: str, processor: str, device: str | None, dtype: str):
    """A frozen transformers ``CLIPModel`` and its processor (hub ids or local folders) →
    ``(model, processor, device, dtype, max_text_length)``; a folder that is no CLIPModel checkpoint
    fails with the keys that are missing or mismatched."""
    from transformers import AutoProcessor, CLIPModel

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if os.path.isdir(model):
        check_safetensors(model, f"reward model {model}")
    proc = AutoProcessor.from_pretrained(processor)
    clip_model, loading = CLIPModel.from_pretrained(model, output_loading_info=True)
    if loading["missing_keys"] or loading["mismatched_keys"]:
        raise UserError(f"{model} is not a CLIPModel checkpoint: missing {sorted(loading['missing_keys'])[:5]}, "
                         f"mismatched {list(loading['mismatched_keys'])[:5]}")
    clip_model = freeze(clip_model.to(device=dev, dtype=dt))
    max_length = min(proc.tokenizer.model_max_length, 77)  # CLIP text towers have 77 positions at most
    return clip_model, proc, dev, dt, max_length
