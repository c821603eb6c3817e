"""Typed configuration of noise optimization (``flowalign reno``): one dataclass per section.

    cfg = load_noise_opt_config("configs/reno/sd_turbo.yaml", ["optim.lr=2", "run.seed=3"])

Loaded with ``flowalign.config.load_structured`` (unknown keys named with the nearest valid key,
types, ranges and choices checked), then ``validate_noise_opt_config`` checks combinations. The
defaults are the pocket world (the shipped pocket model and pocket CLIP), so a fresh checkout runs
``flowalign reno --prompt "two red circles"`` on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError, ModelConfig, RewardSpec, _f, describe, load_structured
from ..models.families import ONE_STEP_FAMILIES

__all__ = [
    "NoiseOptConfig", "NoiseOptModelConfig", "GenerationConfig", "OptimConfig", "SearchConfig", "NoiseOptRunConfig",
    "load_noise_opt_config", "validate_noise_opt_config", "split_overrides", "describe_noise_opt",
]


@dataclass
class NoiseOptModelConfig(ModelConfig):
    """The frozen generator; ``ModelConfig`` with inference-only defaults and the pocket model as default."""

    path: str = _f("builtin:pocket", "hub id, local diffusers pipeline folder, or builtin:pocket (the pocket "
                                     "model shipped with flowalign)")
    dtype: str = _f("float32", "dtype of the frozen generator weights (bfloat16/float16 on GPUs)",
                    choices=("float32", "bfloat16", "float16"))
    train_mode: str = _f("none", "must be none: noise optimization changes no weight", choices=("none",))


@dataclass
class GenerationConfig:
    """How the generator G(ε) maps noise to an image; G is differentiated on every iteration."""

    num_steps: int = _f(4, "ODE (Euler) steps of a flow model (sd3, flux); the turbo UNets take exactly 1", min=1)
    guidance_scale: float = _f(1.5, "CFG scale of sd3 (1 = no CFG); FLUX.1-dev's embedded guidance; "
                                     "must be <= 1 for the turbo UNets and FLUX.1-schnell ignores it", min=0)
    shift: Optional[float] = _f(None, "static schedule shift of flow models; null = the scheduler's own", gt=0)
    height: int = _f(32, "image height in pixels (pocket 32, SD-Turbo 512, SDXL-Turbo 512, FLUX 512+)", min=8)
    width: int = _f(32, "image width in pixels", min=8)
    checkpoint: bool = _f(True, "flow models: recompute each ODE step's forward in backward (holds one "
                                "step's activations instead of all); off is faster when memory allows")
    reward_checkpoint: bool = _f(False, "recompute the reward models' forward in backward (less memory)")


@dataclass
class OptimConfig:
    """ReNO's optimizer; the defaults are the paper code's (SGD, Nesterov 0.9, lr 5, clip 0.1, 50 iterations)."""

    iterations: int = _f(50, "generator calls per noise; every call but the last is followed by a step", min=1)
    optimizer: str = _f("sgd", "sgd (with momentum) or adam", choices=("sgd", "adam"))
    lr: float = _f(5.0, "learning rate on the noise", gt=0)
    momentum: float = _f(0.9, "sgd momentum", min=0, max=1)
    nesterov: bool = _f(True, "sgd: Nesterov momentum")
    adam_betas: list[float] = _f([0.9, 0.999], "adam betas")
    grad_clip: float = _f(0.1, "gradient-norm clip per sample (0 = off)", min=0)
    multi_clip: Optional[bool] = _f(None, "clip each weighted reward's gradient (and the regularizer's) to "
                                          "grad_clip separately, then sum (CARINOX); false: clip the summed "
                                          "gradient (ReNO); null = on for carinox, off for reno")
    reg_weight: float = _f(0.01, "λ of the χ-norm regularizer ½‖ε‖² − (d−1)·log‖ε‖ (0 = off)", min=0)
    reward_views: int = _f(1, "score each image as the mean reward over this many copies shifted by whole "
                              "pixels (view 0 unshifted; flowalign.rewards.ShiftedViews): gradient ascent "
                              "then cannot win with patterns that fool a single view; 1 = off. Best-of-N "
                              "uses it too, so both search under the same reward", min=1)
    view_shift: int = _f(2, "largest shift of reward_views in pixels along each axis", min=0)


@dataclass
class SearchConfig:
    """Which method spends the generator calls."""

    method: str = _f("reno", "reno (optimize one noise), best_of_n (sample num_seeds noises, keep the best), "
                             "carinox (explore num_seeds noises, then optimize)",
                     choices=("reno", "best_of_n", "carinox"))
    num_seeds: int = _f(10, "best_of_n: candidates N; carinox: explored seeds k", min=1)
    optimize: str = _f("best", "carinox: optimize the best explored noise, or each of them (k× the calls)",
                       choices=("best", "each"))
    category_weights: Optional[str] = _f(None, "CARINOX's category-aware rewards: builtin:carinox (the paper's table) "
                                               "or a YAML file {category: {reward: multiplier}}; each prompt's reward "
                                               "weights are multiplied by its category's row (prompt-file 'category' "
                                               "or 'categories'); null = off")
    category: Optional[str] = _f(None, "with category_weights: the category of prompts that name none (--prompt); "
                                       "null = the table's 'none' row")


@dataclass
class NoiseOptRunConfig:
    output_dir: str = _f("runs/reno", "folder for images and logs (one sub-folder per prompt)")
    seed: int = _f(0, "noise seed; sample i of a prompt file uses noise (seed, i)")
    save_every_iteration: bool = _f(False, "also save the image of every iteration")
    batch_size: int = _f(1, "prompts optimized together in one batch (--prompts); per-sample math is unchanged",
                         min=1)
    progress: bool = _f(True, "print a progress bar with the live reward")
    image_scale: int = _f(1, "upscale saved PNGs this many times, nearest neighbour (pocket images are 32 px)", min=1)
    save_noise: bool = _f(False, "also save the best noise tensor (best_noise.pt)")


@dataclass
class NoiseOptConfig:
    model: NoiseOptModelConfig = field(default_factory=NoiseOptModelConfig,
                                       metadata={"help": "the frozen generator"})
    generation: GenerationConfig = field(default_factory=GenerationConfig,
                                         metadata={"help": "noise → image"})
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec(name="pocket_clip")],
        metadata={"help": "differentiable rewards, summed with their weights"},
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "the noise optimizer"})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"help": "reno, best_of_n or carinox"})
    run: NoiseOptRunConfig = field(default_factory=NoiseOptRunConfig, metadata={"help": "outputs"})


def load_noise_opt_config(path: str | os.PathLike | None = None, overrides=()) -> NoiseOptConfig:
    """Defaults ← YAML ← ``key=value`` overrides, type- and range-checked, then validated."""
    cfg = load_structured(NoiseOptConfig, path, overrides)
    validate_noise_opt_config(cfg)
    return cfg


def validate_noise_opt_config(cfg: NoiseOptConfig) -> None:
    """Combinations the schema cannot express; raises ``ConfigError`` naming key and fix."""
    g, o = cfg.generation, cfg.optim
    if cfg.model.family in ONE_STEP_FAMILIES:
        if g.num_steps != 1:
            raise ConfigError(f"generation.num_steps={g.num_steps}: model.family={cfg.model.family} is a one-step "
                              "generator; set generation.num_steps=1")
        if g.guidance_scale > 1:
            raise ConfigError(f"generation.guidance_scale={g.guidance_scale}: {cfg.model.family} runs without CFG; "
                              "set generation.guidance_scale=0")
    if cfg.search.category is not None and not cfg.search.category_weights:
        raise ConfigError(f"search.category={cfg.search.category!r} needs search.category_weights (e.g. builtin:carinox)")
    if len(o.adam_betas) != 2 or not all(0 <= b < 1 for b in o.adam_betas):
        raise ConfigError(f"optim.adam_betas={o.adam_betas} must be two values in [0, 1)")
    if not cfg.rewards:
        raise ConfigError("rewards is empty; give at least one differentiable reward, e.g. rewards: [{name: clip}]")
    for i, r in enumerate(cfg.rewards):
        if not r.name:
            raise ConfigError(f"rewards[{i}].name is empty; give a registered reward name")
    if cfg.model.dtype == "float16" and cfg.model.device == "cpu":
        raise ConfigError("model.dtype=float16 on model.device=cpu is not supported by all CPU kernels; "
                          "use float32 (or bfloat16) on a CPU")


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split keyword overrides of the Python API into (OptimConfig fields, GenerationConfig fields);
    an unknown name raises ValueError listing the valid ones."""
    optim_keys = {f.name for f in dataclasses.fields(OptimConfig)}
    gen_keys = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = set(overrides) - optim_keys - gen_keys
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; OptimConfig fields: {sorted(optim_keys)}, "
                         f"GenerationConfig fields: {sorted(gen_keys)}")
    return ({k: v for k, v in overrides.items() if k in optim_keys},
            {k: v for k, v in overrides.items() if k in gen_keys})


def describe_noise_opt() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) of every ``NoiseOptConfig`` field."""
    return describe(NoiseOptConfig)
