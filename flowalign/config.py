"""Typed run configuration: one dataclass per section, loaded from YAML with dotted overrides.

    cfg = load_config("configs/x.yaml", ["train.lr=1e-4", "sampling.noise_level=0.8"])

This module holds the sections several commands share (``model``, ``sampling``, ``rewards``,
``run``) and the loading machinery; a command's own sections live beside its code:
``flowalign/grpo/config.py`` (``train``, ``eval``, the whole ``Config`` of ``flowalign train`` and
``load_config``, also importable from here) and ``flowalign/noise_opt/config.py`` (``flowalign reno``).

Loading goes through OmegaConf structured configs (types, conversion, interpolation); on top of that
flowalign checks every key against the schema first (so a typo names the nearest valid key), then
value ranges and cross-field combinations. Every user mistake raises ``ConfigError`` (a ValueError)
whose one-line message names the key and the fix.

Every field carries its help text in ``metadata["help"]``; ``describe()`` lists them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError
from .models.families import ATTENTION_BACKENDS, FAMILIES, TRAIN_MODES

__all__ = [
    "Config", "ModelConfig", "SamplingConfig", "TrainConfig", "RewardSpec", "EvalConfig", "RunConfig",
    "ConfigError", "load_config", "validate_config", "validate_sampling", "load_structured", "locate_from_config",
    "to_yaml", "save_config", "describe",
]

# The sections of `flowalign train` live beside the trainer (flowalign/grpo/config.py) and are
# served from here too, on first use (they import this module's pieces).
_GRPO_NAMES = ("Config", "TrainConfig", "EvalConfig", "load_config", "validate_config")


def __getattr__(name):
    if name in _GRPO_NAMES:
        from .grpo import config as grpo_config

        return getattr(grpo_config, name)
    raise AttributeError(f"module 'flowalign.config' has no attribute {name!r}")


class ConfigError(UserError):
    """A configuration mistake; the message names the key and how to fix it (a ``UserError``, so a
    ``ValueError``)."""


def _f(default, help: str, **kw):
    """A dataclass field with a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    family: str = _f("sd3", "model family: sd3 (SD3/SD3.5), flux (FLUX.1-dev/schnell), sd_turbo, sdxl_turbo",
                     choices=tuple(FAMILIES))
    path: str = _f("stabilityai/stable-diffusion-3.5-medium", "hub id, local diffusers pipeline folder, or builtin:pocket "
                                                                 "(the pocket model shipped with flowalign)")
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) of `path`")
    variant: Optional[str] = _f(None, "weight variant to load, e.g. fp16")
    dtype: str = _f("bfloat16", "dtype of the frozen base weights", choices=("float32", "bfloat16", "float16"))
    device: str = _f("auto", "device: auto (the accelerator of this process, else cpu), cpu, cuda, cuda:1, ...")
    train_mode: str = _f("lora", "what is trained: lora adapters, full weights, or none (inference only)",
                         choices=TRAIN_MODES)
    lora_rank: int = _f(32, "LoRA rank r (Flow-GRPO: 32)", min=1)
    lora_alpha: float = _f(64.0, "LoRA alpha; the update is scaled by alpha/r (Flow-GRPO: 64)", gt=0)
    lora_targets: Optional[list[str]] = _f(None, "module-name suffixes that get LoRA adapters; null = the "
                                                 "family's default (Flow-GRPO: attention q/k/v/out and the "
                                                 "added-context projections)")
    lora_init_path: Optional[str] = _f(None, "existing LoRA adapter folder to start from (diffusers format)")
    gradient_checkpointing: bool = _f(False, "recompute transformer activations in backward to save memory")
    attention_backend: str = _f("sdpa", "attention kernel: sdpa (PyTorch) or xformers (needs the gpu extra)",
                                choices=ATTENTION_BACKENDS)
    compile: bool = _f(False, "torch.compile the transformer")
    offload_text_encoders: bool = _f(False, "move text encoders to CPU after encoding (embeddings are cached)")
    cache_text_embeddings: bool = _f(True, "encode each distinct prompt once and reuse the embeddings")
    max_sequence_length: Optional[int] = _f(None, "T5 token length (SD3 with T5, FLUX); null = the model folder's "
                                                  "flowalign.json value, else 256", min=1)


