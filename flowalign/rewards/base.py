"""The reward interface, the weighted multi-reward, and helpers shared by the reward families.

A reward is a plain callable ``reward(images_BCHW, prompts, metadata) -> (scores_B, info)`` with
two attributes, ``name`` and ``differentiable`` (ddpo-pytorch ``rewards.py`` style), and optionally
``needs_groups = True`` when an image's score depends on the other images of its prompt group
(win rates; see ``needs_groups``) and ``check_prompts(prompts, metadata)`` when it can score only
some prompts (it raises ValueError for the first it cannot; see ``check_prompts``). Images are
float tensors in [0, 1]; every reward does its preprocessing in torch on that tensor, so a
differentiable reward passes gradients back to the pixels (noise optimization) and the same code
scores rollouts under ``torch.no_grad()`` (GRPO).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import UserError
from ..torch_utils import resolve_device, resolve_dtype  # noqa: F401 (re-exported for the reward files)


@runtime_checkable
class Reward(Protocol):
    """A pointwise reward: one score per image. A reward whose scores compare the images of a group
    (``metadata[i]["group_id"]``) also sets ``needs_groups = True``."""

    name: str
    differentiable: bool

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``images`` [B,3,H,W] in [0,1], ``prompts`` B strings -> (scores [B] float32, info)."""
        ...


def needs_groups(reward) -> bool:
    """Whether ``reward`` scores an image against the other images of its group (``needs_groups``
    attribute; absent means no): a trainer then keeps whole groups together, and such a reward
    cannot score evaluation images, which come without groups."""
    return bool(getattr(reward, "needs_groups", False))


def check_prompts(reward, rows: list[dict], source: str) -> None:
    """Before any image is made: every prompt row (``{"prompt", **metadata}``) of ``source`` (a file
    name or option) can be scored by ``reward`` (a ``MultiReward``'s parts are asked one by one, through
    their optional ``check_prompts``); ``UserError`` naming the source, the reward and the prompt."""
    parts = reward.rewards if isinstance(reward, MultiReward) else [reward]
    prompts, metadata = [r["prompt"] for r in rows], [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    for part in parts:
        check = getattr(part, "check_prompts", None)
        if check is None:
            continue
        try:
            check(prompts, metadata)
        except ValueError as e:
            raise UserError(f"{source}: reward {part.name} cannot score {e}; give prompts it can score or "
                            "choose another reward") from None


class MultiReward:
    """Weighted sum of rewards that keeps each reward's raw scores.

    ``info["per_reward"][key]`` holds each reward's raw scores [B] and ``info["weights"][key]`` its
    weight, so a trainer can normalize every reward separately before summing (GDPO-style) or use
    the returned total (sum, then normalize). ``key`` is the reward's name; a name used twice gets
    a ``#2``, ``#3``... suffix. ``info["info"][key]`` is that reward's own info dict.
    """

    def __init__(self, rewards: list[tuple[Reward, float]]):
        if not rewards:
            raise ValueError("MultiReward needs at least one (reward, weight) pair")
        self.keys: list[str] = []
        for reward, _ in rewards:
            key, n = reward.name, 2
            while key in self.keys:
                key, n = f"{reward.name}#{n}", n + 1
            self.keys.append(key)
        self.rewards = [r for r, _ in rewards]
        self.weights = [float(w) for _, w in rewards]
        self.name = "+".join(self.keys)
        self.differentiable = all(r.differentiable for r in self.rewards)
        self.needs_groups = any(needs_groups(r) for r in self.rewards)

    def __call__(self, images, prompts, metadata=None):
        per_reward, infos = {}, {}
        total = None
        for key, reward, weight in zip(self.keys, self.rewards, self.weights):
            scores, info = reward(images, prompts, metadata)
            assert scores.shape == (images.shape[0],), f"reward {key} returned shape {tuple(scores.shape)}"
            scores = scores.to(device=images.device, dtype=torch.float32)
            per_reward[key], infos[key] = scores, info
            total = weight * scores if total is None else total + weight * scores
        info = {"per_reward": per_reward, "weights": dict(zip(self.keys, self.weights)), "info": infos}
        return total, info

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}×{w:g}" for k, w in zip(self.keys, self.weights))
        return f"MultiReward({parts})"


class ShiftedViews:
    """A reward averaged over ``views`` translated copies of each image (view 0 is the image itself,
    the others shifted by random whole pixels in [-max_shift, max_shift] along each axis, edges
    replicated); differentiable when the wrapped reward is.

    Gradient ascent on a single view finds pixel patterns that fool that one view (adversarial
    images that score high and look wrong); a pattern has to survive every shift to raise the mean,
    so noise optimization climbs what the reward means rather than what it happens to respond to.
    Shifts of a few pixels keep counts, colors and relative positions. Each call draws new shifts
    from the wrapper's own generator (seeded), the same for all rows of the batch, so a run is
    deterministic and a batched run follows each single-prompt run.
    """

    def __init__(self, reward: Reward, views: int = 4, max_shift: int = 2, seed: int = 0):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}")
        self.reward, self.views, self.max_shift = reward, int(views), int(max_shift)
        self.name, self.differentiable = reward.name, reward.differentiable
        self._gen = torch.Generator().manual_seed(seed)

    def shifts(self) -> list[tuple[int, int]]:
        """The (dx, dy) of the next call's views (advances the generator)."""
        s = self.max_shift
        rand = torch.randint(-s, s + 1, (self.views - 1, 2), generator=self._gen).tolist()
        return [(0, 0)] + [(int(dx), int(dy)) for dx, dy in rand]

    def __call__(self, images, prompts, metadata=None):
        B, _, H, W = images.shape
        s = self.max_shift
        shifts = self.shifts()
        if self.views == 1 or s == 0:
            return self.reward(images, prompts, metadata)
        padded = torch.nn.functional.pad(images, (s, s, s, s), mode="replicate")
        batch = torch.cat([padded[:, :, s + dy:s + dy + H, s + dx:s + dx + W] for dx, dy in shifts])
        meta = None if metadata is None else list(metadata) * self.views
        scores, info = self.reward(batch, list(prompts) * self.views, meta)
        return scores.reshape(self.views, B).mean(dim=0), {"views": shifts}

    def __repr__(self) -> str:
        return f"ShiftedViews({self.reward!r}, views={self.views}, max_shift={self.max_shift})"


# --------------------------------------------------------------------------------------------------
# helpers for the model-backed rewards


def resolve_file(path_or_repo: str, filename: str) -> str:
    """A local file: ``path_or_repo`` itself, ``path_or_repo/filename``, or a Hugging Face Hub
    download of ``filename`` from the repo id ``path_or_repo``."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, filename)
        if not os.path.isfile(path):
            raise UserError(f"{path_or_repo} is a folder without {filename}; pass the file's path instead")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path_or_repo, filename)
    except Exception as err:  # offline, unknown repo, missing file: all the same fix for the user
        raise UserError(
            f"{path_or_repo!r} is not a local file or folder, and downloading {filename!r} from the hub "
            f"repo {path_or_repo!r} failed ({type(err).__name__}: {err}). Download it where the hub is "
            f"reachable and pass the local path."
        ) from err


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter gradients (gradients still flow to the inputs)."""
    module.eval()
    module.requires_grad_(False)
    return module


class LinearMLPHead(nn.Module):
    """The 768-1024-128-64-16-1 head of the LAION aesthetic predictor v2 (improved-aesthetic-predictor)
    and of ImageReward: linear layers with dropout between the first ones and no activations.
    Parameter names match both checkpoints (``layers.0``, ``.2``, ``.4``, ``.6``, ``.7``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.layers(x_BD)
