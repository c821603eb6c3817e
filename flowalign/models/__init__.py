"""Model adapters (Policies) for the families flowalign trains and optimizes noise for.

==============  ==========================  ===================================================
family          diffusers pipeline          adapter
==============  ==========================  ===================================================
``sd3``         StableDiffusion3Pipeline    ``sd3.SD3Policy`` (SD3, SD3.5; T5 optional)
``flux``        FluxPipeline                ``flux.FluxPolicy`` (FLUX.1-dev, FLUX.1-schnell)
``sd_turbo``    StableDiffusionPipeline     ``unet_turbo.SDTurboPolicy`` (one-step generator)
``sdxl_turbo``  StableDiffusionXLPipeline   ``unet_turbo.SDXLTurboPolicy`` (one-step generator)
==============  ==========================  ===================================================

The table itself is ``families.FAMILIES``. Importing this package does not import diffusers,
transformers or peft; the adapters do when used.
"""

from __future__ import annotations

import dataclasses
import importlib

from ..errors import UserError
from .families import FAMILIES, SOURCE_FIELDS

# model.path naming the pocket text-to-image model shipped inside flowalign (works from any folder).
POCKET_PATH = "builtin:pocket"


def policy_class(family: str):
    """The adapter class of ``family`` (imports its module)."""
    if family not in FAMILIES:
        raise UserError(f"unknown model.family {family!r}; choose one of {sorted(FAMILIES)}")
    f = FAMILIES[family]
    return getattr(importlib.import_module(f.module), f.adapter)


def _model_path(model_cfg) -> str:
    """``model.path`` with ``builtin:pocket`` resolved to the shipped folder."""
    if model_cfg.path != POCKET_PATH:
        return model_cfg.path
    from flowalign.pocket.assets import T2I_DIR, shipped

    if model_cfg.family != "sd3":
        raise UserError(f"model.path={POCKET_PATH!r} is the shipped pocket model, an sd3-family model; "
                        f"set model.family=sd3 (got {model_cfg.family!r})")
    return str(shipped(T2I_DIR, "text-to-image model"))


def check_model_files(model_cfg) -> None:
    """Without loading anything: a local ``model.path`` is a pipeline folder whose weight files are
    whole (``UserError`` naming the file otherwise); a hub id is left to the loader."""
    from pathlib import Path

    from flowalign.io import check_safetensors

    path = Path(_model_path(model_cfg)).expanduser()
    if path.exists():
        from .base import read_model_index

        read_model_index(path)
        check_safetensors(path, "model.path")


def load_policy(model_cfg):
    """Load the policy described by a ``ModelConfig`` (family, path, revision, variant and the options
    of ``Policy.__init__``) through its family's ``from_pretrained``."""
    cls = policy_class(model_cfg.family)
    path = _model_path(model_cfg)
    options = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg) if f.name not in SOURCE_FIELDS}
    if options["lora_targets"] is not None:
        options["lora_targets"] = list(options["lora_targets"])
    return cls.from_pretrained(path, revision=model_cfg.revision, variant=model_cfg.variant, **options)


def __getattr__(name):
    # Light access to the public classes: `from flowalign.models import Cond, Policy` imports base only.
    if name in ("Cond", "Policy", "FlowPolicy"):
        return getattr(importlib.import_module("flowalign.models.base"), name)
    raise AttributeError(f"module 'flowalign.models' has no attribute {name!r}")


__all__ = ["FAMILIES", "POCKET_PATH", "check_model_files", "load_policy", "policy_class", "Cond", "Policy", "FlowPolicy"]
