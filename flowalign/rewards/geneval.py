"""The GenEval reward: a transformers object detector and a CLIP color classifier feeding GenEval's
rules (``flowalign.eval.geneval``), as Flow-GRPO trains SD3.5-M on GenEval (Liu et al. 2025).

GenEval itself runs an mmdetection Mask2Former (Swin-S, COCO instance segmentation) and open_clip
ViT-L-14 (OpenAI weights). Here the detector is any transformers model chosen by id:

- ``AutoModelForObjectDetection`` models (DETR, Deformable/Conditional DETR, RT-DETR, YOLOS, ...):
  boxes and COCO labels;
- Mask2Former / MaskFormer instance segmentation (``facebook/mask2former-swin-small-coco-instance``,
  the default, is GenEval's detector in transformers form): masks, boxes from the masks' extents;
- OWLv2 / OWL-ViT: open vocabulary, queried with ``"a photo of a <class>"`` for the 80 classes.

Labels are mapped to GenEval's class names (``class_of_label``: ``mouse`` → ``computer mouse`` ...).
The color of an object is CLIP's zero-shot pick among GenEval's ten colors, on the image composited
over a ``bgcolor`` (#999) background through the object's mask (when the detector gives one) and
cropped to its box, with GenEval's three templates ("a photo of a {color} {class}", "a photo of a
{color}-colored {class}", "a photo of a {color} object"), their normalised text embeddings averaged.
The CLIP is a transformers ``CLIPModel`` (``openai/clip-vit-large-patch14`` holds the same weights
as open_clip's ViT-L-14 ``openai``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..eval import geneval as G
from .base import freeze, resolve_device, resolve_dtype
from .transforms import check_images

CLOSED_SET_SEGMENTERS = ("mask2former", "maskformer")
OPEN_VOCABULARY = ("owlv2", "owlvit")
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


def _to_pil(images_BCHW) -> list:
    from PIL import Image

    arr = (images_BCHW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def detector_kind(model_id: str) -> str:
    """``"boxes"``, ``"masks"`` or ``"open_vocabulary"`` for a transformers detector id or folder;
    ValueError when the model cannot be read or is no object detector."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as err:  # offline, unknown id, not a model folder: one fix for the user
        raise UserError(f"GenEval detector {model_id!r}: cannot read its config ({type(err).__name__}: {err}). "
                         "Give a local folder or a hub id reachable from here, e.g. "
                         "facebook/mask2former-swin-small-coco-instance or facebook/detr-resnet-50") from err
    kind = config.model_type
    if kind in OPEN_VOCABULARY:
        return "open_vocabulary"
    if kind in CLOSED_SET_SEGMENTERS:
        return "masks"
    if kind in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES:
        return "boxes"
    raise UserError(f"GenEval detector {model_id!r} is a {kind!r} model, not an object detector; give a transformers "
                     f"object detector: an AutoModelForObjectDetection model (e.g. facebook/detr-resnet-50), a "
                     f"Mask2Former instance-segmentation model (facebook/mask2former-swin-small-coco-instance) or "
                     f"OWLv2 (google/owlv2-base-patch16-ensemble)")


