"""The reward and judge registries: name -> factory, plus dotted paths to user code.

``build_reward("clip", model_name="ViT-B-32", pretrained="openai")`` calls the factory with the
spec's ``args``. A name of the form ``"package.module:callable"`` imports ``callable`` and calls it
the same way; it must return an object with ``__call__(images, prompts, metadata) -> (scores, info)``,
``name`` and ``differentiable`` (a judge: ``prefer(prompts, images_a, images_b)`` and ``name``).
Factories import their model libraries when called, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable, Iterable, Mapping

from ..errors import UserError
from . import aesthetic, clip, distributional, geneval, imagereward, jpeg, pickscore, pocket, vlm
from .base import MultiReward, Reward
from .pairwise import FromPointwiseJudge, PairwiseJudge, WinRateReward


def from_pointwise(reward: str = "clip", reward_args: dict | None = None, temperature: float = 1.0) -> FromPointwiseJudge:
    """Bradley–Terry judge from a registered (or dotted-path) pointwise reward."""
    return FromPointwiseJudge(build_reward(reward, **(reward_args or {})), temperature)


def win_rate(
    judge: str = "vlm",
    judge_args: dict | None = None,
    both_orders: bool = False,
    group_key: str = "group_id",
    max_pairs_per_call: int | None = None,
) -> WinRateReward:
    """Pairwise win rates within prompt groups as a reward (Pref-GRPO). ``judge``: a name in
    ``JUDGES`` or a dotted path; ``judge_args``: its factory's arguments."""
    return WinRateReward(build_judge(judge, **(judge_args or {})), both_orders, group_key, max_pairs_per_call)


REWARDS: dict[str, Callable[..., Reward]] = {
    "clip": clip.clip,
    "hpsv2": clip.hpsv2,
    "hpsv2.1": clip.hpsv2_1,
    "pickscore": pickscore.pickscore,
    "imagereward": imagereward.imagereward,
    "aesthetic": aesthetic.aesthetic,
    "jpeg_compressibility": jpeg.jpeg_compressibility,
    "jpeg_incompressibility": jpeg.jpeg_incompressibility,
    "vlm_score": vlm.vlm_score,
    "geneval": geneval.geneval,
    "win_rate": win_rate,
    "pocket_gold": pocket.pocket_gold,
    "pocket_clip": pocket.pocket_clip,
    "exemplar_similarity": distributional.exemplar_similarity,
    "exemplar_fd": distributional.exemplar_fd,
}

JUDGES: dict[str, Callable[..., PairwiseJudge]] = {
    "from_pointwise": from_pointwise,
    "vlm": vlm.vlm_judge,
}


def _resolve(name: str, table: Mapping[str, Callable], kind: str) -> Callable:
    if name in table:
        return table[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"{kind} {name!r}: cannot import module {module_name!r} ({err})") from err
        if not hasattr(module, attr):
            raise UserError(f"{kind} {name!r}: module {module_name!r} has no attribute {attr!r}")
        return getattr(module, attr)
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(sorted(table))}, "
                     f"or a dotted path 'package.module:callable'.")


def _call(factory: Callable, name: str, kind: str, args: dict[str, Any]):
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as err:
        params = [p for p in inspect.signature(factory).parameters if p not in ("args", "kwargs")]
        raise UserError(f"{kind} {name!r}: {err}; its arguments are {params}") from err
    try:
        return factory(**args)
    except Exception as err:
        cause = None if isinstance(err, UserError) else _hub_failure(err)  # a reward's own message names its file
        if cause is None:
            raise
        raise UserError(f"{kind} {name!r}: its weights are neither in the local Hugging Face cache nor reachable "
                        f"({type(cause).__name__}: {str(cause).splitlines()[0][:200]}); download them once on a "
                        "machine with access to huggingface.co (HF_HUB_OFFLINE=1 allows only cached files), or "
                        "point the reward's args at local files") from err


def _hub_failure(err: BaseException) -> BaseException | None:
    """The Hugging Face Hub error (offline, not cached, unreachable, no such repository) behind ``err``, found
    along its chain of causes (transformers re-raises it as an OSError, open_clip as a RuntimeError), or None."""
    from huggingface_hub import errors as hub_errors

    hub = (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, hub_errors.HfHubHTTPError)
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, hub):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def build_reward(name: str, **args: Any) -> Reward:
    """A reward from its registered name (``REWARDS``) or dotted path, with the factory's args."""
    reward = _call(_resolve(name, REWARDS, "reward"), name, "reward", args)
    for attr in ("name", "differentiable"):
        if not hasattr(reward, attr):
            raise UserError(f"reward {name!r} built an object without the attribute {attr!r}; a reward "
                             f"needs __call__(images, prompts, metadata), name and differentiable")
    return reward


def build_judge(name: str, **args: Any) -> PairwiseJudge:
    """A pairwise judge from its registered name (``JUDGES``) or dotted path."""
    judge = _call(_resolve(name, JUDGES, "judge"), name, "judge", args)
    if not (hasattr(judge, "prefer") and hasattr(judge, "name")):
        raise UserError(f"judge {name!r} built an object without prefer(prompts, images_a, images_b) and name")
    return judge


_SPEC_KEYS = ("name", "weight", "args")


def build_rewards(specs: Iterable[Any]) -> MultiReward:
    """A ``MultiReward`` from reward specs: dicts or objects (e.g. ``config.RewardSpec``) with
    ``name``, ``weight`` (default 1.0) and ``args`` (default {})."""
    parts = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(_SPEC_KEYS)
            if unknown:
                raise UserError(f"rewards[{i}]: unknown key(s) {sorted(unknown)}; a reward spec has {list(_SPEC_KEYS)}")
            if "name" not in spec:
                raise UserError(f"rewards[{i}]: missing 'name'")
            name, weight, args = spec["name"], spec.get("weight", 1.0), spec.get("args") or {}
        else:
            name, weight, args = spec.name, spec.weight, spec.args or {}
        if not isinstance(args, Mapping):
            raise UserError(f"rewards[{i}] ({name}): args must be a mapping, got {type(args).__name__}")
        parts.append((build_reward(name, **dict(args)), float(weight)))
    if not parts:
        raise UserError("no reward specs given; give at least one, e.g. [{'name': 'clip'}]")
    return MultiReward(parts)
