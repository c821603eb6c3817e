"""CLIP-score rewards on open_clip models: ``clip`` (any open_clip model), ``hpsv2``/``hpsv2.1``.

Score = ``scale`` · cos(image features, text features). CLIPScore (Hessel et al. 2021) is
2.5·max(cos, 0); ``clip`` uses scale 1 and no clamp so gradients always reach the pixels.
HPS v2 / v2.1 (Wu et al. 2023) is an open_clip ViT-H-14 fine-tuned on human preferences; its
score is the plain cosine (``hpsv2/img_score.py``: ``image_features @ text_features.T`` on
normalized features), with HPS's own preprocessing (longest side to 224, zero padding).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..errors import UserError
from . import transforms as T
from .base import freeze, resolve_device, resolve_dtype, resolve_file


class OpenClipScore:
    """``scale · cos`` between an open_clip model's image and text embeddings.

    ``preprocess`` maps images [B,3,H,W] in [0,1] to the model's normalized input (in torch).
    Each distinct prompt of a batch is encoded once.
    """

    differentiable = True

    def __init__(self, name: str, model, tokenizer, preprocess: Callable, scale: float, device, dtype):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.preprocess, self.scale, self.device, self.dtype = preprocess, scale, device, dtype

    def __call__(self, images, prompts, metadata=None):
        T.check_images(images)
        assert len(prompts) == images.shape[0], "one prompt per image"
        x = self.preprocess(images.to(self.device, torch.float32)).to(self.dtype)
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(self.device)
        img_BD = self.model.encode_image(x, normalize=True).float()
        txt_PD = self.model.encode_text(tokens, normalize=True).float()
        txt_BD = txt_PD[torch.tensor([unique.index(p) for p in prompts], device=self.device)]
        scores = self.scale * (img_BD * txt_BD).sum(-1)
        return scores.to(images.device), {}

    def __repr__(self) -> str:
        return f"OpenClipScore({self.name}, device={self.device}, dtype={self.dtype})"


def _open_clip_preprocess(model) -> Callable:
    """The tensor version of open_clip's evaluation transform for ``model``."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size_hw = (size, size) if isinstance(size, int) else tuple(size)
    if cfg.get("interpolation", "bicubic") != "bicubic":
        raise UserError(f"open_clip interpolation {cfg['interpolation']!r} is not supported; flowalign "
                         f"reproduces the bicubic transform only")
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest" and size_hw[0] == size_hw[1]:
        def preprocess(x):
            return T.normalize(T.center_crop(T.resize_shortest(x, size_hw[0]), size_hw), cfg["mean"], cfg["std"])
    elif mode == "squash":
        def preprocess(x):
            return T.normalize(T.resize(x, size_hw), cfg["mean"], cfg["std"])
    else:
        raise UserError(f"open_clip resize_mode {mode!r} with size {size} is not supported "
                         f"(supported: 'shortest' with a square size, 'squash')")
    return preprocess


def clip(
    model_name: str = "ViT-H-14",
    pretrained: str | None = "laion2b_s32b_b79k",
    scale: float = 1.0,
    device: str | None = None,
    dtype: str = "float32",
    cache_dir: str | None = None,
) -> OpenClipScore:
    """CLIP score with an open_clip model.

    Args:
        model_name: open_clip model name (``open_clip.list_models()``) or ``hf-hub:org/repo``.
        pretrained: an open_clip pretrained tag (``open_clip.list_pretrained()``), a local
            checkpoint path, or None (only with ``hf-hub:`` names, which carry their weights).
        scale: multiplies the cosine (2.5 gives CLIPScore's scale).
        device, dtype: where and in which precision the model runs (default: cuda if available).
    """
    import open_clip

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = open_clip.create_model(model_name, pretrained=pretrained, device=dev, cache_dir=cache_dir)
    model = freeze(model.to(dtype=dt))
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenClipScore("clip", model, tokenizer, _open_clip_preprocess(model), scale, dev, dt)


HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _hps_preprocess(x, size: int):
    return T.normalize(T.resize_longest_pad(x, size, fill=0.0), T.OPENAI_CLIP_MEAN, T.OPENAI_CLIP_STD)


def hps(
    version: str = "v2.1",
    checkpoint: str = "xswu/HPSv2",
    model_name: str = "ViT-H-14",
    device: str | None = None,
    dtype: str = "float32",
) -> OpenClipScore:
    """Human Preference Score v2 / v2.1.

    Args:
        version: ``v2.0`` (``HPS_v2_compressed.pt``) or ``v2.1`` (``HPS_v2.1_compressed.pt``).
        checkpoint: a hub repo id holding those files (default ``xswu/HPSv2``), a folder with
            them, or the checkpoint file itself. The file is a dict with the full open_clip
            state dict under ``state_dict``; it is read with ``torch.load(weights_only=True)``.
        model_name: the open_clip architecture (ViT-H-14 for the released checkpoints).
    """
    import open_clip

    if version not in HPS_FILES:
        raise UserError(f"unknown HPS version {version!r}; use one of {sorted(HPS_FILES)}")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    path = resolve_file(checkpoint, HPS_FILES[version])
    # The HPS checkpoint holds every weight, so the LAION weights HPSv2 loads first are not needed.
    model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    model = freeze(model.to(device=dev, dtype=dt))
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    name = "hpsv2" if version == "v2.0" else "hpsv2.1"
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenClipScore(name, model, tokenizer, partial(_hps_preprocess, size=size), 1.0, dev, dt)


def hpsv2(**kwargs) -> OpenClipScore:
    return hps(version="v2.0", **kwargs)


def hpsv2_1(**kwargs) -> OpenClipScore:
    return hps(version="v2.1", **kwargs)
