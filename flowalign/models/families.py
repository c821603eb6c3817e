"""The model families flowalign loads: the one table of their names, diffusers pipelines, adapters
and kinds, and the option values every adapter accepts. Plain data (no model library is imported),
so the config schema, the adapters and the noise optimizer all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "FLOW_FAMILIES", "ONE_STEP_FAMILIES", "TRAIN_MODES", "ATTENTION_BACKENDS",
           "SOURCE_FIELDS"]


@dataclass(frozen=True)
class Family:
    pipeline: str  # the diffusers pipeline class its folders are saved with (model_index.json `_class_name`)
    module: str  # the flowalign module of its adapter
    adapter: str  # the adapter (Policy) class in that module
    flow: bool  # a flow-matching model (GRPO trains it; many-step sampling); False: a one-step UNet generator


FAMILIES: dict[str, Family] = {
    "sd3": Family("StableDiffusion3Pipeline", "flowalign.models.sd3", "SD3Policy", flow=True),
    "flux": Family("FluxPipeline", "flowalign.models.flux", "FluxPolicy", flow=True),
    "sd_turbo": Family("StableDiffusionPipeline", "flowalign.models.unet_turbo", "SDTurboPolicy", flow=False),
    "sdxl_turbo": Family("StableDiffusionXLPipeline", "flowalign.models.unet_turbo", "SDXLTurboPolicy", flow=False),
}
FLOW_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.flow)
ONE_STEP_FAMILIES = tuple(name for name, f in FAMILIES.items() if not f.flow)

TRAIN_MODES = ("lora", "full", "none")
ATTENTION_BACKENDS = ("sdpa", "xformers")

# ModelConfig fields that say where the weights come from; every other field of a ModelConfig is an
# option of the adapter's constructor (Policy.__init__), passed under its own name.
SOURCE_FIELDS = ("family", "path", "revision", "variant")
