"""LAION aesthetic predictor v2 (``improved-aesthetic-predictor``, ``sac+logos+ava1-l14-linearMSE.pth``).

CLIP ViT-L/14 image embeddings, L2-normalized, through a linear MLP 768-1024-128-64-16-1, as in
DDPO and trl's DDPO example (whose hub mirror ``trl-lib/ddpo-aesthetic-predictor`` holds the head
as ``aesthetic-model.pth``). Images are preprocessed in torch like ``CLIPImageProcessor``.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from . import transforms as T
from .base import LinearMLPHead, freeze, resolve_device, resolve_dtype, resolve_file


class AestheticScore:
    differentiable = True
    name = "aesthetic"

    def __init__(self, vision, image_processor, mlp: LinearMLPHead, device, dtype):
        self.vision, self.mlp = vision, mlp
        self.image_input = T.ClipImageInput(image_processor)
        self.device, self.dtype = device, dtype

    def __call__(self, images, prompts=None, metadata=None):
        T.check_images(images)
        x = self.image_input(images.to(self.device)).to(self.dtype)
        emb_BD = self.vision(pixel_values=x).image_embeds.float()
        emb_BD = emb_BD / emb_BD.norm(dim=-1, keepdim=True)
        scores = self.mlp(emb_BD).squeeze(-1)
        return scores.to(images.device), {}

    def __repr__(self) -> str:
        return f"AestheticScore(device={self.device}, dtype={self.dtype})"


def aesthetic(
    clip_model: str = "openai/clip-vit-large-patch14",
    weights: str = "trl-lib/ddpo-aesthetic-predictor",
    weights_filename: str = "aesthetic-model.pth",
    device: str | None = None,
    dtype: str = "float32",
) -> AestheticScore:
    """LAION aesthetic predictor v2.

    Args:
        clip_model: CLIP ViT-L/14 hub id or local folder (a ``CLIPModel`` checkpoint and its
            processor); only the vision tower and projection are loaded.
        weights: the MLP head: a ``.pth`` state dict, a folder holding ``weights_filename``, or
            a hub repo id (read with ``torch.load(weights_only=True)``).
    """
    from transformers import AutoProcessor, CLIPConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    image_processor = AutoProcessor.from_pretrained(clip_model).image_processor
    # The vision tower alone, with the projection width of the full CLIP config.
    config = CLIPConfig.from_pretrained(clip_model)
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's weights are expected to be left out
    try:
        vision, loading = CLIPVisionModelWithProjection.from_pretrained(
            clip_model, config=vision_config, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if loading["missing_keys"] or loading["mismatched_keys"]:
        raise UserError(f"{clip_model} is not a CLIP checkpoint with a vision tower and projection: missing "
                         f"{sorted(loading['missing_keys'])[:5]}, mismatched {list(loading['mismatched_keys'])[:5]}")
    vision = freeze(vision.to(device=dev, dtype=dt))
    state = torch.load(resolve_file(weights, weights_filename), map_location="cpu", weights_only=True)
    mlp = LinearMLPHead(vision.config.projection_dim)
    mlp.load_state_dict(state)
    return AestheticScore(vision, image_processor, freeze(mlp.to(dev)), dev, dt)