@dataclass
class SamplingConfig:
    num_steps: int = _f(10, "denoising steps per training rollout", min=1)
    shift: Optional[float] = _f(None, "schedule shift s (sigma' = s*sigma/(1+(s-1)*sigma)); null = the "
                                      "model scheduler's own value", gt=0)
    guidance_scale: float = _f(4.5, "classifier-free guidance scale (FLUX.1-dev: the embedded guidance)", min=0)
    height: int = _f(512, "image height in pixels", min=8)
    width: int = _f(512, "image width in pixels", min=8)
    sde_kind: str = _f("flow_grpo", "stochastic step: flow_grpo (Flow-GRPO SDE), dance (DanceGRPO, constant "
                                    "diffusion), cps (coefficients-preserving)",
                       choices=("flow_grpo", "dance", "cps"))
    noise_level: float = _f(0.7, "SDE noise level a (flow_grpo: sigma_t=a*sqrt(t/(1-t)); dance: eta; "
                                 "cps: s=t_next*sin(a*pi/2))", min=0)
    plan: str = _f("full", "which steps are SDE and trained: full, window, random_window, "
                           "progressive_window (MixGRPO), branching (TempFlow-GRPO)",
                   choices=("full", "window", "random_window", "progressive_window", "branching"))
    include_last_step: bool = _f(True, "full plan: also make the last step (into sigma=0) SDE; must be "
                                       "false for cps, whose last step is deterministic")
    record_last_step: bool = _f(True, "full plan with include_last_step: also record and train the last SDE step; "
                                      "false = DanceGRPO / Pref-GRPO's --ignore_last (the last step stays "
                                      "stochastic but is never trained)")
    window_size: int = _f(2, "window plans: number of consecutive SDE steps", min=1)
    window_start: int = _f(0, "window: first SDE step; progressive_window: starting position", min=0)
    window_range: list[int] = _f([0, 3], "random_window: [low, high] range of the window start (inclusive)")
    window_shift_interval: int = _f(25, "progressive_window: iterations between window moves", min=1)
    window_stride: int = _f(1, "progressive_window: steps the window moves each time", min=0)
    window_rollback: bool = _f(False, "progressive_window: MixGRPO's roll-back (its code's roll_back): windows "
                                      "are cut at step N-2 and the start returns to window_start once it "
                                      "reaches N-2; false: the window stops at the last full position N-w")
    branch_steps: list[int] = _f([1, 3, 5], "branching: steps where K SDE branches start from the ODE trunk")
    num_branches: int = _f(4, "branching: branches K per branch step", min=1)
    share_group_noise: bool = _f(False, "all images of a prompt's group start from the same noise")
    antithetic_noise: bool = _f(False, "images 2j and 2j+1 of a group draw opposite SDE noise (ε, −ε) at every SDE "
                                       "step (antithetic pairs); needs an even group size, no branching")
    eval_num_steps: int = _f(40, "denoising steps of evaluation sampling (ODE)", min=1)
    batch_size: int = _f(0, "images per rollout forward, per process (0 = all of the process's images at once)",
                         min=0)


@dataclass
class RewardSpec:
    name: str = _f(MISSING, "registered reward name, or a dotted path 'package.module:callable'")
    weight: float = _f(1.0, "weight in the reward sum")
    args: dict[str, Any] = _f({}, "keyword arguments of the reward factory (model paths, device, ...)")


@dataclass
class RunConfig:
    output_dir: str = _f("runs/default", "folder for config, metrics, checkpoints and images")
    seed: int = _f(0, "global seed")
    save_every: int = _f(50, "checkpoint every N iterations", min=1)
    log_every: int = _f(1, "log metrics every N iterations", min=1)
    tracker: str = _f("tensorboard", "experiment tracker", choices=("tensorboard", "wandb", "none"))
    resume: bool = _f(True, "resume from the latest checkpoint in output_dir when one exists")
    keep_checkpoints: int = _f(2, "checkpoints kept in output_dir/checkpoints (older ones are deleted)", min=1)
    progress: bool = _f(True, "show a progress bar")


# --------------------------------------------------------------------------------------------------
# loading


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _nearest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if not close:
        return ""
    return f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"


def _section_type(tp):
    """The dataclass behind a field type, list element dataclass, or None."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    args = getattr(tp, "__args__", ())
    if getattr(tp, "__origin__", None) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    return None, False


def _check_keys(data, cls, prefix: str) -> None:
    """Every key of ``data`` must be a field of dataclass ``cls`` (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping of keys, got {type(data).__name__}")
    fields = _fields(cls)
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{path}'{_nearest(str(key), fields, prefix)} "
                f"(valid keys{' in ' + prefix if prefix else ''}: {', '.join(fields)})"
            )
        sub, is_list = _section_type(_resolve(cls, key))
        if sub is None or value is None:
            continue
        if is_list:
            if not isinstance(value, list):
                raise ConfigError(f"config key '{path}' must be a list of mappings, got {type(value).__name__}")
            for i, item in enumerate(value):
                _check_keys(item, sub, f"{path}[{i}]")
        else:
            _check_keys(value, sub, path)


def _resolve(cls, key):
    import typing

    return typing.get_type_hints(cls)[key]


def _parse_overrides(overrides) -> dict:
    items = []
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.lr=1e-4)")
        items.append(o)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as e:
        raise ConfigError(f"could not parse overrides {items}: {str(e).splitlines()[0]}") from None


def _read_yaml(path) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (give a path to a YAML file, e.g. configs/check_sampler.yaml)")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # yaml.YAMLError and OmegaConf errors carry line numbers in their text
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not data:  # an empty file, or only comments
        raise ConfigError(f"config file {path} is empty; give its sections (model:, sampling:, train:, rewards:, "
                          "...), e.g. start from a copy of a recipe in configs/")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, sampling:, ...)")
    return data


