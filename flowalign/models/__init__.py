"""Model adapters (Policies) for the families flowalign trains and optimizes noise for.

==============  ==========================  ===================================================
family          diffusers pipeline          adapter
==============  ==========================  ===================================================
``sd3``         StableDiffusion3Pipeline    ``sd3.SD3Policy`` (SD3, SD3.5; T5 optional)
``flux``        FluxPipeline                ``flux.FluxPolicy`` (FLUX.1-dev, FLUX.1-schnell)
``sd_turbo``    StableDiffusionPipeline     ``unet_turbo.SDTurboPolicy`` (one-step generator)
``sdxl_turbo``  StableDiffusionXLPipeline   ``unet_turbo.SDXLTurboPolicy`` (one-step generator)
==============  ==========================  ===================================================

Importing this package does not import diffusers, transformers or peft; the adapters do when used.
"""

from __future__ import annotations

import importlib

FAMILIES = {
    "sd3": ("flowalign.models.sd3", "SD3Policy"),
    "flux": ("flowalign.models.flux", "FluxPolicy"),
    "sd_turbo": ("flowalign.models.unet_turbo", "SDTurboPolicy"),
    "sdxl_turbo": ("flowalign.models.unet_turbo", "SDXLTurboPolicy"),
}

# model.path naming the pocket text-to-image model shipped inside flowalign (works from any folder).
POCKET_PATH = "builtin:pocket"

# ModelConfig fields passed to the adapter's constructor unchanged.
_OPTION_FIELDS = (
    "device", "dtype", "train_mode", "lora_rank", "lora_alpha", "lora_targets", "lora_init_path",
    "gradient_checkpointing", "attention_backend", "compile", "offload_text_encoders",
    "cache_text_embeddings", "max_sequence_length",
)


def policy_class(family: str):
    """The adapter class of ``family`` (imports its module)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family {family!r}; choose one of {sorted(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def load_policy(model_cfg):
    """Load the policy described by a ``ModelConfig`` (family, path, revision, variant and the options
    of ``Policy.__init__``) through its family's ``from_pretrained``."""
    cls = policy_class(model_cfg.family)
    path = model_cfg.path
    if path == POCKET_PATH:
        from flowalign.pocket.assets import T2I_DIR, shipped

        if model_cfg.family != "sd3":
            raise ValueError(f"model.path={POCKET_PATH!r} is the shipped pocket model, an sd3-family model; "
                             f"set model.family=sd3 (got {model_cfg.family!r})")
        path = str(shipped(T2I_DIR, "text-to-image model"))
    options = {name: getattr(model_cfg, name) for name in _OPTION_FIELDS}
    if options["lora_targets"] is not None:
        options["lora_targets"] = list(options["lora_targets"])
    return cls.from_pretrained(path, revision=model_cfg.revision, variant=model_cfg.variant, **options)


def __getattr__(name):
    # Light access to the public classes: `from flowalign.models import Cond, Policy` imports base only.
    if name in ("Cond", "Policy", "FlowPolicy"):
        return getattr(importlib.import_module("flowalign.models.base"), name)
    raise AttributeError(f"module 'flowalign.models' has no attribute {name!r}")


__all__ = ["FAMILIES", "POCKET_PATH", "load_policy", "policy_class", "Cond", "Policy", "FlowPolicy"]
