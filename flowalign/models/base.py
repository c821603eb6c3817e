"""The Policy interface: what samplers, trainers and noise optimizers need from a diffusers model.

A ``Policy`` wraps a loaded diffusers pipeline (``self.pipe``) and exposes:

* ``encode(prompts, negative_prompts=None) -> Cond``: prompt embeddings (+ the unconditional ones
  when the family uses classifier-free guidance), with an LRU cache keyed by prompt text (on the
  policy's device, ``cache_size`` texts; one SD3/FLUX text with T5 is ~3–4 MB in bf16);
* ``decode(latents) -> images`` in [0, 1], [B, 3, H, W] float32, following each VAE's conventions;
* ``trainable_parameters()``, ``reference()`` (the frozen base for a KL term), ``save_adapter(dir)``;
* flow families (``FlowPolicy``) add ``velocity(x, sigma, cond, guidance_scale)``,
  ``sigmas(num_steps, height, width)``, ``latent_shape(height, width)`` and a differentiable
  ``generate(noise, cond, ...)``; the one-step UNet families (``unet_turbo.TurboPolicy``) add
  ``generate(noise, cond)`` only.

Notation (as in ``flowalign.sampling``): σ = t ∈ [0, 1], t = 1 is noise; x_t = (1−t)·x0 + t·ε and the
velocity v ≈ ε − x0. Latents are always unpacked [B, C, H, W] so samplers stay generic.

Precision: the denoiser and text encoders run in ``dtype``; trainable LoRA weights are kept in
float32 (peft casts activations to them); the VAE is kept in float32 for decoding quality (it is
small next to the denoiser); velocities and decoded images are returned in float32.

Text encoders are never trained: ``encode`` runs without gradients.

diffusers, transformers and peft are imported inside functions so ``import flowalign`` stays light.
"""

from __future__ import annotations

import logging

import contextlib
import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch

from flowalign.errors import UserError
from flowalign.io import check_safetensors
from flowalign.models.families import ATTENTION_BACKENDS, FAMILIES, TRAIN_MODES
from flowalign.sampling.steps import ode_step
from flowalign.torch_utils import resolve_device, resolve_dtype

# family -> the diffusers pipeline class its folders are saved with (model_index.json `_class_name`)
PIPELINE_CLASSES = {name: f.pipeline for name, f in FAMILIES.items()}

# Flow-GRPO's LoRA targets for MMDiT transformers: the joint attention's image-stream q/k/v/out and
# its context-stream ("added") projections (module-name suffixes, as peft matches them).
FLOW_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
# UNets name their attentions attn1 (self) and attn2 (cross).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class Cond:
    """Text conditioning of a batch, one row per sample (rows of all fields line up).

    ``neg_embeds``/``neg_pooled`` are the unconditional (negative-prompt) rows used by CFG; they are
    None for families that do not use CFG (FLUX.1, the turbo UNets). ``pooled`` is None for SD-Turbo.
    """

    embeds: torch.Tensor  # [B, L, D] token embeddings
    pooled: torch.Tensor | None = None  # [B, P] pooled embedding
    neg_embeds: torch.Tensor | None = None  # [B, L, D]
    neg_pooled: torch.Tensor | None = None  # [B, P]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Cond:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Cond(**{name: None if v is None else fn(v) for name, v in values.items()})

    def __getitem__(self, idx) -> Cond:
        """Rows ``idx`` (int, slice, list or index/bool tensor); an int keeps the batch dim."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, repeats: int) -> Cond:
        """Each row ``repeats`` times in a row (GRPO: G samples per prompt)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> Cond:
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate batches along the sample dim."""
        first = conds[0]
        out = {}
        for f in dataclasses.fields(first):
            values = [getattr(c, f.name) for c in conds]
            out[f.name] = None if values[0] is None else torch.cat(values, dim=0)
        return Cond(**out)


DEFAULT_MAX_SEQUENCE_LENGTH = 256  # the diffusers SD3 / FLUX pipelines' default T5 length
SETTINGS_FILE = "flowalign.json"  # optional, next to model_index.json: settings a folder was trained with


def folder_settings(folder: str | Path) -> dict:
    """The pipeline folder's ``flowalign.json`` (``{}`` without one): call settings the model was
    trained with that diffusers does not store, e.g. ``max_sequence_length`` — the pocket T2I model
    is trained with one null T5 token, so the stock pipeline reproduces it with
    ``pipe(..., max_sequence_length=1)`` and a policy loaded from the folder uses 1 unless
    ``model.max_sequence_length`` says otherwise."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    length = settings.get("max_sequence_length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise UserError(f"{path}: max_sequence_length must be an integer >= 1, got {length!r}; fix or delete it")
    return settings


