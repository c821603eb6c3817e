"""GRPO's config: its sections (``train``, ``eval``), the run config that holds them with the shared
ones (``Config``: model, sampling, rewards, run from ``flowalign.config``), the checks of their
combinations, and the sizes every iteration derives from them (``Sizes``, printed at start-up).

    cfg = load_config("configs/pocket/flow_grpo.yaml", ["train.lr=1e-4"])
    sizes = Sizes.of(cfg, processes=1, units_per_image=1, recorded_steps_per_unit=3)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from ..config import (
    ConfigError, ModelConfig, RewardSpec, RunConfig, SamplingConfig, _check_ranges, _f, load_structured,
    locate_from_config, validate_sampling,
)
from ..models.families import FLOW_FAMILIES
from ..prompts import HF_PREFIX
from .objectives import OBJECTIVES

__all__ = ["TrainConfig", "EvalConfig", "Config", "load_config", "validate_config", "Sizes"]


@dataclass
class TrainConfig:
    prompts: str = _f("prompts/demo.txt", "training prompts: a .txt (one per line), .jsonl ('prompt' key), .csv or "
                                          ".parquet file, a save_to_disk folder, or a Hub dataset "
                                          "'hf:OWNER/NAME?split=train&column=prompt' (flowalign.prompts)")
    group_size: int = _f(16, "images per prompt (G); advantages are normalized within a group", min=2)
    prompts_per_iteration: int = _f(8, "prompt groups sampled per iteration, over all processes", min=1)
    num_iterations: int = _f(1000, "training iterations (rollout + update)", min=1)
    micro_batch_size: int = _f(4, "samples per forward/backward, per process", min=1)
    gradient_accumulation_steps: int = _f(1, "micro-batches accumulated (each over all its trained timesteps) "
                                             "per optimizer step", min=1)
    objective: str = _f("grpo", "policy objective: grpo (PPO-clipped policy gradient on the SDE transitions' "
                                "log-probs: Flow-GRPO, DanceGRPO, ...), nft (DiffusionNFT, Zheng et al. 2025: "
                                "flow matching on the final images towards an implicit positive policy and "
                                "away from a negative one; no log-probs, any sampler), prdp (PRDP, Deng et al. "
                                "2024: regression of pairs' predicted reward differences onto observed ones) or "
                                "dragon (DRAGON, Bai et al. 2025: Diffusion-DPO/KTO towards positive "
                                "demonstrations of the iteration, away from negative ones)", choices=tuple(OBJECTIVES))
    nft_beta: float = _f(1.0, "DiffusionNFT's beta: v+ = (1-beta)·v_old + beta·v, v- = (1+beta)·v_old - beta·v",
                         gt=0)
    nft_timesteps: int = _f(2, "nft: forward-process noise levels drawn per image and update (from the "
                               "sampler's sigmas)", min=1)
    prdp_beta: float = _f(10.0, "prdp: KL strength β of the optimum π_ref·exp(r/β), for element-averaged "
                                "log-probs (= β_paper·D for D latent elements)", gt=0)
    prdp_clip_range: float = _f(1e-3, "prdp: proximal clip ε of each step's log π_θ/π_old, element-averaged "
                                      "(= ε_paper/D; 0 = no clipping, plain RDP)", min=0)
    prdp_reference: str = _f("pretrained", "prdp: π_ref of r̂ = Σ log π_θ/π_ref: pretrained (the base, LoRA "
                                           "off; the paper's KL anchor) or old (the sampling policy: "
                                           "KL to the previous iterate, no anchor)", choices=("pretrained", "old"))
    prdp_pairs_per_group: int = _f(0, "prdp: pairs drawn per prompt group and micro-batch (0 = all "
                                      "G(G-1)/2, as the paper)", min=0)
    dragon_loss: str = _f("dpo", "dragon: surrogate loss, dpo (Diffusion-DPO on pairs of a group) or kto "
                                 "(Diffusion-KTO on unpaired positives / negatives)", choices=("dpo", "kto"))
    dragon_beta: float = _f(1000.0, "dragon: β of the DPO/KTO implicit reward -β·(‖v_θ-u‖² - ‖v_ref-u‖²), "
                                    "element-averaged velocity errors", gt=0)
    dragon_pairs: str = _f("best_worst", "dragon dpo: pairs per group, best_worst (its highest vs lowest "
                                         "score) or all (every pair with distinct scores)",
                           choices=("best_worst", "all"))
    dragon_fraction: float = _f(0.25, "dragon kto: top / bottom fraction of each group that is desirable / "
                                      "undesirable", gt=0, max=0.5)
    dragon_timesteps: int = _f(2, "dragon: noise levels per demonstration and update, drawn from the "
                                  "sampler's sigmas (shared within a group)", min=1)
    kto_reference_point: str = _f("batch", "dragon kto: the reference point z0, batch (KTO's max(0, mean "
                                           "implicit reward), detached) or a number, e.g. '0'")
    lr: float = _f(3e-4, "AdamW learning rate", gt=0)
    weight_decay: float = _f(1e-4, "AdamW weight decay", min=0)
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 = off)", min=0)
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon (for element-averaged log-probs)", gt=0)
    adv_clip_max: float = _f(5.0, "advantages clipped to [-max, max]", gt=0)
    kl_beta: float = _f(0.04, "coefficient of the KL to the reference model (0 = off)", min=0)
    reference_device: str = _f("model", "model.train_mode=full with kl_beta > 0: where the frozen copy of the "
                                        "initial denoiser (the KL's reference) lives, model (the policy's device) "
                                        "or cpu (saves its memory, one forward per KL term on the CPU); one copy "
                                        "per process", choices=("model", "cpu"))
    reference_dtype: str = _f("model", "model.train_mode=full with kl_beta > 0: dtype of the frozen reference "
                                       "copy, model (model.dtype) or float32, bfloat16, float16",
                              choices=("model", "float32", "bfloat16", "float16"))
    kl_form: str = _f("exact", "KL to the reference: exact (the Gaussian transitions' KL, ÷2(σ_t·√|Δt|)²) or "
                               "flow_grpo (Flow-GRPO's code, ÷2σ_t²: |Δt| times the exact one; needs "
                               "sampling.sde_kind=flow_grpo)", choices=("exact", "flow_grpo"))
    num_inner_epochs: int = _f(1, "passes over each iteration's rollouts", min=1)
    timestep_fraction: float = _f(1.0, "fraction of recorded steps trained per sample", gt=0, max=1)
    timestep_weighting: str = _f("uniform", "per-step loss weight: uniform, or noise_aware (TempFlow-GRPO, "
                                            "proportional to the step's noise scale)",
                                 choices=("uniform", "noise_aware"))
    shuffle_timesteps: bool = _f(True, "which recorded steps a unit trains each epoch: true = a random "
                                       "timestep_fraction of them in random order (DanceGRPO); false = the first "
                                       "ones in order (Flow-GRPO: steps 0..8 of 10)")
    std_mode: str = _f("per_prompt", "advantage std: per_prompt group std or global batch std",
                       choices=("per_prompt", "global"))
    adv_std: str = _f("population", "advantage std estimator: population (÷n; Flow-GRPO, numpy) or unbiased "
                                    "(÷(n-1); DanceGRPO, Pref-GRPO, torch)", choices=("population", "unbiased"))
    adv_eps: float = _f(1e-4, "added to the advantage std (Flow-GRPO 1e-4; DanceGRPO, Pref-GRPO 1e-8)", gt=0)
    reward_normalization: str = _f("sum_then_normalize", "multi-reward: sum_then_normalize, or "
                                   "per_reward (normalize each reward, then weighted sum; GDPO-style)",
                                   choices=("sum_then_normalize", "per_reward"))
    ema: bool = _f(False, "keep an EMA of the trainable weights")
    ema_decay: float = _f(0.9, "EMA decay per update", min=0, max=1)
    ema_every: int = _f(1, "EMA: update at optimizer steps k with (k+1) a multiple of this (Flow-GRPO: 8)", min=1)
    ema_warmup: bool = _f(False, "EMA: decay min((1+k)/(10+k), ema_decay) at optimizer step k (Flow-GRPO's "
                                 "warm-up); false: ema_decay from the first update")
    mixed_precision: str = _f("bf16", "autocast precision of forward passes: fp32 (none), fp16 or bf16 "
                                      "(accelerate's 'no' is spelled fp32 here: YAML reads a bare no as false)",
                              choices=("fp32", "fp16", "bf16"))
    ratio_dev_warn: Optional[float] = _f(None, "warn when train/ratio_dev_first_step (largest |ratio-1| before the "
                                               "iteration's first optimizer step, where it must be 1) exceeds "
                                               "this; null = train.clip_range", min=0)
    judge_failure_limit: float = _f(0.5, "judges (win_rate, vlm_score): largest fraction of an iteration's "
                                         "judge requests that may fail (scored as ties) before judge_on_failure "
                                         "applies; an iteration where every request fails always counts", min=0, max=1)
    judge_on_failure: str = _f("error", "past judge_failure_limit: error (stop the run, naming the iteration) or "
                                        "warn (a warning line; failed comparisons stay ties)",
                               choices=("error", "warn"))



@dataclass
class EvalConfig:
    prompts: Optional[str] = _f(None, "held-out prompts evaluated with ODE sampling, any train.prompts source "
                                      "(null = no eval)")
    every: int = _f(50, "evaluate every N iterations", min=1)
    num_images: int = _f(1, "images per eval prompt (fixed seeds)", min=1)
    seed: int = _f(1234, "seed of the evaluation noise")
    rewards: list[RewardSpec] = _f([], "pointwise rewards reported on eval images (empty = the training "
                                       "rewards); e.g. pocket_gold with args {score: strict}")
    batch_size: int = _f(64, "eval images per forward", min=1)
    at_start: bool = _f(True, "also evaluate before the first iteration (the base model)")



@dataclass
class Config:
    """A ``flowalign train`` run: the shared sections (model, sampling, rewards, run) and GRPO's own."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the flow model and its adapters"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "rollout sampling"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "GRPO optimisation"})
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec(name="jpeg_compressibility")],
        metadata={"help": "pointwise rewards, summed with their weights"},
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "held-out evaluation"})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "outputs and bookkeeping"})