def load_structured(schema, path: str | os.PathLike | None = None, overrides=()):
    """An instance of dataclass ``schema``: its defaults ← YAML file ← ``key=value`` overrides, with
    unknown keys named (nearest valid key suggested), types checked and field ranges/choices checked.
    Other parts of flowalign (noise optimization) load their own config sections through this."""
    layers = [_read_yaml(os.fspath(path))] if path is not None else []
    layers.append(_parse_overrides(overrides))
    for layer in layers:
        _check_keys(layer, schema, "")
    merged = OmegaConf.structured(schema)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _typed_error(e) from None
    _check_ranges(obj, "")
    return obj


def locate_from_config(path: str, config: str | os.PathLike) -> str:
    """A relative ``path`` that does not exist from the current folder, looked up from the folder of
    the ``config`` file upwards (``configs/pocket/x.yaml`` finds ``prompts/pocket/train.jsonl`` at the
    repository root); returned unchanged when found nowhere, so the user of the path reports it."""
    from pathlib import Path

    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    for folder in Path(config).resolve().parents:
        if (folder / p).exists():
            return str(folder / p)
    return path


def _typed_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    first = str(e).splitlines()[0]
    if "issing mandatory value" in first:
        return ConfigError(f"config key '{key}' is required; set it in the YAML file or with an override")
    return ConfigError(f"config key '{key}': {first}; fix the value in the YAML file or the override")


# --------------------------------------------------------------------------------------------------
# validation: ranges and choices from field metadata, then combinations


def _check_ranges(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        meta = f.metadata
        if dataclasses.is_dataclass(value):
            _check_ranges(value, path)
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_ranges(item, f"{path}[{i}]")
            continue
        if value is None:
            continue
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"config key '{path}' is {value}; it must be a finite number, set a real value "
                              f"(default: {_default(f)})")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(
                f"config key '{path}' is {value!r}{_nearest(str(value), meta['choices'])} "
                f"(choose one of: {', '.join(meta['choices'])})"
            )
        for bound, ok, word in (("min", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                ("max", lambda v, b: v <= b, "<=")):
            if bound in meta and not ok(value, meta[bound]):
                raise ConfigError(f"config key '{path}' must be {word} {meta[bound]}, got {value}")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def validate_sampling(s: SamplingConfig) -> None:
    """Combinations of the ``sampling`` section the schema cannot express; raises ConfigError."""
    n = s.num_steps
    if s.plan in ("window", "random_window", "progressive_window") and s.window_size > n:
        raise ConfigError(
            f"sampling.window_size={s.window_size} exceeds sampling.num_steps={n}; lower the window or add steps"
        )
    if s.plan == "window" and s.window_start + s.window_size > n:
        raise ConfigError(
            f"sampling.window_start={s.window_start} + window_size={s.window_size} runs past num_steps={n}; "
            f"use window_start <= {n - s.window_size}"
        )
    if s.plan == "random_window":
        if len(s.window_range) != 2 or not 0 <= s.window_range[0] <= s.window_range[1] <= n - s.window_size:
            raise ConfigError(
                f"sampling.window_range={s.window_range} must be [low, high] with 0 <= low <= high <= "
                f"num_steps - window_size = {n - s.window_size}"
            )
    if s.plan == "branching":
        b = s.branch_steps
        if not b or b != sorted(set(b)) or b[0] < 0 or b[-1] >= n:
            raise ConfigError(
                f"sampling.branch_steps={b} must be sorted, unique step indices in [0, {n - 1}]"
            )
    if s.sde_kind == "cps":
        last_sde = (s.plan == "full" and s.include_last_step) or (
            s.plan == "window" and s.window_start + s.window_size == n
        ) or (s.plan == "branching" and s.branch_steps and s.branch_steps[-1] == n - 1)
        if last_sde:
            raise ConfigError(
                "sampling.sde_kind=cps makes the last step (into sigma=0) deterministic, so it cannot be "
                "trained; set sampling.include_last_step=false or keep windows/branches before the last step"
            )
    if not s.record_last_step and not (s.plan == "full" and s.include_last_step):
        raise ConfigError("sampling.record_last_step=false leaves the last SDE step of a full plan untrained; it needs "
                          "sampling.plan=full and sampling.include_last_step=true (with include_last_step=false the "
                          "last step is an ODE step and never trained anyway)")
    if s.sde_kind != "cps" and s.noise_level == 0:
        raise ConfigError(
            f"sampling.noise_level=0 makes the {s.sde_kind} SDE deterministic (no log-prob); use a value > 0"
        )
    if s.sde_kind == "cps" and s.noise_level > 1:
        raise ConfigError("sampling.noise_level for cps is a fraction of pi/2 and must be <= 1")


# --------------------------------------------------------------------------------------------------
# output


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    from .io import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


def describe(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field of the schema ``cls`` (default: the ``flowalign
    train`` config, ``Config``), for docs and ``config keys``."""
    if cls is None:
        from .grpo.config import Config as cls
    rows = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        sub, is_list = _section_type(_resolve(cls, f.name))
        if sub is not None:
            rows.extend(describe(sub, path + ("[]" if is_list else "")))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((path, repr(default), f.metadata.get("help", "")))
    return rows