def read_model_index(path: str | Path, revision: str | None = None) -> tuple[dict, Path | None]:
    """The pipeline's ``model_index.json`` and its local folder (None for a hub id).

    Raises ValueError naming the problem for a path that does not exist and is not a hub id, a
    file, or a folder without ``model_index.json``.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise UserError(
                f"model path {str(path)!r} is a folder but not a diffusers pipeline: it has no model_index.json. "
                "Point model.path to the folder written by `pipe.save_pretrained(...)` (or to a hub id)."
            )
        return json.loads(index.read_text()), local
    if local.exists():
        raise UserError(
            f"model path {str(path)!r} is a file; point model.path to a diffusers pipeline folder or a hub id"
        )
    if not _HUB_ID.match(str(path)):
        raise UserError(
            f"model path {str(path)!r} does not exist and is not a hub id ('owner/name'). Point model.path to a "
            "diffusers pipeline folder (one with model_index.json) or to a hub id such as "
            "'stabilityai/stable-diffusion-3.5-medium'."
        )
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(str(path), revision=revision), None
    except OSError as err:  # huggingface_hub's lookup errors are OSErrors
        raise UserError(
            f"model path {str(path)!r} is not a local folder, and loading it as a hub id failed: {err}. "
            "Check the spelling, download the model first (HF_HUB_OFFLINE=1 allows only cached models), or "
            "point model.path to a local pipeline folder."
        ) from err


def _present(entry) -> bool:
    """A model_index.json component entry is present when it names a library and a class."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