def load_config(path: str | os.PathLike | None = None, overrides=(), validate: bool = True) -> Config:
    """Defaults ← YAML file ← ``key=value`` overrides, type-checked; with ``validate`` also the
    cross-field combinations (``validate_config``). Relative prompt files (``train.prompts``,
    ``eval.prompts``) not found from the current folder are looked up from the config file's folder
    upwards (``locate_from_config``), so a recipe loads the same from any folder."""
    cfg = load_structured(Config, path, overrides)
    if path is not None:
        cfg.train.prompts = _locate_source(cfg.train.prompts, path)
        if cfg.eval.prompts is not None:
            cfg.eval.prompts = _locate_source(cfg.eval.prompts, path)
    if validate:
        validate_config(cfg)
    return cfg


def _locate_source(source: str, config) -> str:
    """A local prompt source found from the config's folder upwards (options after '?' kept); Hub datasets as given."""
    if source.startswith(HF_PREFIX):
        return source
    location, sep, options = source.partition("?")
    return locate_from_config(location, config) + sep + options


def validate_config(cfg: Config) -> None:
    """Value ranges, choices and impossible combinations; raises ConfigError."""
    _check_ranges(cfg, "")
    s, t = cfg.sampling, cfg.train
    validate_sampling(s)
    if t.objective == "nft" and s.plan == "branching":
        raise ConfigError(
            "train.objective=nft learns from final images only, so TempFlow branching (one advantage per branch "
            "step) has nothing to attach to; use sampling.plan=window or full with nft"
        )
    _validate_objective(cfg)
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas={t.adam_betas} must be two values in [0, 1)")
    if cfg.model.train_mode == "none":
        raise ConfigError("model.train_mode=none trains nothing; use lora or full for `train` configs")
    if cfg.model.family not in FLOW_FAMILIES:
        raise ConfigError(
            f"model.family={cfg.model.family} is a one-step UNet generator for noise optimization; "
            f"GRPO needs a flow model ({' or '.join(FLOW_FAMILIES)})"
        )
    uses_copy = cfg.model.train_mode == "full" and t.kl_beta > 0
    for key in ("reference_device", "reference_dtype"):
        if getattr(t, key) != "model" and not uses_copy:
            raise ConfigError(
                f"train.{key}={getattr(t, key)} places the frozen reference copy kept for model.train_mode=full with "
                f"train.kl_beta > 0; this run has none (LoRA's reference is the base with adapters off): remove it"
            )
    if t.kl_form == "flow_grpo" and s.sde_kind != "flow_grpo":
        raise ConfigError(f"train.kl_form=flow_grpo is Flow-GRPO's KL of its own SDE; with sampling.sde_kind="
                          f"{s.sde_kind} use train.kl_form=exact")
    if s.window_rollback and s.plan != "progressive_window":
        raise ConfigError(f"sampling.window_rollback applies to sampling.plan=progressive_window, not {s.plan}; "
                          "remove it or use the progressive window")
    if s.window_rollback and not s.window_start < s.num_steps - 2:
        raise ConfigError(f"sampling.window_rollback cuts windows at step num_steps-2={s.num_steps - 2}: "
                          f"sampling.window_start={s.window_start} must be below it")
    if cfg.model.dtype == "float16" and t.mixed_precision == "bf16":
        raise ConfigError("model.dtype=float16 with train.mixed_precision=bf16 mixes half types; pick one")
    if not cfg.rewards:
        raise ConfigError("rewards is empty; give at least one reward, e.g. rewards: [{name: clip}]")
    for i, r in enumerate(cfg.rewards):
        if not r.name:
            raise ConfigError(f"rewards[{i}].name is empty; give a registered reward name")
    if s.antithetic_noise and s.plan == "branching":
        raise ConfigError("sampling.antithetic_noise pairs whole rollouts; branching plans (TempFlow) are not "
                          "supported, set sampling.antithetic_noise=false or use another plan")
    if s.antithetic_noise and (t.group_size % 2 or s.batch_size % 2):
        raise ConfigError(
            f"sampling.antithetic_noise pairs the images of a group: train.group_size={t.group_size} and "
            f"sampling.batch_size={s.batch_size} must be even"
        )
    if t.micro_batch_size > t.group_size * t.prompts_per_iteration:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} is larger than the images per iteration "
            f"({t.group_size * t.prompts_per_iteration}); lower it"
        )