class ObjectDetector:
    """``detect(images [B,3,H,W] in [0,1]) -> [[Detection, ...] per image]`` with GenEval class labels;
    detections above ``min_score`` only (labels outside GenEval's classes dropped)."""

    def __init__(self, model_id: str, device=None, dtype: str = "float32", classes=G.CLASS_NAMES,
                 min_score: float = 0.3, mask_threshold: float = 0.5):
        from transformers import AutoModelForObjectDetection, AutoModelForUniversalSegmentation, AutoProcessor

        self.kind = detector_kind(model_id)
        self.model_id = model_id
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.classes = tuple(classes)
        self.min_score, self.mask_threshold = float(min_score), float(mask_threshold)
        loader = {"boxes": AutoModelForObjectDetection, "masks": AutoModelForUniversalSegmentation}
        if self.kind == "open_vocabulary":
            from transformers import AutoModelForZeroShotObjectDetection as loader_cls
        else:
            loader_cls = loader[self.kind]
        self.processor = AutoProcessor.from_pretrained(model_id)
        self.model = freeze(loader_cls.from_pretrained(model_id).to(device=self.device, dtype=self.dtype))
        if self.kind == "open_vocabulary":
            self.label_class = {i: c for i, c in enumerate(self.classes)}
            self.queries = [f"a photo of {G.with_article(c)}" for c in self.classes]
        else:
            id2label = self.model.config.id2label
            self.label_class = {int(i): G.class_of_label(name) for i, name in id2label.items()}
            if not any(c in self.classes for c in self.label_class.values() if c):
                raise UserError(f"GenEval detector {model_id!r}: none of its {len(id2label)} labels (e.g. "
                                 f"{list(id2label.values())[:3]}) is a COCO class GenEval asks for; give a COCO "
                                 "detector, or an open-vocabulary one (OWLv2)")

    @torch.no_grad()
    def detect(self, images_BCHW: torch.Tensor) -> list[list[G.Detection]]:
        check_images(images_BCHW)
        pil = _to_pil(images_BCHW)
        H, W = images_BCHW.shape[-2:]
        if self.kind == "open_vocabulary":
            inputs = self.processor(text=[self.queries] * len(pil), images=pil, return_tensors="pt")
        else:
            inputs = self.processor(images=pil, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        outputs = self.model(**inputs)
        if self.kind == "masks":
            results = self.processor.post_process_instance_segmentation(
                outputs, threshold=self.min_score, mask_threshold=self.mask_threshold,
                target_sizes=[(H, W)] * len(pil), return_binary_maps=True)
            return [self._from_masks(r) for r in results]
        if self.kind == "open_vocabulary":
            side = max(H, W)  # OWLv2 pads to a square: boxes are in the padded frame, which starts at (0, 0)
            results = self.processor.image_processor.post_process_object_detection(
                outputs, threshold=self.min_score, target_sizes=[(side, side)] * len(pil))
        else:
            results = self.processor.post_process_object_detection(
                outputs, threshold=self.min_score, target_sizes=[(H, W)] * len(pil))
        return [self._from_boxes(r, W, H) for r in results]

    def _from_boxes(self, r, W, H) -> list[G.Detection]:
        out = []
        for score, label, box in zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist()):
            cls = self.label_class.get(int(label))
            if cls is None or cls not in self.classes:
                continue
            x0, y0, x1, y1 = box
            out.append(G.Detection(cls, (max(x0, 0.0), max(y0, 0.0), min(x1, float(W)), min(y1, float(H))), score))
        return out

    def _from_masks(self, r) -> list[G.Detection]:
        seg = r["segmentation"]
        out = []
        for i, info in enumerate(r["segments_info"]):
            cls = self.label_class.get(int(info["label_id"]))
            if cls is None or cls not in self.classes:
                continue
            mask = (seg[i] if seg.ndim == 3 else seg == info["id"]).cpu().numpy().astype(bool)
            ys, xs = np.nonzero(mask)
            if xs.size == 0:
                continue
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            out.append(G.Detection(cls, box, float(info["score"]), mask=mask))
        return out

    def __repr__(self) -> str:
        return f"ObjectDetector({self.model_id!r}, kind={self.kind}, device={self.device})"


class CropColors:
    """CLIP zero-shot color of detected objects (GenEval's ``color_classification``)."""

    def __init__(self, clip_model: str, processor: str | None = None, device=None, dtype: str = "float32",
                 bgcolor: str = "#999", crop: bool = True):
        from .pickscore import load_hf_clip

        self.model, self.processor, self.device, self.dtype, self.max_length = load_hf_clip(
            clip_model, processor or clip_model, device, dtype)
        self.bgcolor, self.crop = bgcolor, crop
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _classifier(self, cls: str) -> torch.Tensor:
        """[colors, D]: per color the mean of its templates' normalised text embeddings, renormalised."""
        from .pickscore import clip_features

        if cls not in self._text:
            texts = [t.format(color=c, cls=cls) for c in G.COLORS for t in COLOR_TEMPLATES]
            tok = self.processor.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                           return_tensors="pt").to(self.device)
            emb = clip_features(self.model.get_text_features(**tok)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.view(len(G.COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._text[cls] = emb / emb.norm(dim=-1, keepdim=True)
        return self._text[cls]

    @torch.no_grad()
    def __call__(self, image, cls: str, dets: list[G.Detection]) -> list[str]:
        """Colors of ``dets`` (objects of class ``cls``) in the PIL ``image``."""
        from PIL import Image

        from .pickscore import clip_features

        if not dets:
            return []
        blank = Image.new("RGB", image.size, color=self.bgcolor)
        crops = []
        for d in dets:
            img = image if d.mask is None else Image.composite(image, blank, Image.fromarray(d.mask))
            x0, y0, x1, y1 = (int(round(v)) for v in d.box)
            # a degenerate box still gets a 1-pixel crop (CLIP's resize cannot take an empty image)
            crops.append(img.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))) if self.crop else img)
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        feats = clip_features(self.model.get_image_features(pixel_values=pixels)).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return [G.COLORS[i] for i in (feats @ self._classifier(cls).T).argmax(1).tolist()]


