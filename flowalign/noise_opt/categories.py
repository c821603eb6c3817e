"""CARINOX's category-aware reward selection: each prompt's reward weights depend on its category.

CARINOX (Kasaei et al. 2025) picks, per compositional category of T2I-CompBench++ (color, shape,
texture, 2d_spatial, 3d_spatial, non_spatial, numeracy, complex), how much each reward counts, by how
well that reward agrees with human judgments in the category. Here a *category table* maps category →
{reward key: multiplier}; a prompt's weight for reward ``k`` is its recipe weight ``w_k`` times

    m_k = Σ_c p(c) · table[c][k]        (table["none"] when the prompt has no category; 1 if absent)

where ``p`` is the prompt's category distribution. The paper's table ships as
``builtin:carinox`` (``carinox_weights.yaml``); ``search.category_weights`` may also name any YAML
file of the same shape.

A prompt's categories come from its prompt-file row: ``"category": "color"``, or
``"categories": [["color", 0.7], ["shape", 0.3]]`` (CARINOX's ``category_guess.json`` form) or a
``{"color": 0.7, ...}`` mapping; a prompt without one (``--prompt``) uses ``search.category``.

The multiplier scales the reward's score per image (``CategoryWeighted``), which is exactly the
per-prompt weight: a noise search's loss ``w·(c − m·r)`` has the gradient ``−w·m·∇r`` of
``w·m·(c − r)``, the per-reward gradient clipping (multi-clip) sees the same weighted gradient, and
the best image is chosen by ``Σ w·m·r``. Recorded reward values are the scaled ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import UserError

BUILTIN = {"builtin:carinox": Path(__file__).with_name("carinox_weights.yaml")}
NO_CATEGORY = "none"


def load_table(source: str) -> dict[str, dict[str, float]]:
    """A category table from ``builtin:carinox`` or a YAML file {category: {reward: multiplier}}."""
    import yaml

    path = BUILTIN.get(source, Path(source).expanduser())
    if source.startswith("builtin:") and source not in BUILTIN:
        raise UserError(f"search.category_weights={source!r}: the built-in tables are {sorted(BUILTIN)}")
    if not path.is_file():
        raise UserError(f"search.category_weights={source!r} is not a file; give builtin:carinox or a YAML file "
                        "mapping each category to {reward: multiplier}")
    table = yaml.safe_load(path.read_text())
    if not isinstance(table, dict) or not table:
        raise UserError(f"{path}: a category table maps each category to {{reward: multiplier}}")
    out = {}
    for cat, row in table.items():
        if not isinstance(row, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in row.values()):
            raise UserError(f"{path}: category {cat!r} must map reward names to multipliers >= 0, got {row!r}")
        out[str(cat)] = {str(k): float(v) for k, v in row.items()}
    return out


def categories_of(row: Mapping | None, default: str | None) -> dict[str, float]:
    """A prompt-file row's category distribution (module docstring); ``default`` when it names none."""
    if row is not None and "categories" in row:
        cats = row["categories"]
        pairs = cats.items() if isinstance(cats, Mapping) else cats
        try:
            dist = {str(c): float(p) for c, p in pairs}
        except (TypeError, ValueError):
            raise UserError(f"prompt {row.get('prompt', '')!r}: 'categories' must be [[name, p], ...] or "
                            f"{{name: p}}, got {cats!r}") from None
        total = sum(dist.values())
        if not dist or total <= 0 or any(p < 0 for p in dist.values()):
            raise UserError(f"prompt {row.get('prompt', '')!r}: 'categories' needs weights >= 0 with a positive sum")
        return {c: p / total for c, p in dist.items()}
    if row is not None and isinstance(row.get("category"), str):
        return {row["category"]: 1.0}
    return {default or NO_CATEGORY: 1.0}


def multiplier(table: dict[str, dict[str, float]], dist: dict[str, float], key: str) -> float:
    """m_k = Σ_c p(c)·table[c][key] (a reward a category's row does not list counts 1)."""
    return sum(p * table[c].get(key, 1.0) for c, p in dist.items())


class CategoryWeighted:
    """``reward``'s scores × each image's category multiplier for ``key`` (see the module docstring)."""

    def __init__(self, reward, key: str, table: dict[str, dict[str, float]], default: str | None = None):
        self.reward, self.key, self.table, self.default = reward, key, table, default
        self.name, self.differentiable = reward.name, reward.differentiable

    def multipliers(self, n: int, metadata) -> torch.Tensor:
        rows = metadata if metadata is not None else [None] * n
        return torch.tensor([multiplier(self.table, categories_of(r, self.default), self.key) for r in rows],
                            dtype=torch.float32)

    def __call__(self, images, prompts, metadata=None):
        scores, info = self.reward(images, prompts, metadata)
        return scores * self.multipliers(len(prompts), metadata).to(scores.device), info

    def __repr__(self) -> str:
        return f"CategoryWeighted({self.reward!r})"


def category_aware(rewards, search_cfg, metadata: list[dict] | None):
    """``rewards`` (a MultiReward) with every reward weighted per prompt category, after checking
    that every prompt's categories are in the table (before any generation)."""
    from ..rewards.base import MultiReward

    table = load_table(search_cfg.category_weights)
    if NO_CATEGORY not in table:
        table[NO_CATEGORY] = {}
    rows = metadata if metadata is not None else [None]
    for row in rows:
        unknown = set(categories_of(row, search_cfg.category)) - set(table)
        if unknown:
            where = f"prompt {row.get('prompt', '')!r}" if row else "search.category"
            raise UserError(f"{where}: category {sorted(unknown)} is not in {search_cfg.category_weights} "
                            f"(its categories: {', '.join(sorted(table))})")
    return MultiReward([(CategoryWeighted(r, k, table, search_cfg.category), w)
                        for k, r, w in zip(rewards.keys, rewards.rewards, rewards.weights)])