def _validate_objective(cfg: Config) -> None:
    """The combinations the prdp and dragon objectives refuse (before anything is loaded)."""
    s, t = cfg.sampling, cfg.train
    objective = OBJECTIVES[t.objective]
    if objective.batch_unit == "group":
        if t.group_size < 2:
            raise ConfigError(f"train.objective={t.objective} compares images of the same prompt; "
                              f"train.group_size={t.group_size} gives no pairs, use 2 or more")
        if t.micro_batch_size % t.group_size:
            raise ConfigError(
                f"train.objective={t.objective} trains whole prompt groups per micro-batch: train.micro_batch_size="
                f"{t.micro_batch_size} must be a multiple of train.group_size={t.group_size}"
            )
        if s.plan == "branching":
            raise ConfigError(f"train.objective={t.objective} compares whole trajectories of a prompt; TempFlow "
                              f"branching units are single steps; use sampling.plan=window or full")
        if t.kl_beta > 0:
            raise ConfigError(
                f"train.objective={t.objective} has its own reference term ({'prdp_beta, prdp_reference' if t.objective == 'prdp' else 'dragon_beta'}); "
                f"train.kl_beta={t.kl_beta} would add a second one: set train.kl_beta=0"
            )
    needs_reference = t.objective == "dragon" or (t.objective == "prdp" and t.prdp_reference == "pretrained")
    if needs_reference and cfg.model.train_mode == "full":
        raise ConfigError(f"train.objective={t.objective} compares the policy with a frozen reference (the base "
                          f"with LoRA off), which model.train_mode=full changes; use lora"
                          + (" or train.prdp_reference=old" if t.objective == "prdp" else ""))
    if t.kto_reference_point != "batch":
        try:
            float(t.kto_reference_point)
        except ValueError:
            raise ConfigError(f"train.kto_reference_point={t.kto_reference_point!r} must be 'batch' or a number, "
                              f"e.g. '0'") from None


