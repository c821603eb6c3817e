"""The pocket world's rewards: the exact evaluator (``pocket_gold``) and the pocket CLIP (``pocket_clip``)."""

from __future__ import annotations


def pocket_gold(score: str = "partial"):
    """The pocket world's exact evaluator as a reward (not differentiable).

    ``score``: ``partial`` (credit per requested object and relation, penalising missing and extra
    objects; a blank image scores 0), ``strict`` (GenEval-style correctness, 0/1) or ``exact``
    (exactly the requested scene, 0/1). ``info`` carries all three and the per-category means.
    """
    from ..pocket.evaluate import PocketGold

    return PocketGold(score=score)


def pocket_clip(path: str | None = None, device: str | None = None, dtype: str = "float32"):
    """The pocket CLIP's score, logit_scale·cos(image, text), differentiable (a proxy reward).

    ``path``: a transformers ``CLIPModel`` folder with its tokenizer and image processor (default:
    the pocket CLIP shipped inside flowalign). Scored exactly like PickScore.
    """
    from ..pocket.assets import CLIP_DIR, shipped
    from .pickscore import pickscore

    folder = str(shipped(CLIP_DIR, "CLIP")) if path is None else path
    return pickscore(model=folder, processor=folder, device=device, dtype=dtype, name="pocket_clip")
