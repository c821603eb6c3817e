"""Rewards against an exemplar set in an encoder's feature space (DRAGON, Bai et al. 2025, arXiv 2504.15217).

DRAGON builds rewards from *an encoder and a set of reference examples* (the exemplar distribution)
and distinguishes three kinds of reward; two of them live here (the third, instance-wise, is any
other reward of the registry):

* **instance-to-distribution** — one image against the exemplar set: ``exemplar_similarity``, the
  cosine between the image's feature and the exemplar mean (``mode="cosine"``; for unit features the
  mean of the cosines to every exemplar is this times ‖mean‖, a constant, so the two rank alike), or
  ``mode="neg_sq_dist"``, −‖f − μ_ref‖², which is minus the Fréchet distance between the point mass at
  f and N(μ_ref, Σ_ref) up to the constant Tr Σ_ref (the image analogue of DRAGON's per-song FAD).
* **distribution-to-distribution** — the generated batch against the exemplar set: ``exemplar_fd``,
  the Fréchet distance between Gaussians fitted to both feature sets (FID/FAD's formula; lower is
  better, so the reward is −FD). As a per-image reward it scores each image by its leave-one-out
  contribution FD(batch ∖ {i}) − FD(batch) (> 0: the image brings the batch closer), and reports the
  batch's FD in ``info["fd"]``; such scores depend on the whole batch scored together.

The exemplar set is a folder of images, a safetensors file of precomputed features (tensor
``features`` [M, D], metadata ``encoder`` = the encoder's name, checked on load), or text prompts
embedded by the text tower of a cross-modal encoder (CLIP), as DRAGON does with CLAP text embeddings
for music. Encoders: a transformers ``CLIPModel`` folder (the pocket CLIP by default) or an open_clip
model; features are L2-normalised by default (CLIP's space is a cosine space, and it puts text and
image features on the same sphere). The Fréchet distance runs in float64 with the matrix square root
taken by symmetric eigendecompositions and an SVD (``frechet_distance``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import transforms as T
from .base import freeze, resolve_device, resolve_dtype

__all__ = [
    "ClipEncoder", "OpenClipEncoder", "ENCODERS", "build_encoder", "Exemplars", "load_exemplars",
    "encode_image_folder", "save_exemplar_features", "feature_stats", "sqrtm_psd", "frechet_distance",
    "fd_leave_one_out_gains", "ExemplarSimilarity", "FrechetToExemplars", "exemplar_similarity", "exemplar_fd",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES_KEY = "features"


# --------------------------------------------------------------------------------------------------
# Fréchet distance (float64)


def feature_stats(features_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (unbiased, as pytorch-fid / numpy.cov) of features, float64.
    One sample has zero covariance."""
    x = features_ND.detach().double()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be [N, D] with N >= 1, got {tuple(x.shape)}")
    mu = x.mean(0)
    if len(x) == 1:
        return mu, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def sqrtm_psd(mat_DD: torch.Tensor) -> torch.Tensor:
    """The symmetric PSD square root of a symmetric PSD matrix (eigendecomposition; eigenvalues that
    rounding made slightly negative are set to 0), float64."""
    m = mat_DD.double()
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """Fréchet (2-Wasserstein) distance² between N(μ₁, Σ₁) and N(μ₂, Σ₂), float64 scalar:

        FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2})

    Σ₁Σ₂ is not symmetric, but it is similar to the PSD matrix A·Aᵀ with A = Σ₁^{1/2} Σ₂^{1/2}, so
    Tr (Σ₁Σ₂)^{1/2} = Σᵢ sᵢ(A), the sum of A's singular values: two symmetric eigendecompositions and
    an SVD, no complex parts to discard (scipy's ``sqrtm`` route). Singular values are accurate to
    rounding in absolute terms, so covariances of fewer samples than dimensions (singular) lose
    nothing: FD of a set to itself is ~1e-14·Tr Σ, where square roots of M = A·Aᵀ's eigenvalues would
    leave ~1e-8.
    """
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"Fréchet distance needs equal dimensions, got means {tuple(mu1.shape)}, "
                         f"{tuple(mu2.shape)} and covariances {tuple(cov1.shape)}, {tuple(cov2.shape)}")
    tr_sqrt = torch.linalg.svdvals(sqrtm_psd(cov1) @ sqrtm_psd(cov2)).sum()
    return ((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt


def fd_leave_one_out_gains(features_ND: torch.Tensor, ref_mu: torch.Tensor, ref_cov: torch.Tensor) -> torch.Tensor:
    """Each sample's contribution to the set's Fréchet distance to the reference:
    gain_i = FD(S ∖ {i}, ref) − FD(S, ref) → [N] float64 (> 0: sample i brings S closer).

    Every leave-one-out set has N − 1 samples, so FD's sample-size bias is common to all i: the
    ranking of the gains is meaningful even where their sign is not.
    """
    n = len(features_ND)
    if n < 3:
        raise ValueError(f"leave-one-out Fréchet gains need at least 3 samples, got {n}")
    full = frechet_distance(*feature_stats(features_ND), ref_mu, ref_cov)
    keep = ~torch.eye(n, dtype=torch.bool, device=features_ND.device)
    loo = [frechet_distance(*feature_stats(features_ND[keep[i]]), ref_mu, ref_cov) for i in range(n)]
    return torch.stack(loo) - full


# --------------------------------------------------------------------------------------------------
# encoders: images [B,3,H,W] in [0,1] (and texts) -> features [B, D]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ClipEncoder:
    """A transformers ``CLIPModel``'s image (and text) tower as a feature extractor.

    ``images`` reproduces the ``CLIPImageProcessor`` in torch (differentiable); ``texts`` tokenizes
    with the model's tokenizer. ``name`` identifies the encoder in saved exemplar features.
    """

    def __init__(self, model, processor, device, dtype, name: str, normalize: bool = True, max_length: int = 77):
        self.model, self.tokenizer = model, processor.tokenizer
        self.image_input = T.ClipImageInput(processor.image_processor)
        self.device, self.dtype, self.name, self.normalize = device, dtype, name, normalize
        self.max_length = max_length
        self.dim = int(model.config.projection_dim)

    def images(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        from .pickscore import clip_features

        T.check_images(images_BCHW)
        x = self.image_input(images_BCHW.to(self.device)).to(self.dtype)
        f = clip_features(self.model.get_image_features(pixel_values=x)).float()
        return _unit(f) if self.normalize else f

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        from .pickscore import clip_features

        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        f = clip_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                       attention_mask=tok["attention_mask"])).float()
        return _unit(f) if self.normalize else f

    def __repr__(self) -> str:
        return f"ClipEncoder({self.name}, dim={self.dim}, device={self.device})"


class OpenClipEncoder:
    """An open_clip model's image (and text) tower as a feature extractor (``clip.OpenClipScore``'s
    preprocessing)."""

    def __init__(self, model, tokenizer, preprocess: Callable, device, dtype, name: str, normalize: bool = True):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device, self.dtype, self.name, self.normalize = device, dtype, name, normalize
        with torch.no_grad():
            self.dim = int(self.texts(["a"]).shape[1])

    def images(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        T.check_images(images_BCHW)
        x = self.preprocess(images_BCHW.to(self.device, torch.float32)).to(self.dtype)
        return self.model.encode_image(x, normalize=self.normalize).float()

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=self.normalize).float()

    def __repr__(self) -> str:
        return f"OpenClipEncoder({self.name}, dim={self.dim}, device={self.device})"


def clip_encoder(path: str | None = None, device: str | None = None, dtype: str = "float32",
                 name: str | None = None, normalize: bool = True) -> ClipEncoder:
    """A transformers ``CLIPModel`` encoder. ``path``: a folder (``save_pretrained`` format, with its
    tokenizer and image processor) or hub id; default the shipped pocket CLIP (name ``pocket_clip``).
    ``name`` (default ``clip:<path>``) is what exemplar feature files record."""
    from .pickscore import load_hf_clip

    if path is None:
        from ..pocket.assets import CLIP_DIR, shipped

        path, name = str(shipped(CLIP_DIR, "CLIP")), name or "pocket_clip"
    model, proc, dev, dt, max_length = load_hf_clip(path, path, device, dtype)
    return ClipEncoder(model, proc, dev, dt, name or f"clip:{path}", normalize, max_length)


def pocket_clip_encoder(device: str | None = None, dtype: str = "float32", normalize: bool = True) -> ClipEncoder:
    """The shipped pocket CLIP as an encoder (name ``pocket_clip``)."""
    return clip_encoder(None, device=device, dtype=dtype, normalize=normalize)


def open_clip_encoder(model_name: str = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k",
                      device: str | None = None, dtype: str = "float32", cache_dir: str | None = None,
                      normalize: bool = True) -> OpenClipEncoder:
    """An open_clip encoder (name ``open_clip:<model_name>:<pretrained>``); arguments as ``clip.clip``."""
    import open_clip

    from .clip import _open_clip_preprocess

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = open_clip.create_model(model_name, pretrained=pretrained, device=dev, cache_dir=cache_dir)
    model = freeze(model.to(dtype=dt))
    return OpenClipEncoder(model, open_clip.get_tokenizer(model_name), _open_clip_preprocess(model), dev, dt,
                           f"open_clip:{model_name}:{pretrained}", normalize)


ENCODERS: dict[str, Callable] = {
    "pocket_clip": pocket_clip_encoder, "clip": clip_encoder, "open_clip": open_clip_encoder,
}


def build_encoder(name: str = "pocket_clip", **args):
    """An encoder from ``ENCODERS`` by name, with its factory's arguments."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; use one of {sorted(ENCODERS)} "
                         f"(e.g. encoder='clip', encoder_args={{'path': FOLDER}})")
    return ENCODERS[name](**args)


# --------------------------------------------------------------------------------------------------
# exemplar sets


@dataclass
class Exemplars:
    """An exemplar set's features [M, D] (float32) and the name of the encoder that made them."""

    features: torch.Tensor
    encoder: str
    _stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [D], covariance [D, D]) in float64, computed once."""
        if self._stats is None:
            self._stats = feature_stats(self.features)
        return self._stats


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"exemplar image folder {str(folder)!r} does not exist; pass a folder of "
                         f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images, or exemplar_features=FILE")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"exemplar image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                         f"put the exemplar images there, or pass exemplar_features=FILE")
    return files


@torch.no_grad()
def encode_image_folder(folder: str | os.PathLike, encoder, batch_size: int = 64) -> torch.Tensor:
    """Features [M, D] (float32, CPU) of every image in ``folder`` (not recursive, sorted by name);
    images of equal size are encoded together in batches of ``batch_size``."""
    import numpy as np
    from PIL import Image

    files = _image_files(Path(folder).expanduser())
    images = []
    for p in files:
        with Image.open(p) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1))
    feats: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    for idx in by_size.values():
        for a in range(0, len(idx), batch_size):
            chunk = idx[a:a + batch_size]
            out = encoder.images(torch.stack([images[i] for i in chunk])).float().cpu()
            for i, f in zip(chunk, out):
                feats[i] = f
    return torch.stack(feats)  # type: ignore[arg-type]


def save_exemplar_features(path: str | os.PathLike, features_MD: torch.Tensor, encoder_name: str) -> None:
    """Write exemplar features as safetensors: tensor ``features`` [M, D], metadata ``encoder``."""
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    f = features_MD.detach().float().cpu().contiguous()
    if f.ndim != 2:
        raise ValueError(f"exemplar features must be [M, D], got {tuple(f.shape)}")
    atomic_write_bytes(path, save({FEATURES_KEY: f}, metadata={"encoder": encoder_name, "dim": str(f.shape[1])}))


def _read_features(path: Path, encoder) -> torch.Tensor:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"exemplar features file {str(path)!r} does not exist; write one with "
                         f"flowalign.rewards.distributional.save_exemplar_features, or pass exemplar_images=FOLDER")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if FEATURES_KEY not in f.keys():
            raise ValueError(f"exemplar features file {str(path)!r} has no {FEATURES_KEY!r} tensor; write it with "
                             f"save_exemplar_features")
        feats = f.get_tensor(FEATURES_KEY).float()
    made_with = meta.get("encoder")
    if made_with is None:
        raise ValueError(f"exemplar features file {str(path)!r} does not record its encoder (metadata 'encoder'); "
                         f"rewrite it with save_exemplar_features(path, features, encoder.name)")
    if made_with != encoder.name:
        raise ValueError(f"exemplar features in {str(path)!r} were made with encoder {made_with!r}, not "
                         f"{encoder.name!r}; recompute them with this encoder, or use the encoder they were made with")
    if feats.ndim != 2 or feats.shape[1] != encoder.dim:
        raise ValueError(f"exemplar features in {str(path)!r} have shape {tuple(feats.shape)} but encoder "
                         f"{encoder.name!r} gives {encoder.dim}-dimensional features; recompute them with "
                         f"save_exemplar_features for this encoder")
    if len(feats) == 0:
        raise ValueError(f"exemplar features file {str(path)!r} holds no exemplars")
    return feats


def _read_texts(texts: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(texts, (str, os.PathLike)):
        from ..prompts import read_prompts

        return [row["prompt"] for row in read_prompts(texts)]
    out = [str(t) for t in texts]
    if not out:
        raise ValueError("exemplar_texts is empty; give prompts (a list, or a .txt/.jsonl prompt file)")
    return out


def load_exemplars(
    encoder,
    *,
    images: str | os.PathLike | None = None,
    features: str | os.PathLike | None = None,
    texts: str | os.PathLike | Sequence[str] | None = None,
    batch_size: int = 64,
) -> Exemplars:
    """An exemplar set from exactly one source: a folder of ``images``, a safetensors ``features`` file
    (its recorded encoder must be ``encoder``), or ``texts`` (a list or a prompt file) embedded by
    ``encoder``'s text tower (cross-modal exemplars, DRAGON's text references)."""
    given = [k for k, v in (("images", images), ("features", features), ("texts", texts)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one exemplar source (exemplar_images=FOLDER, exemplar_features=FILE or "
                         f"exemplar_texts=PROMPTS), got {given or 'none'}")
    if images is not None:
        feats = encode_image_folder(images, encoder, batch_size)
    elif features is not None:
        feats = _read_features(Path(features).expanduser(), encoder)
    else:
        prompts = _read_texts(texts)
        with torch.no_grad():
            feats = torch.cat([encoder.texts(prompts[a:a + batch_size]).float().cpu()
                               for a in range(0, len(prompts), batch_size)])
    return Exemplars(feats, encoder.name)


# --------------------------------------------------------------------------------------------------
# rewards


class ExemplarSimilarity:
    """Instance-to-distribution reward: each image against the exemplar set (module docstring).

    ``cosine``: cos(f, μ_ref); ``neg_sq_dist``: −‖f − μ_ref‖². Differentiable (gradients reach the
    pixels through the encoder).
    """

    differentiable = True
    name = "exemplar_similarity"

    def __init__(self, encoder, exemplars: Exemplars, mode: str = "cosine"):
        if mode not in ("cosine", "neg_sq_dist"):
            raise ValueError(f"unknown exemplar_similarity mode {mode!r}; use 'cosine' or 'neg_sq_dist'")
        if exemplars.encoder != encoder.name:
            raise ValueError(f"exemplars were made with encoder {exemplars.encoder!r}, not {encoder.name!r}")
        self.encoder, self.exemplars, self.mode = encoder, exemplars, mode
        self.mean_D = exemplars.features.float().mean(0)

    def __call__(self, images, prompts, metadata=None):
        f = self.encoder.images(images).float()
        mu = self.mean_D.to(f.device)
        if self.mode == "cosine":
            scores = (_unit(f) * _unit(mu)).sum(-1)
        else:
            scores = -((f - mu) ** 2).sum(-1)
        return scores.to(images.device), {}

    def __repr__(self) -> str:
        return f"ExemplarSimilarity({self.encoder.name}, {len(self.exemplars)} exemplars, mode={self.mode})"


class FrechetToExemplars:
    """Distribution-to-distribution reward: the Fréchet distance between the batch's features and the
    exemplar set's (``info["fd"]``, float; the reward is −FD). Per image: its leave-one-out gain
    FD(batch ∖ {i}) − FD(batch) (``fd_leave_one_out_gains``), so the scores depend on the batch they
    are computed in (score a whole iteration's images together). Not differentiable."""

    differentiable = False
    name = "exemplar_fd"

    def __init__(self, encoder, exemplars: Exemplars):
        if exemplars.encoder != encoder.name:
            raise ValueError(f"exemplars were made with encoder {exemplars.encoder!r}, not {encoder.name!r}")
        if len(exemplars) < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 exemplars (a covariance), got {len(exemplars)}")
        self.encoder, self.exemplars = encoder, exemplars

    def features(self, images) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.images(images).float().cpu()

    def fd(self, features_ND: torch.Tensor) -> float:
        """FD between these features and the exemplars (lower is better)."""
        return float(frechet_distance(*feature_stats(features_ND), *self.exemplars.stats))

    def __call__(self, images, prompts, metadata=None):
        f = self.features(images)
        gains = fd_leave_one_out_gains(f, *self.exemplars.stats)
        return gains.float().to(images.device), {"fd": self.fd(f)}

    def __repr__(self) -> str:
        return f"FrechetToExemplars({self.encoder.name}, {len(self.exemplars)} exemplars)"


def _exemplars_from_args(encoder: str, encoder_args: dict | None, exemplar_images, exemplar_features, exemplar_texts):
    enc = build_encoder(encoder, **(encoder_args or {}))
    return enc, load_exemplars(enc, images=exemplar_images, features=exemplar_features, texts=exemplar_texts)


def exemplar_similarity(
    exemplar_images: str | None = None,
    exemplar_features: str | None = None,
    exemplar_texts: str | list[str] | None = None,
    encoder: str = "pocket_clip",
    encoder_args: dict | None = None,
    mode: str = "cosine",
) -> ExemplarSimilarity:
    """Instance-to-distribution reward: cosine to (``mode="cosine"``) or minus squared distance from
    (``"neg_sq_dist"``) the exemplar mean in ``encoder``'s feature space. Exactly one exemplar source:
    a folder of images, a features file (``save_exemplar_features``) or prompts (list or file).
    ``encoder``: ``pocket_clip``, ``clip`` (``encoder_args={'path': ...}``) or ``open_clip``
    (``encoder_args={'model_name': ..., 'pretrained': ...}``)."""
    enc, ex = _exemplars_from_args(encoder, encoder_args, exemplar_images, exemplar_features, exemplar_texts)
    return ExemplarSimilarity(enc, ex, mode)


def exemplar_fd(
    exemplar_images: str | None = None,
    exemplar_features: str | None = None,
    exemplar_texts: str | list[str] | None = None,
    encoder: str = "pocket_clip",
    encoder_args: dict | None = None,
) -> FrechetToExemplars:
    """Distribution-to-distribution reward: the Fréchet distance of the scored batch to the exemplar
    set in ``encoder``'s feature space (per image: leave-one-out gain; ``info["fd"]``: the batch's FD).
    Arguments as ``exemplar_similarity``."""
    enc, ex = _exemplars_from_args(encoder, encoder_args, exemplar_images, exemplar_features, exemplar_texts)
    return FrechetToExemplars(enc, ex)
