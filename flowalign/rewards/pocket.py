"""The pocket world's rewards: the exact programmatic evaluator (``pocket_gold``)."""

from __future__ import annotations


def pocket_gold(score: str = "partial"):
    """The pocket world's exact evaluator as a reward (not differentiable).

    ``score``: ``partial`` (credit per requested object and relation, penalising missing and extra
    objects; a blank image scores 0), ``strict`` (GenEval-style correctness, 0/1) or ``exact``
    (exactly the requested scene, 0/1). ``info`` carries all three and the per-category means.
    """
    from ..pocket.evaluate import PocketGold

    return PocketGold(score=score)