class GenEvalScorer:
    """Detector + color classifier + GenEval's rules: ``score(images, metadata) -> [Verdict]``."""

    def __init__(self, detector: ObjectDetector, colors: CropColors, thresholds: G.Thresholds = G.Thresholds()):
        self.detector, self.colors, self.thresholds = detector, colors, thresholds

    def check(self, metadata) -> list[dict]:
        """Each row checked (missing field, a class the detector does not know: ValueError)."""
        if metadata is None:
            raise UserError("the geneval reward needs each prompt's GenEval metadata (tag, include, exclude); "
                             "give a .jsonl prompt file in GenEval's format (flowalign geneval-prompts writes one)")
        return [G.check_metadata(m, known_classes=self.detector.classes, need_prompt=False) for m in metadata]

    def score(self, images_BCHW: torch.Tensor, metadata) -> tuple[list[G.Verdict], list[dict[str, list[G.Detection]]]]:
        rows = self.check(metadata)
        if len(rows) != images_BCHW.shape[0]:
            raise UserError(f"got {images_BCHW.shape[0]} images but {len(rows)} metadata rows")
        found = self.detector.detect(images_BCHW)
        pil = _to_pil(images_BCHW)
        verdicts, kept = [], []
        for img, row, dets in zip(pil, rows, found):
            objects = G.select(dets, row["tag"], self.thresholds)
            verdicts.append(G.evaluate(row, objects, lambda cls, ds, img=img: self.colors(img, cls, ds),
                                       self.thresholds.position_threshold))
            kept.append(objects)
        return verdicts, kept


class GenEvalReward:
    """GenEval as a reward: ``score`` = ``partial`` (Flow-GRPO's training reward, default), ``strict``
    (1/0, Flow-GRPO's exact counts) or ``correct`` (1/0, GenEval's verdict). Info: all three per image
    and GenEval accuracy per tag."""

    differentiable = False
    name = "geneval"

    def __init__(self, scorer: GenEvalScorer, score: str = "partial"):
        if score not in ("partial", "strict", "correct"):
            raise UserError(f"geneval score {score!r}: use 'partial' (Flow-GRPO's reward), 'strict' or 'correct'")
        self.scorer, self.score = scorer, score

    def check_prompts(self, prompts: list[str], metadata: list[dict] | None = None) -> None:
        """Before any image is made: every prompt has well-formed GenEval metadata naming only classes
        the detector knows (ValueError naming the first that has not)."""
        if metadata is None:
            self.scorer.check(None)
        for i, (p, m) in enumerate(zip(prompts, metadata)):
            try:
                G.check_metadata(m, known_classes=self.scorer.detector.classes, need_prompt=False)
            except ValueError as e:
                raise UserError(f"prompt {i + 1} {p!r}: {e}") from None

    def __call__(self, images, prompts, metadata=None):
        verdicts, _ = self.scorer.score(images, metadata)
        per = {
            "correct": torch.tensor([v.correct for v in verdicts], dtype=torch.float32),
            "strict": torch.tensor([v.strict for v in verdicts], dtype=torch.float32),
            "partial": torch.tensor([v.score for v in verdicts], dtype=torch.float32),
        }
        info: dict[str, Any] = {k: v.to(images.device) for k, v in per.items()}
        info["per_tag"] = G.summarize([m["tag"] for m in metadata], [v.correct for v in verdicts])
        info["reasons"] = [v.reasons for v in verdicts]
        return per[self.score].to(images.device), info

    def __repr__(self) -> str:
        return f"GenEvalReward({self.scorer.detector!r}, score={self.score})"


def geneval(
    detector: str = "facebook/mask2former-swin-small-coco-instance",
    clip: str = "openai/clip-vit-large-patch14",
    clip_processor: str | None = None,
    score: str = "partial",
    device: str | None = None,
    dtype: str = "float32",
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    max_overlap: float = 1.0,
    position_threshold: float = 0.1,
    bgcolor: str = "#999",
    crop: bool = True,
) -> GenEvalReward:
    """GenEval reward (module docstring). ``detector``/``clip``: hub ids or local folders; the
    thresholds are GenEval's options with its defaults."""
    if score not in ("partial", "strict", "correct"):
        raise UserError(f"geneval score {score!r}: use 'partial' (Flow-GRPO's reward), 'strict' or 'correct'")
    th = G.Thresholds(threshold, counting_threshold, max_objects, max_overlap, position_threshold)
    det = ObjectDetector(detector, device, dtype, min_score=min(threshold, counting_threshold))
    colors = CropColors(clip, clip_processor, device, dtype, bgcolor=bgcolor, crop=crop)
    return GenEvalReward(GenEvalScorer(det, colors, th), score)
