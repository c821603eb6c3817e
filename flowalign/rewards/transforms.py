"""Differentiable tensor versions of the reward models' reference image preprocessing.

The references resize PIL images with bicubic filtering (torchvision ``Resize`` on PIL, CLIP's
``CLIPImageProcessor``). ``F.interpolate(mode="bicubic", antialias=True)`` uses the same filter
(a = -0.5, widened when downsampling), so the tensor path matches the PIL path up to PIL's 8-bit
rounding; the tests check the resulting scores agree within 1e-3. Outputs are clamped to [0, 1]
as PIL's 8-bit output is. Everything works on batches [B,3,H,W] in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(x_BCHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize to ``size_hw`` (PIL's ``BICUBIC``), clamped to [0, 1]."""
    if tuple(x_BCHW.shape[-2:]) == tuple(size_hw):
        return x_BCHW
    y = F.interpolate(x_BCHW, size=size_hw, mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(0.0, 1.0)


def resize_shortest(x_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side to ``size``, aspect kept (torchvision ``Resize(int)``: long side truncated)."""
    h, w = x_BCHW.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return resize(x_BCHW, (new_h, new_w))


def center_crop(x_BCHW: torch.Tensor, size_hw: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """torchvision ``CenterCrop``: pad with ``fill`` when smaller, then crop the center."""
    th, tw = size_hw
    h, w = x_BCHW.shape[-2:]
    if h < th or w < tw:
        pad_h, pad_w = max(th - h, 0), max(tw - w, 0)
        x_BCHW = F.pad(x_BCHW, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        h, w = x_BCHW.shape[-2:]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x_BCHW[..., top : top + th, left : left + tw]


def resize_longest_pad(x_BCHW: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize``: longest side to ``size``, then pad to a square with ``fill``
    (left/top get the floor half of the padding)."""
    h, w = x_BCHW.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x_BCHW = resize(x_BCHW, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x_BCHW, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(x_BCHW: torch.Tensor, mean, std) -> torch.Tensor:
    mean_ = torch.as_tensor(mean, dtype=x_BCHW.dtype, device=x_BCHW.device).view(1, -1, 1, 1)
    std_ = torch.as_tensor(std, dtype=x_BCHW.dtype, device=x_BCHW.device).view(1, -1, 1, 1)
    return (x_BCHW - mean_) / std_


def clip_preprocess(x_BCHW: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's evaluation transform: shortest side to ``size``, center crop, normalize."""
    x = center_crop(resize_shortest(x_BCHW.float(), size), (size, size))
    return normalize(x, mean, std)


class ClipImageInput:
    """The tensor version of a ``CLIPImageProcessor``'s resize / crop / normalize."""

    def __init__(self, image_processor):
        ip = image_processor
        size = ip.size
        if "shortest_edge" not in size:
            raise ValueError(f"image processor size {dict(size)} is not shortest-edge; not supported")
        if int(ip.resample) != 3:  # PIL's BICUBIC
            raise ValueError(f"image processor resample {ip.resample!r} is not bicubic; not supported")
        self.size = int(size["shortest_edge"])
        crop = ip.crop_size if ip.do_center_crop else None
        self.crop_hw = (int(crop["height"]), int(crop["width"])) if crop else None
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)

    def __call__(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x = resize_shortest(x_BCHW.float(), self.size)
        if self.crop_hw is not None:
            x = center_crop(x, self.crop_hw)
        return normalize(x, self.mean, self.std)


def check_images(images: torch.Tensor) -> None:
    """Rewards take [B,3,H,W] float images; a wrong shape is a caller bug worth a clear message."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"rewards take float images [B,3,H,W] in [0,1], got {tuple(images.shape)} {images.dtype}"
        )