class Policy:
    """Base of all adapters (see the module docstring). Build one with ``from_pretrained(path, ...)``
    or ``load_policy(model_cfg)``, or wrap an in-memory pipeline with ``Policy(pipe, ...)``."""

    family: ClassVar[str]
    denoiser_name: ClassVar[str]  # "transformer" | "unet"
    required_components: ClassVar[tuple[str, ...]]
    optional_components: ClassVar[tuple[str, ...]] = ()  # loaded as None when the folder lacks them
    text_encoder_names: ClassVar[tuple[str, ...]]
    uses_cfg: ClassVar[bool] = False  # encode() adds the unconditional rows
    default_lora_targets: ClassVar[tuple[str, ...]] = FLOW_LORA_TARGETS

    def __init__(
        self,
        pipe,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        train_mode: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        lora_targets: list[str] | tuple[str, ...] | None = None,
        lora_init_path: str | Path | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: str = "sdpa",
        compile: bool = False,
        offload_text_encoders: bool = False,
        cache_text_embeddings: bool = True,
        max_sequence_length: int | None = None,
        cache_size: int = 256,
    ):
        expected = PIPELINE_CLASSES[self.family]
        if type(pipe).__name__ != expected:
            raise ValueError(f"{type(self).__name__} wraps a diffusers {expected}, got {type(pipe).__name__}")
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"model.train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        if max_sequence_length < 1:
            raise ValueError(f"model.max_sequence_length must be >= 1, got {max_sequence_length}")

        self.pipe = pipe
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.train_mode = train_mode
        self.max_sequence_length = max_sequence_length
        self.offload_text_encoders = offload_text_encoders
        self.cache_text_embeddings = cache_text_embeddings
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

        pipe.set_progress_bar_config(disable=True)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                offload = offload_text_encoders and name in self.text_encoder_names
                module.to("cpu" if offload else self.device)
                target = torch.float32 if name == "vae" else self.dtype
                if module.dtype != target:  # from_pretrained already loaded the right dtypes
                    module.to(target)
                module.requires_grad_(False)
                module.eval()

        self._has_lora = False
        self._denoiser_call = None  # a distributed wrapper of the denoiser (see wrap_denoiser)
        self._reference = None  # train_mode 'full': a frozen copy of the initial denoiser (see attach_reference)
        if lora_init_path is not None:
            if train_mode == "full":
                raise UserError("model.lora_init_path needs train_mode 'lora' (keep training it) or 'none' (frozen)")
            self._load_lora(lora_init_path, trainable=train_mode == "lora")
        elif train_mode == "lora":
            self._add_lora(lora_rank, lora_alpha, list(lora_targets or self.default_lora_targets))
        elif train_mode == "full":
            self.denoiser.requires_grad_(True)
        if self._has_lora and train_mode == "lora":
            from diffusers.training_utils import cast_training_params

            cast_training_params(self.denoiser, dtype=torch.float32)

        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        if attention_backend == "xformers":
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise UserError("model.attention_backend='xformers' but xformers is not installed: "
                                 "`pip install xformers`, or use attention_backend='sdpa'")
            self.denoiser.set_attention_backend("xformers")
        if compile:
            self.denoiser.compile()  # in place: module type, state-dict keys and adapters are kept

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, variant: str | None = None, **options):
        """Load a pipeline folder or hub id of this family and wrap it (options: see ``__init__``)."""
        index, local = read_model_index(path, revision)
        expected = PIPELINE_CLASSES[cls.family]
        found = index.get("_class_name")
        if found != expected:
            other = next((fam for fam, name in PIPELINE_CLASSES.items() if name == found), None)
            hint = f" (that is family '{other}': set model.family='{other}')" if other else ""
            raise UserError(
                f"model path {str(path)!r} holds a {found} pipeline{hint}, but model family '{cls.family}' expects a "
                f"{expected}. Set model.family to match the folder, or point model.path to a {expected} folder."
            )
        for name in cls.required_components:
            if not _present(index.get(name)):
                raise UserError(
                    f"model path {str(path)!r} has no '{name}' component in model_index.json; a '{cls.family}' "
                    f"pipeline needs {list(cls.required_components)}"
                    + (f" (optional: {list(cls.optional_components)})" if cls.optional_components else "")
                )
            if local is not None and not (local / name).is_dir():
                raise UserError(
                    f"model path {str(path)!r}: model_index.json lists '{name}' ({index[name][1]}) but the folder "
                    f"{local / name} is missing; re-save the pipeline or copy the component folder"
                )
        if local is not None:
            check_safetensors(local, "model.path")
        import diffusers

        if options.get("max_sequence_length") is None and local is not None:
            folder = folder_settings(local)
            if "max_sequence_length" in folder:
                options = {**options, "max_sequence_length": folder["max_sequence_length"]}
        absent = {name: None for name in cls.optional_components if not _present(index.get(name))}
        dtype = {"default": resolve_dtype(options.get("dtype", "float32")), "vae": torch.float32}
        pipe = getattr(diffusers, expected).from_pretrained(
            str(local or path), dtype=dtype, revision=revision, variant=variant, **absent
        )
        return cls(pipe, **options)

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer (flow families) or UNet (turbo families)."""
        return getattr(self.pipe, self.denoiser_name)

    def wrap_denoiser(self, module: torch.nn.Module | None) -> None:
        """Run forwards through ``module`` (the denoiser as ``accelerator.prepare`` returned it: a
        DDP/FSDP wrapper) so gradients synchronise across processes; configuration and adapters are
        still read from ``self.denoiser``. ``None`` goes back to the plain module."""
        self._denoiser_call = module

    def attach_reference(self, module: torch.nn.Module) -> None:
        """train_mode 'full': the frozen copy of the base denoiser that ``reference()`` runs (called like
        the denoiser; ``flowalign.grpo.reference.FrozenReference``)."""
        if self.train_mode != "full":
            raise ValueError(f"attach_reference() is for train_mode='full'; with {self.train_mode!r} the reference "
                             "is the base itself (LoRA off)")
        self._reference = module

    def run_denoiser(self, *args, **kwargs):
        """One forward of the denoiser (through its distributed wrapper when there is one)."""
        return (self._denoiser_call or self.denoiser)(*args, **kwargs)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for name in self.text_encoder_names if (m := getattr(self.pipe, name)) is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ text
    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Cond:
        """Embed ``prompts`` (one row each). For CFG families, also the negatives (default "")."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode() takes a list of prompt strings, e.g. policy.encode(['a cat'])")
        prompts = list(prompts)
        if negative_prompts is not None:
            if not self.uses_cfg:
                raise ValueError(f"family '{self.family}' runs without classifier-free guidance; "
                                 "negative_prompts are not used — drop them")
            negative_prompts = list(negative_prompts)
            if len(negative_prompts) != len(prompts):
                raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        elif self.uses_cfg:
            negative_prompts = [""] * len(prompts)
        texts = prompts + (negative_prompts or [])
        embeds, pooled = self._encode_cached(texts)
        n = len(prompts)
        if not self.uses_cfg:
            return Cond(embeds, pooled)
        if pooled is None:
            return Cond(embeds[:n], None, embeds[n:], None)
        return Cond(embeds[:n], pooled[:n], embeds[n:], pooled[n:])

    def clear_cache(self) -> None:
        self._cache.clear()

    def _encode_cached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of ``texts`` (rows in order). Each distinct text is encoded alone, so its embedding
        does not depend on which texts shared its batch or on what the cache held: the same bits with the
        cache on or off, and in a resumed run as in an uninterrupted one."""
        encoded = {}
        for text in dict.fromkeys(texts):
            if text in self._cache:
                self._cache.move_to_end(text)
                encoded[text] = self._cache[text]
            else:
                encoded[text] = self._encode_texts_no_grad([text])
                if self.cache_text_embeddings:
                    self._cache[text] = encoded[text]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        rows = [encoded[text] for text in texts]
        embeds = torch.cat([r[0] for r in rows])
        pooled = None if rows[0][1] is None else torch.cat([r[1] for r in rows])
        return embeds, pooled

    @torch.no_grad()
    def _encode_texts_no_grad(self, texts: list[str]):
        with self._text_encoders_on_device():
            return self._encode_texts(texts)

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        if not self.offload_text_encoders:
            yield
            return
        for enc in self.text_encoders:
            enc.to(self.device)
        try:
            yield
        finally:
            for enc in self.text_encoders:
                enc.to("cpu")

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds [N, L, D], pooled [N, P] or None) for N texts, as the stock pipeline encodes them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1], float32, differentiable.

        Undoes the VAE's latent normalisation the way each stock pipeline does: z/scaling + shift
        (SD3, FLUX; shift 0 for SD), or z·std/scaling + mean when the VAE config has latents_mean/std.
        """
        cfg = self.vae.config
        z = latents.to(self.vae.dtype)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of height × width pixels."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA weights (train_mode 'lora'), all denoiser weights ('full'), nothing ('none')."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[Policy]:
        """The frozen base model, for the KL term: LoRA disabled inside the context, no second copy.

        train_mode 'none' without LoRA: the model is its own reference (no-op). train_mode 'full'
        changes the base weights themselves: its reference is the frozen copy given to
        ``attach_reference`` (the trainer keeps one when the KL is on), run instead of the denoiser
        inside the context; without one this raises.
        """
        if self.train_mode == "full":
            if self._reference is None:
                raise ValueError(
                    "reference() with train_mode='full' needs a frozen copy of the base denoiser: full fine-tuning "
                    "changes the base weights. attach_reference(module) first (GRPOTrainer does with "
                    "train.kl_beta > 0)."
                )
            call, self._denoiser_call = self._denoiser_call, self._reference
            try:
                yield self
            finally:
                self._denoiser_call = call
            return
        if not self._has_lora:
            yield self
            return
        # peft's disable/enable toggles requires_grad of the adapter weights; restore ours exactly.
        flags = [(p, p.requires_grad) for p in self.denoiser.parameters()]
        self.denoiser.disable_adapters()
        try:
            yield self
        finally:
            self.denoiser.enable_adapters()
            for p, flag in flags:
                p.requires_grad_(flag)

    def save_adapter(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """LoRA: diffusers LoRA format (``pipe.load_lora_weights(directory)`` on the stock pipeline
        loads it, rank and alpha included). Full fine-tuning: the denoiser as a diffusers model folder
        (``<ModelClass>.from_pretrained(directory)``). ``state_dict``: the trained weights by parameter
        name, full tensors, when the module itself holds only shards (FSDP); default the module's own."""
        directory = Path(directory)
        if self.train_mode == "full":
            if state_dict is None:
                self.denoiser.save_pretrained(directory)
                return directory
            from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
            from huggingface_hub import save_torch_state_dict
            from torch.distributed.tensor import DTensor

            # the buffers (e.g. SD3's positional embedding) are whole on every process; the weights were gathered
            rest = {k: v for k, v in self.denoiser.state_dict().items() if k not in state_dict}
            assert not any(isinstance(v, DTensor) for v in rest.values()), "state_dict lacks sharded weights"
            state_dict = {**{k: v.detach().cpu() for k, v in rest.items()}, **state_dict}
            self.denoiser.save_config(directory)
            pattern = SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
            save_torch_state_dict(state_dict, directory, filename_pattern=pattern, max_shard_size="10GB")
            return directory
        if not self._has_lora:
            raise ValueError("save_adapter(): nothing to save, this policy has train_mode='none' and no LoRA")
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser, state_dict=state_dict, adapter_name="default")
        # peft keeps target_modules as a set: sorted, the saved metadata does not depend on the hash seed
        metadata = {k: sorted(v) if isinstance(v, set) else v
                    for k, v in self.denoiser.peft_config["default"].to_dict().items()}
        type(self.pipe).save_lora_weights(
            directory,
            **{f"{self.denoiser_name}_lora_layers": state, f"{self.denoiser_name}_lora_adapter_metadata": metadata},
        )
        return directory

    def _add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        from peft import LoraConfig

        # Gaussian A, zero B (Flow-GRPO's init): the adapted model starts equal to the base.
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
        try:
            self.denoiser.add_adapter(config)
        except ValueError as err:
            raise UserError(
                f"model.lora_targets {targets} match no module of the {self.family} {self.denoiser_name} ({err}); "
                f"for this family use e.g. {list(self.default_lora_targets)}"
            ) from err
        self._has_lora = True

    def _load_lora(self, path: str | Path, trainable: bool) -> None:
        if not Path(path).expanduser().exists():
            raise UserError(
                f"model.lora_init_path {str(path)!r} does not exist; give a folder written by save_adapter()"
            )
        check_safetensors(Path(path).expanduser(), "model.lora_init_path")
        # Our adapters hold the denoiser's LoRA only; diffusers warns once per text encoder that it found
        # none for it. That notice is dropped; a denoiser without LoRA keys still warns (peft's logger).
        notices = logging.getLogger("diffusers.loaders.lora_base")
        quiet = _DropTextEncoderLoraNotice()
        notices.addFilter(quiet)
        try:
            self.pipe.load_lora_weights(str(Path(path).expanduser()), adapter_name="default")
        finally:
            notices.removeFilter(quiet)
        for name, p in self.denoiser.named_parameters():
            if "lora_" in name:
                p.requires_grad_(trainable)
        self._has_lora = True


