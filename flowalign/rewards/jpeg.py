"""JPEG (in)compressibility rewards (DDPO, Black et al. 2023, ``ddpo_pytorch/rewards.py``).

The size of the image saved as JPEG at quality 95, in kB (1000 bytes): compressibility is the
negative size (rewards flat, simple images), incompressibility the positive size (rewards
detail and texture). No weights, not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .transforms import check_images


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB of each image [B,3,H,W] in [0,1] -> [B] float32 (on the images' device)."""
    check_images(images)
    arr_BHWC = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for arr in arr_BHWC:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegReward:
    """``sign`` = -1: compressibility; +1: incompressibility."""

    differentiable = False

    def __init__(self, sign: int, quality: int = 95):
        assert sign in (-1, 1)
        self.sign, self.quality = sign, quality
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    def __call__(self, images, prompts, metadata=None):
        kb = jpeg_size_kb(images, self.quality)
        return self.sign * kb, {"jpeg_kb": kb}

    def __repr__(self) -> str:
        return f"JpegReward({self.name}, quality={self.quality})"


def jpeg_compressibility(quality: int = 95) -> JpegReward:
    return JpegReward(-1, quality)


def jpeg_incompressibility(quality: int = 95) -> JpegReward:
    return JpegReward(+1, quality)