@dataclass(frozen=True)
class Sizes:
    """How much an iteration handles, derived once from the config (per iteration unless named
    otherwise). A *unit* is what an advantage is attached to: an image, or with TempFlow branching one
    (image, branch step, branch); a *column* is what one micro-step of a unit trains on: a recorded
    SDE step, or the objective's own (NFT: a noise level)."""

    processes: int
    groups: int  # prompts per iteration (P), over all processes
    group_size: int  # images per prompt (G)
    images: int  # P·G, over all processes
    images_per_process: int
    units_per_image: int  # 1, or J branch steps × K branches
    units: int  # images × units_per_image
    units_per_process: int
    recorded_steps_per_unit: int  # transitions recorded per unit by the plan
    columns_per_unit: int  # the objective's columns per unit
    trained_columns_per_unit: int  # columns visited per unit and inner epoch
    column_name: str  # "steps" or "noise levels"
    micro_batch_size: int  # units per micro-step, per process
    groups_per_micro_batch: int  # objectives comparing units of a group (prdp, dragon): whole groups per
    # micro-step, micro_batch_size / group_size; 0 for the others (units in any order)
    accumulation_steps: int  # micro-batches per optimizer step
    micro_batches_per_epoch: int  # nominal (masked groups make it smaller)
    optimizer_steps: int  # nominal, over all inner epochs
    iterations: int

    @classmethod
    def of(cls, cfg: Config, processes: int, *, units_per_image: int, recorded_steps_per_unit: int) -> "Sizes":
        """The sizes of ``cfg`` on ``processes`` processes with a plan of ``units_per_image`` units of
        ``recorded_steps_per_unit`` steps; ConfigError when the images cannot be split evenly."""
        t = cfg.train
        images = t.group_size * t.prompts_per_iteration
        if images % processes:
            raise ConfigError(
                f"train.group_size·prompts_per_iteration = {images} images per iteration cannot be split over "
                f"{processes} processes; make it a multiple of {processes}"
            )
        objective = OBJECTIVES[t.objective]
        grouped = objective.batch_unit == "group"
        if grouped and t.prompts_per_iteration % processes:
            raise ConfigError(
                f"train.objective={t.objective} trains whole prompt groups on one process: "
                f"train.prompts_per_iteration={t.prompts_per_iteration} must be a multiple of the {processes} processes"
            )
        columns = objective.columns_per_unit(t, recorded_steps_per_unit)
        units_per_process = images * units_per_image // processes
        micro = math.ceil(units_per_process / t.micro_batch_size)
        return cls(processes=processes, groups=t.prompts_per_iteration, group_size=t.group_size, images=images,
                   images_per_process=images // processes, units_per_image=units_per_image,
                   units=images * units_per_image, units_per_process=units_per_process,
                   recorded_steps_per_unit=recorded_steps_per_unit, columns_per_unit=columns,
                   trained_columns_per_unit=objective.trained_columns(t, columns), column_name=objective.column_name,
                   micro_batch_size=t.micro_batch_size,
                   groups_per_micro_batch=t.micro_batch_size // t.group_size if grouped else 0,
                   accumulation_steps=t.gradient_accumulation_steps,
                   micro_batches_per_epoch=micro,
                   optimizer_steps=t.num_inner_epochs * math.ceil(micro / t.gradient_accumulation_steps),
                   iterations=t.num_iterations)

    def summary(self, objective: str, trainable_params: int) -> dict:
        """The start-up summary (``flowalign train`` prints it; ``--dry-run`` prints only it)."""
        return {
            "objective": objective,
            "processes": self.processes,
            "trainable_params": trainable_params,
            "groups_per_iteration": self.groups,
            "group_size": self.group_size,
            "images_per_iteration": self.images,
            "trained_units_per_iteration": self.units,
            "units_per_process": self.units_per_process,
            "recorded_steps_per_unit": self.recorded_steps_per_unit,
            "trained_steps_per_unit": self.trained_columns_per_unit,
            "micro_batches_per_epoch": self.micro_batches_per_epoch,
            **({"groups_per_micro_batch": self.groups_per_micro_batch} if self.groups_per_micro_batch else {}),
            "optimizer_steps_per_iteration": self.optimizer_steps,
            "effective_batch": f"{self.micro_batch_size * self.accumulation_steps * self.processes} samples × "
                               f"{self.trained_columns_per_unit} {self.column_name} per optimizer step",
            "total_images": self.images * self.iterations,
        }