class _DropTextEncoderLoraNotice(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to <text encoder>" notice (see ``_load_lora``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def _per_sample_sigma(sigma, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or [B] sigma as a float32 [B] tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    assert sigma.shape == (batch,), f"sigma must be a scalar or [B]={batch}, got {tuple(sigma.shape)}"
    return sigma


# FlowMatchEulerDiscreteScheduler options whose schedules flowalign.sampling.schedules does not
# reproduce; a pipeline that sets them is refused rather than sampled with different sigmas.
_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "stochastic_sampling",
)


def check_flow_scheduler(config) -> None:
    """Raise ValueError if the pipeline's scheduler config is not one our schedules reproduce."""
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"flow policies sample with FlowMatchEulerDiscreteScheduler's sigmas; this pipeline's "
                         f"scheduler is {name}")
    used = [k for k in _UNSUPPORTED_SCHEDULER_OPTIONS if config.get(k)]
    if config.get("time_shift_type", "exponential") != "exponential":
        used.append("time_shift_type")
    if used:
        raise ValueError(f"the pipeline's scheduler config sets {used}, which flowalign's sigma schedules do not "
                         "reproduce; use a scheduler config without them")


class FlowPolicy(Policy):
    """A flow-matching model (SD3/SD3.5, FLUX.1): velocity prediction on unpacked latents."""

    def __init__(self, pipe, **options):
        name = type(pipe.scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"flow policies sample with FlowMatchEulerDiscreteScheduler's sigmas; this pipeline's "
                             f"scheduler is {name}")
        check_flow_scheduler(pipe.scheduler.config)
        super().__init__(pipe, **options)

    def velocity(self, x_BCHW: torch.Tensor, sigma_B, cond: Cond, guidance_scale: float) -> torch.Tensor:
        """v ≈ ε − x0 at noise level σ (scalar or [B]) → float32 [B, C, H, W]."""
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int, width: int, shift: float | None = None) -> torch.Tensor:
        """The N+1 sigmas (last 0) the stock pipeline samples with for this image size, from the
        pipeline's scheduler config (shift, dynamic shifting and its sequence-length range).

        ``shift`` overrides the scheduler: a static shift σ' = s·σ/(1+(s−1)·σ), no dynamic shifting.
        """
        raise NotImplementedError

    def generate(
        self,
        noise_BCHW: torch.Tensor,
        cond: Cond,
        *,
        num_steps: int,
        guidance_scale: float,
        shift: float | None = None,
        checkpoint: bool = True,
    ) -> torch.Tensor:
        """Differentiable ODE sampling from ``noise`` (σ = 1) to images in [0, 1] (ReNO's generator).

        Euler steps on the pipeline's sigma schedule, ``num_steps`` of them (1–4 for FLUX.1-schnell
        or SD3.5-Large-Turbo; any count for other flow models); ``shift`` as in ``sigmas``. With
        ``checkpoint`` and grad enabled, each step's forward is recomputed in the backward pass
        (activations of one step are held, not of all of them).
        """
        vsf = self.vae_scale_factor
        height, width = noise_BCHW.shape[-2] * vsf, noise_BCHW.shape[-1] * vsf
        sigmas = self.sigmas(num_steps, height, width, shift).to(noise_BCHW.device)
        x = noise_BCHW
        for i in range(num_steps):
            if checkpoint and torch.is_grad_enabled():
                v = torch.utils.checkpoint.checkpoint(
                    self.velocity, x, sigmas[i], cond, guidance_scale, use_reentrant=False
                )
            else:
                v = self.velocity(x, sigmas[i], cond, guidance_scale)
            x = ode_step(x, v, sigmas[i], sigmas[i + 1]).x_next
        return self.decode(x)
