"""``flowalign pocket build``: train the pocket models from scratch, deterministically for a seed.

Stages, each cached in its own folder ``<cache>/<stage>-<key>`` where ``key`` hashes every setting the
stage depends on (its own fields and its inputs' keys), so builds that share a stage share its folder
(the oracle and the base share the data and the VAE) and a changed setting never reuses a stale one.
Every stage is resumable *within* itself: the data stage renders in chunks, the training stages write
a checkpoint (weights, optimizer, EMA, random states) every ``checkpoint_every`` steps, and a build
stopped at any point (``max_seconds``, ``stop_after_steps``, or killed) ends, when run again, with
the same weights as an uninterrupted one.

1. ``data``  – scenes of every category (specs drawn from the grammar, rendered at 32×32, uint8).
2. ``vae``   – an ``AutoencoderKL`` 32×32×3 → 8×8×4, reconstruction + a small KL; then the latent
               shift/scale are measured so latents are ~N(0, 1), as SD3's VAE config does.
3. ``clip``  – a ``CLIPModel`` trained contrastively on the *training captions*, each image against the
               batch's captions and, where its caption is a sentence of the grammar, the caption's hard
               negatives (swapped color, changed count, flipped relation, ...). The proxy reward.
4. ``t2i``   – an ``SD3Transformer2DModel`` trained with the rectified-flow loss on cached latents and the
               training captions, 10% caption dropout for classifier-free guidance, cosine LR, EMA of
               the weights. Text conditioning (``t2i_text``): ``joint`` trains a text tower (the SD3
               CLIP slots' ``CLIPTextModelWithProjection``) together with the transformer, so relations,
               counts and color bindings reach it; ``frozen_clip`` (the first world) uses the pocket
               CLIP's text tower, frozen. Saved as a ``StableDiffusion3Pipeline`` folder (no T5).
   ``misalign`` – only with noisy captions and ``misalign_steps > 0``: the base's T2I model is then a capable
               model misaligned by recent training on alt-text. The ``t2i`` stage trains the *oracle's*
               model (the same recipe on clean captions: the very stage ``--captions clean`` builds, so
               either build reuses the other's), and this stage fine-tunes a copy of it ``misalign_steps``
               steps on the noisy captions with the T2I stage's step (loss, category weights, CFG
               dropout, clipped AdamW) at the constant ``misalign_lr``, transformer and text tower both,
               no EMA (the final weights are the model). Its folder is the build's ``t2i/``.
5. calibration – gold accuracy per category on the held-out test prompts at the default sampler, the
               pocket CLIP's zero-shot pick among hard negatives, and optionally a steps × CFG sweep.

**Caption regimes** (``captions``): ``clean`` captions every image exactly (the *oracle*: it shows what
the architecture can learn); ``noisy`` corrupts them as alt-text is (the *base*, shipped: see
:mod:`flowalign.pocket.captions` for the rates in ``noise``). Presets: ``base``, ``oracle`` (the
base's recipe with clean captions) and ``legacy`` (the first pocket world: exact captions, frozen CLIP
text conditioning; kept as the negative control in the README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ema import EMA
from ..io import atomic_dir
from ..models.base import DEFAULT_MAX_SEQUENCE_LENGTH, SETTINGS_FILE
from ..models.sd3 import use_collapsed_null_tokens
from ..seeding import seed_everything
from . import models as pm
from .captions import CaptionNoise, captions_for

# The null T5 tokens after the prompt (the pipeline has no T5, so they are zeros). The first world was
# trained with StableDiffusion3Pipeline's default 256 — collapsed into one token of weight 256, they
# hold ~75% of every image query's softmax mass at initialisation and the model never learned to read
# relations from the prompt tokens (the oracle at 6 000 steps: relation right 43, flipped 53 of 116;
# with one null token a 1 500-step probe gets 113 right, 2 flipped: benchmarks/pocket_relation_probe.py).
# A folder trained with other than 256 says so in its flowalign.json (``max_sequence_length``).
LEGACY_NULL_T5_TOKENS = DEFAULT_MAX_SEQUENCE_LENGTH
CAPTION_REGIMES = ("clean", "noisy")
TEXT_CONDITIONING = ("joint", "frozen_clip")
PRESETS = ("base", "oracle", "legacy")


# The shipped base's misalign stage (steps, lr), chosen by the gates on the built models (README, "Building the
# pocket world"). On the 12 000-step oracle (0.930 strict at CFG 2): 300 steps at 5e-4 → 0.552 at its best
# sampler (gates 1, 2, 3, 6 hold); 300 at 3e-4 leave 0.638 (gate 2 fails). On the 6 000-step oracle (0.846,
# gate 1 fails: the world shipped before): 300 at 3e-4 → 0.560, 600 at 3e-4 → 0.622, 300 at 1e-3 → 0.357.
BASE_MISALIGN = (300, 5e-4)

# The shipped base's caption noise: mostly incomplete captions, a minority of wrong ones. An exact
# mention only slightly outnumbers a wrong one for relations, counts and color bindings, so the base
# can draw every scene but often doesn't, and guidance cannot sharpen its way to the answer.
# Chosen with benchmarks/pocket_caption_ideal.py: a perfectly fit model on these captions scores 0.63
# held-out strict without guidance and only 0.70 at CFG 4.5 (counting, colors, position, color_attr
# 0.31–0.66), while the right outcome stays each prompt's most likely one.
BASE_NOISE = CaptionNoise(drop_count=0.55, wrong_count=0.23, drop_relation=0.6, wrong_relation=0.19,
                          drop_color=0.55, wrong_color=0.21, swap_colors=0.47)


def sweep_key(steps: int, guidance: float) -> str:
    """The calibration sweep's name for a sampler setting (``calibration.json``: ``steps20_cfg3.0``)."""
    return f"steps{steps}_cfg{float(guidance)}"


@dataclass
class BuildConfig:
    seed: int = 0
    captions: str = "noisy"  # "clean" (oracle) or "noisy" (alt-text-like, the shipped base)
    noise: CaptionNoise = field(default_factory=lambda: BASE_NOISE)  # used when captions == "noisy"
    dataset_size: int = 60_000
    vae_channels: tuple[int, ...] = (32, 64, 128)
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_negatives: int = 3
    t2i_text: str = "joint"  # "joint" (text tower trained with the transformer) or "frozen_clip"
    t2i_steps: int = 12_000  # 6 000 left the oracle at 0.846 (counting 0.70, position 0.78): gate 1 fails
    t2i_batch: int = 64
    t2i_lr: float = 1e-3
    t2i_layers: int = 6
    t2i_null_tokens: int = 1  # null T5 tokens after the prompt (the stock pipeline's max_sequence_length)
    # how often the T2I training draws an image of each category (grammar.CATEGORIES order: single_object,
    # two_object, counting, colors, position, color_attr; all equal = uniform over images). Binding is
    # learned by exposure: a position-only probe draws relations right after 1 500 steps (96 000 position
    # images) while the full uniform mix at 2 250 steps (24 000) does not yet, so bindings get more.
    t2i_category_weights: tuple[float, ...] = (0.5, 1.0, 1.5, 0.5, 3.0, 2.0)
    # with noisy captions: the base's T2I model = the oracle's (clean captions) fine-tuned this many steps on
    # the noisy ones (a capable model misaligned by recent training on alt-text: a base trained from scratch
    # on them is too far from aligned for any method to show in budget). 0: trained from scratch on them.
    misalign_steps: int = 0
    misalign_lr: float = 1e-4  # the misalign fine-tuning's constant learning rate (AdamW, no schedule)
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    checkpoint_every: int = 250  # training steps between resumable checkpoints
    save_dtype: str = "float16"  # storage dtype of the exported weights (the package ships ≤ 30 MiB)
    eval_per_category: int = 64

    def __post_init__(self):
        if isinstance(self.noise, dict):
            self.noise = CaptionNoise(**self.noise)
        self.vae_channels = tuple(self.vae_channels)
        if self.captions not in CAPTION_REGIMES:
            raise ValueError(f"unknown caption regime {self.captions!r}; use one of {', '.join(CAPTION_REGIMES)}")
        if self.t2i_text not in TEXT_CONDITIONING:
            raise ValueError(f"unknown t2i_text {self.t2i_text!r}; use one of {', '.join(TEXT_CONDITIONING)}")
        self.t2i_category_weights = tuple(float(w) for w in self.t2i_category_weights)
        if (len(self.t2i_category_weights) != 6 or min(self.t2i_category_weights) < 0
                or not 0 < sum(self.t2i_category_weights) < math.inf):
            raise ValueError("t2i_category_weights takes 6 non-negative finite numbers, one per category "
                             f"(single_object, two_object, counting, colors, position, color_attr), got "
                             f"{self.t2i_category_weights}")
        if not isinstance(self.t2i_null_tokens, int) or self.t2i_null_tokens < 1:
            raise ValueError(f"t2i_null_tokens must be an integer >= 1, got {self.t2i_null_tokens!r}")
        if self.save_dtype not in ("float16", "float32"):
            raise ValueError(f"save_dtype must be 'float16' or 'float32', got {self.save_dtype!r}")
        if isinstance(self.misalign_steps, bool) or not isinstance(self.misalign_steps, int) or self.misalign_steps < 0:
            raise ValueError(f"misalign_steps must be an integer >= 0, got {self.misalign_steps!r} (0: the base's "
                             "T2I model is trained from scratch on its captions)")
        if (isinstance(self.misalign_lr, bool) or not isinstance(self.misalign_lr, (int, float))
                or not 0 < self.misalign_lr < math.inf):
            raise ValueError(f"misalign_lr must be a finite number > 0, got {self.misalign_lr!r}")
        self.misalign_lr = float(self.misalign_lr)
        if self.misaligned and self.t2i_text != "joint":
            raise ValueError("misalign_steps > 0 fine-tunes a jointly trained text tower; it needs t2i_text='joint', "
                             f"got {self.t2i_text!r} (or set misalign_steps=0)")

    @property
    def caption_noise(self) -> CaptionNoise:
        return self.noise if self.captions == "noisy" else CaptionNoise()

    @property
    def misaligned(self) -> bool:
        """Whether the T2I model is the oracle's fine-tuned on the noisy captions (the ``misalign`` stage)."""
        return self.captions == "noisy" and self.misalign_steps > 0

    def oracle(self) -> BuildConfig:
        """The same recipe with clean captions (the model the ``misalign`` stage starts from)."""
        return dataclasses.replace(self, captions="clean")

    @classmethod
    def preset(cls, name: str, quick: bool = False) -> BuildConfig:
        """``base`` (shipped: the oracle's T2I model misaligned by ``BASE_MISALIGN`` on the noisy captions),
        ``oracle`` (clean captions), ``legacy`` (the first world); ``quick`` shrinks any of them to a
        minutes-long smoke build (the models will be poor; a quick base trains its T2I model from scratch on
        the noisy captions, ``--set misalign_steps=8`` gives it the misalign stage)."""
        if name not in PRESETS:
            raise ValueError(f"unknown pocket build preset {name!r}; use one of {', '.join(PRESETS)}")
        cfg = cls()
        if name == "oracle":
            cfg.captions = "clean"
        if name == "base":  # the shipped base: the oracle misaligned by recent training on the noisy captions
            cfg.misalign_steps, cfg.misalign_lr = BASE_MISALIGN
        if name == "legacy":
            cfg = cls(captions="clean", vae_channels=(16, 32, 64), vae_steps=1200, vae_batch=48,
                      t2i_text="frozen_clip", t2i_steps=4500, t2i_layers=5, t2i_null_tokens=LEGACY_NULL_T5_TOKENS,
                      t2i_category_weights=(1.0,) * 6, save_dtype="float32")
        if quick:
            cfg = dataclasses.replace(cfg, dataset_size=512, vae_channels=(8, 16, 32), vae_steps=20, vae_batch=16,
                                      clip_steps=20, clip_batch=16,
                                      t2i_steps=20, t2i_batch=16, t2i_layers=2, eval_per_category=2,
                                      checkpoint_every=5, misalign_steps=0)
        return cfg

    @classmethod
    def quick(cls) -> BuildConfig:
        """The base recipe as a minutes-long smoke build."""
        return cls.preset("base", quick=True)

    def with_overrides(self, pairs: list[str]) -> BuildConfig:
        """``["t2i_steps=100", "noise.drop_count=0.5", ...]`` applied to a copy; unknown keys and
        unparsable values fail with the list of valid keys."""
        top = {f.name: f for f in dataclasses.fields(self)}
        changes, noise = {}, {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep:
                raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
            if key.startswith("noise."):
                name = key[len("noise."):]
                if name not in {f.name for f in dataclasses.fields(CaptionNoise)}:
                    raise ValueError(f"unknown caption noise key {key!r}; keys: "
                                     + ", ".join("noise." + f.name for f in dataclasses.fields(CaptionNoise)))
                noise[name] = _parse_value(raw, float, key)
            elif key in top and key != "noise":
                current = getattr(self, key)
                kind = type(current[0]) if isinstance(current, tuple) else type(current)
                if isinstance(current, tuple):
                    changes[key] = tuple(_parse_value(v, kind, key) for v in raw.split(","))
                else:
                    changes[key] = _parse_value(raw, kind, key)
            else:
                raise ValueError(f"unknown build key {key!r}; keys: {', '.join(k for k in top if k != 'noise')}, "
                                 "noise.<rate>")
        if noise:
            changes["noise"] = dataclasses.replace(self.noise, **noise)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(raw: str, kind: type, key: str):
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"build key {key!r} needs a {kind.__name__}, got {raw!r}") from None


class BuildStopped(Exception):
    """The build used up this run's budget; its state is saved and the same command resumes it."""


class _Budget:
    """Stops a build after ``max_seconds`` of wall time or ``stop_after_steps`` training steps (this run)."""

    def __init__(self, max_seconds: float | None = None, stop_after_steps: int | None = None):
        self.deadline = None if max_seconds is None else time.time() + max_seconds
        self.steps_left = stop_after_steps

    def exhausted(self) -> bool:
        if self.steps_left is not None:
            if self.steps_left <= 0:
                return True
            self.steps_left -= 1
        return self.deadline is not None and time.time() >= self.deadline


def _log(msg: str) -> None:
    print(f"[pocket build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device() -> torch.device:
    """Train on the GPU when there is one; random numbers are always drawn on the CPU, so a seed gives
    the same data, noise and timesteps everywhere."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer_step(opt, params, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at learning rate ``lr`` with the gradient norm clipped to 1 (every stage's update)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# ---------------------------------------------------------------------------------------------
# the stage cache


class Stage:
    """One stage's cache folder, ``<root>/<name>-<key>``: ``stage.json`` (the settings it was made with),
    ``checkpoint.pt`` while it trains, and ``out/`` once it is done."""

    def __init__(self, root: Path, name: str, settings: dict):
        self.name, self.settings = name, settings
        self.key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = root / f"{name}-{self.key}"
        record = self.dir / "stage.json"
        if record.exists():
            stored = json.loads(record.read_text())
            if stored != settings:
                diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
                raise ValueError(f"the cache folder {self.dir} was made with other settings (differs in "
                                 f"{', '.join(diff)}); delete it or pass another --work folder")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name("stage.json.tmp")
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
            os.replace(tmp, record)

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def done(self) -> bool:
        return self.out.exists()

    def finish(self, write) -> Path:
        """``write(tmp_folder)`` then rename it to ``out/`` (a killed write leaves no ``out/``)."""
        with atomic_dir(self.out) as tmp:
            write(tmp)
        (self.dir / "checkpoint.pt").unlink(missing_ok=True)
        return self.out


class _Trainer:
    """The resumable part of a training stage: modules, optimizer, EMA and random generators saved
    together every ``every`` steps (and when the budget runs out) and restored on the next run."""

    def __init__(self, stage: Stage, modules: dict, opt, torch_gens: dict, np_gens: dict, ema: EMA | None,
                 every: int, budget: _Budget):
        self.stage, self.modules, self.opt, self.ema = stage, modules, opt, ema
        self.torch_gens, self.np_gens, self.every, self.budget = torch_gens, np_gens, every, budget
        self.path = stage.dir / "checkpoint.pt"

    def start(self) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True, map_location="cpu")
        for name, m in self.modules.items():
            m.load_state_dict(state["modules"][name])
        self.opt.load_state_dict(state["opt"])
        if self.ema is not None:
            self.ema.load(state["ema"])
        for name, g in self.torch_gens.items():
            g.set_state(state["torch_gens"][name])
        for name, g in self.np_gens.items():
            g.bit_generator.state = json.loads(state["np_gens"][name])
        _log(f"{self.stage.name}: resuming at step {state['step']}")
        return int(state["step"])

    def save(self, step: int) -> None:
        state = {
            "step": step,
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            "opt": self.opt.state_dict(),
            "ema": [e.detach().cpu() for e in self.ema.shadow] if self.ema is not None else [],
            "torch_gens": {n: g.get_state() for n, g in self.torch_gens.items()},
            "np_gens": {n: json.dumps(g.bit_generator.state) for n, g in self.np_gens.items()},
        }
        tmp = self.path.with_name("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def before_step(self, step: int, start: int) -> None:
        """Checkpoint on schedule; stop (after saving) when the budget is spent."""
        if self.budget.exhausted():
            self.save(step)
            raise BuildStopped(f"stopped in stage {self.stage.name} at step {step}")
        if step > start and step % self.every == 0:
            self.save(step)


# ---------------------------------------------------------------------------------------------
# 1. data


def make_dataset(stage: Stage, cfg: BuildConfig, budget: _Budget) -> dict:
    """Specs drawn uniformly per category (all combinations, held-out ones included: pretraining sees
    everything, as a web-scale model would) and rendered in chunks of 2000, each chunk kept on disk."""
    from .grammar import CATEGORIES, spec_to_prompt
    from .prompts import sample_specs
    from .render import render_batch

    if not stage.done:
        rng = np.random.default_rng(cfg.seed)
        prompts = [spec_to_prompt(s) for s in sample_specs(cfg.dataset_size, rng, CATEGORIES, split="all")]
        chunks = []
        for k, i in enumerate(range(0, len(prompts), 2000)):
            path = stage.dir / f"chunk_{k:04d}.npy"
            if not path.exists():
                if budget.exhausted():
                    raise BuildStopped(f"stopped in stage data at chunk {k}")
                imgs, _ = render_batch(prompts[i:i + 2000], seed=cfg.seed + 1 + k)
                tmp = path.with_name(path.name + ".tmp.npy")
                np.save(tmp, (imgs * 255 + 0.5).astype(np.uint8))
                os.replace(tmp, path)
            chunks.append(np.load(path))

        def write(tmp: Path) -> None:
            np.savez(tmp / "data.npz", images=np.concatenate(chunks), prompts=np.array(prompts))

        stage.finish(write)
        for path in stage.dir.glob("chunk_*.npy"):
            path.unlink()
    d = np.load(stage.out / "data.npz", allow_pickle=False)
    return {"images": d["images"], "prompts": [str(p) for p in d["prompts"]]}


def training_captions(data: dict, cfg: BuildConfig) -> tuple[list[str], dict[str, float]]:
    """The caption each training image is shown with (exact, or corrupted per ``cfg.noise``), and the
    fractions of exact, incomplete and wrong captions."""
    from .grammar import parse_prompt

    return captions_for([parse_prompt(p) for p in data["prompts"]], cfg.caption_noise, seed=cfg.seed + 5)


def _to_unit(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).float() / 255.0


# ---------------------------------------------------------------------------------------------
# 2. vae


def train_vae(stage: Stage, data: dict, cfg: BuildConfig, budget: _Budget):
    from diffusers import AutoencoderKL

    if stage.done:
        return AutoencoderKL.from_pretrained(stage.out)
    g = seed_everything(cfg.seed + 10)
    dev = _device()
    vae = pm.vae_model(cfg.vae_channels).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    run = _Trainer(stage, {"vae": vae}, opt, {"g": g}, {}, None, cfg.checkpoint_every, budget)
    images = data["images"]
    t0 = time.time()
    start = run.start()
    for step in range(start, cfg.vae_steps):
        run.before_step(step, start)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = (_to_unit(images[idx.numpy()]) * 2 - 1).to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean() + cfg.vae_kl * post.kl().mean() / z[0].numel()
        _optimizer_step(opt, vae.parameters(), loss, cfg.vae_lr * _cosine(step, cfg.vae_steps))
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        sample = (_to_unit(images[: min(4096, len(images))]) * 2 - 1).to(dev)
        z = torch.cat([vae.encode(sample[i:i + 256]).latent_dist.mean for i in range(0, len(sample), 256)])
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.to("cpu")
    stage.finish(vae.save_pretrained)
    _log(f"vae done: shift {shift:.4f} scale {scale:.4f}")
    return vae


# ---------------------------------------------------------------------------------------------
# 3. clip


def _tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _negatives(caption: str) -> list[str]:
    """Hard negatives of a caption that is a sentence of the grammar; none for the others (bare plurals)."""
    try:
        return pm.hard_negatives(caption, np.random.default_rng(0))
    except ValueError:
        return []


def train_clip(stage: Stage, data: dict, captions: list[str], cfg: BuildConfig, budget: _Budget):
    from transformers import CLIPModel

    tokenizer = pm.build_tokenizer()
    if stage.done:
        return CLIPModel.from_pretrained(stage.out), tokenizer
    g = seed_everything(cfg.seed + 20)
    rng = np.random.default_rng(cfg.seed + 20)
    dev = _device()
    model = CLIPModel(pm.clip_config(tokenizer)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    run = _Trainer(stage, {"clip": model}, opt, {"g": g}, {"rng": rng}, None, cfg.checkpoint_every, budget)
    images = data["images"]
    negatives_cache: dict[str, list[str]] = {}
    t0 = time.time()
    start = run.start()
    for step in range(start, cfg.clip_steps):
        run.before_step(step, start)
        idx = torch.randint(len(images), (cfg.clip_batch,), generator=g).numpy()
        caps = [captions[i] for i in idx]
        negs = []
        for c in caps:
            if c not in negatives_cache:
                negatives_cache[c] = _negatives(c)
            pool = negatives_cache[c]
            pick = rng.choice(len(pool), size=min(cfg.clip_negatives, len(pool)), replace=False)
            negs += [pool[j] for j in pick] + [c] * (cfg.clip_negatives - len(pick))  # pad (masked below)
        pixel = ((_to_unit(images[idx]) - 0.5) / 0.5).to(dev)
        ids = _tokens(tokenizer, caps + negs).to(dev)
        out = model(input_ids=ids, pixel_values=pixel)
        logits = out.logits_per_image  # [B, B + B*H]
        B = len(caps)
        texts = caps + negs
        # a caption equal to the image's own (a duplicate prompt in the batch, or padding) is no negative;
        # another image's hard negatives are ordinary negatives for this image
        same = torch.tensor([[texts[j] == caps[i] and j != i for j in range(len(texts))] for i in range(B)])
        li = logits.masked_fill(same.to(dev), float("-inf"))
        loss_i = F.cross_entropy(li, torch.arange(B, device=dev))
        lt = logits[:, :B].t()  # text → image, positives only; same[:, :B] masks duplicate captions
        loss_t = F.cross_entropy(lt.masked_fill(same[:, :B].t().to(dev), float("-inf")), torch.arange(B, device=dev))
        loss = 0.5 * (loss_i + loss_t)
        _optimizer_step(opt, model.parameters(), loss, cfg.clip_lr * _cosine(step, cfg.clip_steps))
        if step % 200 == 0 or step == cfg.clip_steps - 1:
            _log(f"clip step {step}/{cfg.clip_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.to("cpu").eval()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pm.image_processor().save_pretrained(tmp)

    stage.finish(write)
    return model, tokenizer


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5 returns an output whose pooler_output is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_zero_shot(model, tokenizer, n: int = 512, seed: int = 123) -> dict[str, float]:
    """Fraction of rendered scenes whose own caption outscores all its hard negatives, per category."""
    from .grammar import CATEGORIES, spec_to_prompt
    from .prompts import sample_specs
    from .render import render_batch

    rng = np.random.default_rng(seed)
    specs = sample_specs(n, rng, CATEGORIES, split="test")
    prompts = [spec_to_prompt(s) for s in specs]
    images, _ = render_batch(prompts, seed=seed)
    pixel = (torch.from_numpy(images) - 0.5) / 0.5
    img = F.normalize(_features(model.get_image_features(pixel_values=pixel)), dim=-1)
    hits: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for i, (p, s) in enumerate(zip(prompts, specs)):
        caps = [p] + pm.hard_negatives(p, np.random.default_rng(i))
        txt = F.normalize(_features(model.get_text_features(input_ids=_tokens(tokenizer, caps))), dim=-1)
        hits[s.category].append(float((txt @ img[i]).argmax() == 0))
    out = {c: float(np.mean(v)) for c, v in hits.items() if v}
    out["overall"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


# ---------------------------------------------------------------------------------------------
# 4. t2i


def encode_text(text_encoder, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's prompt embedding with one text tower in both CLIP slots: penultimate hidden states
    concatenated on features, one collapsed null T5 token appended; pooled = both projections."""
    out = text_encoder(input_ids, output_hidden_states=True)
    h = out.hidden_states[-2]
    emb = torch.cat([h, h], -1)
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1, emb.shape[-1])], 1)
    return emb, torch.cat([out.text_embeds, out.text_embeds], -1)


class PocketTextEncoder:
    """:func:`encode_text` on prompts, without gradients (what ``SD3Policy.encode`` computes)."""

    def __init__(self, text_encoder, tokenizer):
        self.enc, self.tok = text_encoder, tokenizer

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_text(self.enc, _tokens(self.tok, prompts))


def _text_encoder_from_clip(clip_model):
    from transformers import CLIPTextModelWithProjection

    te = CLIPTextModelWithProjection(clip_model.config.text_config)
    missing, unexpected = te.load_state_dict(
        {k: v for k, v in clip_model.state_dict().items() if k.startswith(("text_model.", "text_projection."))},
        strict=False,
    )
    assert not missing and not unexpected, (missing, unexpected)
    return te.eval()


def dataset_latents(vae_stage: Stage, vae, images: np.ndarray) -> torch.Tensor:
    """The training images' scaled latents (posterior means), computed once per VAE stage and kept in
    its folder (a T2I stage that resumes, and every T2I stage on that VAE, reads them back)."""
    path = vae_stage.dir / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    vae.eval()
    with torch.no_grad():
        lat = []
        for i in range(0, len(images), 512):
            x = _to_unit(images[i:i + 512]) * 2 - 1
            lat.append((vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor)
    latents = torch.cat(lat)
    tmp = path.with_name("latents.pt.tmp")
    torch.save(latents, tmp)
    os.replace(tmp, path)
    return latents


@dataclass
class _CaptionedLatents:
    """A T2I training set on the training device: each image's latent and caption index, the distinct
    captions tokenized (the empty one, for CFG dropout, at ``empty``) and the images' draw weights."""
    latents: torch.Tensor  # [N, 4, 8, 8] scaled VAE latents
    ids: torch.Tensor  # [P, L] token ids of the distinct captions
    prompt_idx: torch.Tensor  # [N] (CPU) each image's caption, an index into ids
    empty: int
    weights: torch.Tensor | None  # [N] (CPU) draw weight of each image; None: uniform
    frozen: tuple[torch.Tensor, torch.Tensor] | None  # ([P, L+1, D], [P, 2E]) a frozen tower's embeddings


def _captioned_latents(name: str, vae_stage: Stage, vae, data: dict, captions: list[str], tokenizer,
                       cfg: BuildConfig, dev: torch.device, frozen_te=None) -> _CaptionedLatents:
    """Stage ``name``'s training set of ``captions``; with ``frozen_te`` (on ``dev``) their embeddings are
    computed once."""
    distinct = sorted(set(captions)) + [""]
    pos = {p: i for i, p in enumerate(distinct)}
    ids = _tokens(tokenizer, distinct)
    latents = dataset_latents(vae_stage, vae, data["images"])
    _log(f"{name}: {len(latents)} latents {tuple(latents.shape[1:])}, {len(distinct)} distinct captions "
         f"({'frozen CLIP text tower' if frozen_te is not None else 'text tower trained'})")
    frozen = None
    if frozen_te is not None:
        with torch.no_grad():
            parts = [encode_text(frozen_te, ids[i:i + 256].to(dev)) for i in range(0, len(ids), 256)]
        frozen = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _CaptionedLatents(latents.to(dev), ids.to(dev), torch.tensor([pos[p] for p in captions]), pos[""],
                             _image_weights(data["prompts"], cfg.t2i_category_weights), frozen)


def _t2i_step(d: _CaptionedLatents, transformer, te, opt, params, g: torch.Generator, cfg: BuildConfig,
              lr: float) -> torch.Tensor:
    """One rectified-flow training step (the T2I and misalign stages'): ``t2i_batch`` images drawn by their
    category weights, each caption dropped to "" with probability ``cfg_dropout`` (for CFG), t ~
    logit-normal(0, 1) as SD3, x_t = (1−t)·x0 + t·ε, then a clipped AdamW step at ``lr``. Returns the loss.

    The random numbers come from ``g`` (CPU) in this order: batch, dropout, t, ε; a checkpoint resumes
    bit-exactly only while the order stays."""
    dev = d.latents.device
    if d.weights is None:
        idx = torch.randint(len(d.latents), (cfg.t2i_batch,), generator=g)
    else:
        idx = torch.multinomial(d.weights, cfg.t2i_batch, replacement=True, generator=g)
    x0 = d.latents[idx.to(dev)]  # [B, 4, 8, 8]
    pid = d.prompt_idx[idx].clone()
    pid[torch.rand(len(pid), generator=g) < cfg.cfg_dropout] = d.empty
    pid = pid.to(dev)
    t = torch.sigmoid(torch.randn(len(idx), generator=g)).to(dev)  # logit-normal(0, 1), as SD3
    eps = torch.randn(x0.shape, generator=g).to(dev)
    emb, pool = encode_text(te, d.ids[pid]) if d.frozen is None else (d.frozen[0][pid], d.frozen[1][pid])
    loss = flow_matching_loss(transformer, x0, eps, t, emb, pool)
    _optimizer_step(opt, params, loss, lr)
    return loss


def train_t2i(stage: Stage, vae_stage: Stage, data: dict, captions: list[str], vae, clip_model, tokenizer,
              cfg: BuildConfig, budget: _Budget):
    """The rectified-flow T2I model; ``clip_model`` is used only with ``t2i_text == "frozen_clip"``."""
    if stage.done:
        return load_pipeline(stage.out)
    g = seed_everything(cfg.seed + 30)
    joint = cfg.t2i_text == "joint"
    transformer, te = _t2i_modules(cfg, tokenizer, clip_model)
    dev = _device()
    te, transformer = te.to(dev), transformer.to(dev)
    d = _captioned_latents(stage.name, vae_stage, vae, data, captions, tokenizer, cfg, dev,
                           frozen_te=None if joint else te)
    modules = {"transformer": transformer, **({"text_encoder": te} if joint else {})}
    params = [p for m in modules.values() for p in m.parameters()]
    ema = EMA(params, cfg.ema_decay)
    opt = torch.optim.AdamW(params, lr=cfg.t2i_lr, weight_decay=0.01)
    run = _Trainer(stage, modules, opt, {"g": g}, {}, ema, cfg.checkpoint_every, budget)
    t0 = time.time()
    start = run.start()
    te.train(joint)
    for step in range(start, cfg.t2i_steps):
        run.before_step(step, start)
        loss = _t2i_step(d, transformer, te, opt, params, g, cfg,
                         cfg.t2i_lr * _cosine(step, cfg.t2i_steps, warmup=200))
        ema.decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up: early weights are forgotten fast
        ema.update()
        if step % 200 == 0 or step == cfg.t2i_steps - 1:
            _log(f"t2i step {step}/{cfg.t2i_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    ema.copy_to()
    stage.finish(_saver(_pipeline(transformer, te, vae, tokenizer), cfg))
    return load_pipeline(stage.out)


def misalign_t2i(stage: Stage, oracle_stage: Stage, vae_stage: Stage, data: dict, captions: list[str], vae,
                 tokenizer, cfg: BuildConfig, budget: _Budget):
    """The base's T2I model when ``cfg.misaligned``: the oracle's (``oracle_stage``, finished) fine-tuned
    ``misalign_steps`` steps on the noisy ``captions``, transformer and text tower both, with the T2I stage's
    step (:func:`_t2i_step`) at the constant ``misalign_lr``; no EMA: the final weights are exported."""
    if stage.done:
        return load_pipeline(stage.out)
    assert cfg.misaligned and oracle_stage.done, (cfg.misaligned, oracle_stage.dir)
    g = seed_everything(cfg.seed + 40)
    oracle = load_pipeline(oracle_stage.out)
    transformer, te = oracle.transformer, oracle.text_encoder
    use_collapsed_null_tokens(transformer, cfg.t2i_null_tokens)  # the processor the T2I stage trained with
    dev = _device()
    te, transformer = te.to(dev), transformer.to(dev)
    d = _captioned_latents(stage.name, vae_stage, vae, data, captions, tokenizer, cfg, dev)
    modules = {"transformer": transformer, "text_encoder": te}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.misalign_lr, weight_decay=0.01)
    run = _Trainer(stage, modules, opt, {"g": g}, {}, None, cfg.checkpoint_every, budget)
    t0 = time.time()
    start = run.start()
    transformer.train()
    te.train()
    for step in range(start, cfg.misalign_steps):
        run.before_step(step, start)
        loss = _t2i_step(d, transformer, te, opt, params, g, cfg, cfg.misalign_lr)
        if step % 50 == 0 or step == cfg.misalign_steps - 1:
            _log(f"misalign step {step}/{cfg.misalign_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    stage.finish(_saver(_pipeline(transformer, te, vae, tokenizer), cfg))
    return load_pipeline(stage.out)


def flow_matching_loss(transformer, x0, eps, t, emb, pooled) -> torch.Tensor:
    """The rectified-flow loss the T2I model trains on: the velocity eps − x0 at x_t = (1−t)·x0 + t·eps."""
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    v = transformer(hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t * 1000).sample
    return F.mse_loss(v, eps - x0)


def _image_weights(prompts: list[str], category_weights: tuple[float, ...]) -> torch.Tensor | None:
    """Each training image's draw weight from its (true) scene's category; None when all are equal."""
    from .grammar import CATEGORIES, parse_prompt

    if len(set(category_weights)) == 1:
        return None
    by_category = dict(zip(CATEGORIES, category_weights, strict=True))
    return torch.tensor([by_category[parse_prompt(p).category] for p in prompts], dtype=torch.float64)


def _t2i_modules(cfg: BuildConfig, tokenizer, clip_model):
    """The transformer and the text tower it is conditioned on (fresh, or the CLIP's for ``frozen_clip``);
    the text width of both SD3 CLIP slots sets the transformer's joint-attention and pooled widths."""
    from transformers import CLIPTextModelWithProjection

    if cfg.t2i_text == "joint":
        te = CLIPTextModelWithProjection(pm.clip_config(tokenizer).text_config)
    else:
        te = _text_encoder_from_clip(clip_model)
    transformer = pm.transformer_model(2 * te.config.hidden_size, 2 * te.config.projection_dim, layers=cfg.t2i_layers)
    use_collapsed_null_tokens(transformer, cfg.t2i_null_tokens)
    return transformer, te


def _pipeline(transformer, te, vae, tokenizer):
    """A ``StableDiffusion3Pipeline`` of the pocket parts (the text tower in both CLIP slots, no T5), on CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())  # saved models carry no custom processor
    te = te.to("cpu").eval()
    return StableDiffusion3Pipeline(
        transformer=transformer.to("cpu").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=vae, text_encoder=te, tokenizer=tokenizer, text_encoder_2=te, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def _saver(pipe, cfg: BuildConfig):
    """Writes the pipeline folder, with a ``flowalign.json`` naming its null-token count where that is not
    the stock pipeline's default (``folder_settings``: policies loaded from it use that count)."""
    def write(folder: Path) -> None:
        pipe.save_pretrained(folder)
        for config in Path(folder).glob("*/config.json"):  # a component loaded from the cache names its path there
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if cfg.t2i_null_tokens != DEFAULT_MAX_SEQUENCE_LENGTH:
            note = ("trained with this many null T5 tokens after the prompt; with the stock "
                    "StableDiffusion3Pipeline pass max_sequence_length=<this value> to reproduce it")
            (Path(folder) / SETTINGS_FILE).write_text(
                json.dumps({"max_sequence_length": cfg.t2i_null_tokens, "note": note}, indent=2) + "\n")

    return write


def snapshot_stage(cfg: BuildConfig, work_dir: str | os.PathLike | None = None) -> Stage:
    """The training stage :func:`snapshot` exports: the misalign stage once it has begun (a checkpoint or
    its model), else the T2I stage."""
    st = stages(cfg, Path(work_dir) if work_dir is not None else default_cache())
    m = st.get("misalign")
    if m is not None and (m.done or (m.dir / "checkpoint.pt").exists()):
        return m
    return st["t2i"]


def snapshot(out_dir: str | os.PathLike, cfg: BuildConfig, work_dir: str | os.PathLike | None = None) -> int:
    """Export the T2I model as it stands to ``out_dir/t2i`` without training; returns the step (of
    :func:`snapshot_stage`'s stage) it was taken at. For watching a long build. From the T2I stage: its last
    checkpoint's EMA weights, or the finished model; from the misalign stage (no EMA): its last
    checkpoint's weights, or the finished model."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    st = stages(cfg, Path(work_dir) if work_dir is not None else default_cache())
    stage = snapshot_stage(cfg, work_dir)
    out = Path(out_dir) / "t2i"
    if stage.done:
        _export(stage.out, out, cfg.save_dtype)
        return cfg.misalign_steps if stage.name == "misalign" else cfg.t2i_steps
    ckpt = stage.dir / "checkpoint.pt"
    if not ckpt.exists():
        raise ValueError(f"the T2I stage {stage.dir} has no checkpoint yet; it writes one every "
                         f"{cfg.checkpoint_every} steps once the build reaches it")
    tokenizer = pm.build_tokenizer()
    clip_model = CLIPModel.from_pretrained(st["clip"].out) if cfg.t2i_text == "frozen_clip" else None
    transformer, te = _t2i_modules(cfg, tokenizer, clip_model)
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    if stage.name == "misalign":
        transformer.load_state_dict(state["modules"]["transformer"])
        te.load_state_dict(state["modules"]["text_encoder"])
    else:
        params = list(transformer.parameters()) + (list(te.parameters()) if cfg.t2i_text == "joint" else [])
        with torch.no_grad():
            for p, e in zip(params, state["ema"], strict=True):
                p.copy_(e)
    pipe = _pipeline(transformer, te, AutoencoderKL.from_pretrained(st["vae"].out), tokenizer)
    with atomic_dir(out) as tmp:
        _saver(pipe, cfg)(tmp)
    return int(state["step"])


def load_pipeline(path):
    """The pocket T2I folder through the stock loader; like every SD3 folder without T5, it needs
    ``text_encoder_3=None, tokenizer_3=None`` (diffusers' documented way to drop T5)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)


# ---------------------------------------------------------------------------------------------
# the whole build


def default_cache() -> Path:
    """``$FLOWALIGN_CACHE/pocket-build``, else ``$XDG_CACHE_HOME/flowalign/pocket-build``, else
    ``~/.cache/flowalign/pocket-build``: outside any work tree, so a build spans sessions."""
    if os.environ.get("FLOWALIGN_CACHE"):
        return Path(os.environ["FLOWALIGN_CACHE"]) / "pocket-build"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flowalign" / "pocket-build"


def stages(cfg: BuildConfig, root: Path) -> dict[str, Stage]:
    """The stage folders of a build (data, vae, clip, t2i; and misalign when ``cfg.misaligned``), each keyed
    by its own settings and its inputs' keys. When misaligned, ``t2i`` is the oracle's T2I stage (the key
    ``cfg.oracle()`` gives it) and ``misalign`` holds the build's T2I model (:func:`t2i_model_stage`)."""
    data = Stage(root, "data", {"seed": cfg.seed, "dataset_size": cfg.dataset_size})
    vae = Stage(root, "vae", {"data": data.key, "seed": cfg.seed, "channels": list(cfg.vae_channels),
                              "steps": cfg.vae_steps, "batch": cfg.vae_batch, "lr": cfg.vae_lr, "kl": cfg.vae_kl,
                              "checkpoint_every": cfg.checkpoint_every})
    noise = dataclasses.asdict(cfg.caption_noise)
    clip = Stage(root, "clip", {"data": data.key, "seed": cfg.seed, "noise": noise, "steps": cfg.clip_steps,
                                "batch": cfg.clip_batch, "lr": cfg.clip_lr, "negatives": cfg.clip_negatives,
                                "checkpoint_every": cfg.checkpoint_every})
    # misaligned: the oracle's T2I stage, keyed exactly as the oracle's build keys it (clean captions; the
    # "clip" entry is None in both, a misaligned build's text tower being trained jointly)
    t2i_noise = dataclasses.asdict(cfg.oracle().caption_noise) if cfg.misaligned else noise
    t2i = Stage(root, "t2i", {"data": data.key, "vae": vae.key, "seed": cfg.seed, "noise": t2i_noise,
                              "text": cfg.t2i_text, "clip": clip.key if cfg.t2i_text == "frozen_clip" else None,
                              "steps": cfg.t2i_steps, "batch": cfg.t2i_batch, "lr": cfg.t2i_lr,
                              "layers": cfg.t2i_layers, "null_tokens": cfg.t2i_null_tokens,
                              "category_weights": list(cfg.t2i_category_weights), "ema_decay": cfg.ema_decay,
                              "cfg_dropout": cfg.cfg_dropout,
                              "checkpoint_every": cfg.checkpoint_every})
    out = {"data": data, "vae": vae, "clip": clip, "t2i": t2i}
    if cfg.misaligned:
        out["misalign"] = Stage(root, "misalign", {"t2i": t2i.key, "seed": cfg.seed, "noise": noise,
                                                   "steps": cfg.misalign_steps, "lr": cfg.misalign_lr,
                                                   "batch": cfg.t2i_batch,
                                                   "category_weights": list(cfg.t2i_category_weights),
                                                   "cfg_dropout": cfg.cfg_dropout,
                                                   "checkpoint_every": cfg.checkpoint_every})
    return out


def t2i_model_stage(st: dict[str, Stage]) -> Stage:
    """The stage whose folder is the build's T2I model: ``misalign`` when there is one, else ``t2i``."""
    return st.get("misalign", st["t2i"])


def _export(src: Path, dst: Path, dtype: str) -> None:
    """Copy a stage's model folder to ``dst`` with every ``.safetensors`` tensor stored as ``dtype``."""
    from safetensors.torch import load_file, save_file

    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dtype != "float32":
            for f in tmp.rglob("*.safetensors"):
                tensors = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                           for k, v in load_file(f).items()}
                save_file(tensors, f, metadata={"format": "pt"})


def build(out_dir: str | os.PathLike, cfg: BuildConfig | None = None, work_dir: str | os.PathLike | None = None,
          test_prompts: str | os.PathLike | None = None, *, max_seconds: float | None = None,
          stop_after_steps: int | None = None, sweep: bool = False, threads: int | None = None) -> dict:
    """Train every pocket model (cached under ``work_dir``, default :func:`default_cache`), export
    ``clip/`` and ``t2i/`` (the misalign stage's model when ``cfg.misaligned``, else the T2I stage's) into
    ``out_dir`` and return the calibration (also ``calibration.json``).

    Raises :class:`BuildStopped` when ``max_seconds`` or ``stop_after_steps`` run out first; the same
    call then resumes. ``sweep``: also measure the base over steps × CFG (minutes). ``threads``: torch
    intra-op threads for the build (default: torch's current setting).
    """
    cfg = BuildConfig() if cfg is None else cfg
    out = Path(out_dir)
    root = Path(work_dir) if work_dir is not None else default_cache()
    if (root / "build_config.json").exists():
        raise ValueError(f"{root} holds a build of the older single-folder layout; pass another --work folder "
                         "(or delete it)")
    root.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_seconds, stop_after_steps)
    st = stages(cfg, root)
    if threads is not None:
        torch.set_num_threads(threads)
    timings = {}
    t0 = time.time()
    data = make_dataset(st["data"], cfg, budget)
    timings["data"] = time.time() - t0
    captions, caption_stats = training_captions(data, cfg)
    t = time.time()
    vae = train_vae(st["vae"], data, cfg, budget)
    timings["vae"] = time.time() - t
    tokenizer = pm.build_tokenizer()
    clip_model = None

    def clip_stage():
        nonlocal clip_model
        t = time.time()
        clip_model, _ = train_clip(st["clip"], data, captions, cfg, budget)
        timings["clip"] = time.time() - t

    if cfg.t2i_text == "frozen_clip":
        clip_stage()
    t = time.time()
    if cfg.misaligned:  # first the oracle's T2I model (shared with the oracle's build), on clean captions
        oracle = cfg.oracle()
        train_t2i(st["t2i"], st["vae"], data, training_captions(data, oracle)[0], vae, None, tokenizer, oracle,
                  budget)
    else:
        train_t2i(st["t2i"], st["vae"], data, captions, vae, clip_model, tokenizer, cfg, budget)
    timings["t2i"] = time.time() - t
    if cfg.misaligned:
        t = time.time()
        misalign_t2i(st["misalign"], st["t2i"], st["vae"], data, captions, vae, tokenizer, cfg, budget)
        timings["misalign"] = time.time() - t
    if clip_model is None:  # a jointly trained text tower needs no CLIP: the T2I model is ready first
        clip_stage()
    _export(st["clip"].out, out / "clip", cfg.save_dtype)
    _export(t2i_model_stage(st).out, out / "t2i", cfg.save_dtype)
    report = {
        "config": cfg.to_dict(),
        "stages": {k: s.dir.name for k, s in st.items()},
        "seconds_this_run": {k: round(v, 1) for k, v in timings.items()},
        "captions": caption_stats,
        "clip_zero_shot": clip_zero_shot(clip_model, tokenizer),
    }
    if test_prompts is not None:
        report.update(calibrate(out / "t2i", test_prompts, cfg, sweep=sweep, out_dir=out / "calibration"))
    from ..io import atomic_write_json

    atomic_write_json(out / "calibration.json", report)
    return report


def calibrate(t2i_dir: Path, test_prompts, cfg: BuildConfig, *, sweep: bool, out_dir: Path | None) -> dict:
    """Gold accuracy at the default sampler (and over a steps × CFG grid with ``sweep``)."""
    from .sample import (
        DEFAULT_GUIDANCE,
        DEFAULT_STEPS,
        evaluate_model,
        load_pocket_policy,
    )

    policy = load_pocket_policy(t2i_dir)
    report = {"default_sampler": {"num_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
                                  "gold": evaluate_model(policy, test_prompts, seed=cfg.seed,
                                                         limit_per_category=cfg.eval_per_category,
                                                         out_dir=out_dir)["gold"]}}
    if sweep:
        grid = {}
        for steps in (10, 20, 40):
            for cfg_scale in (1.0, 1.5, 2.0, 3.0, 4.5, 6.0):
                if steps != 20 and cfg_scale not in (1.5, 3.0):
                    continue
                if (steps, cfg_scale) == (DEFAULT_STEPS, DEFAULT_GUIDANCE):  # measured above, same seed and prompts
                    strict = report["default_sampler"]["gold"]["strict"]
                else:
                    strict = evaluate_model(policy, test_prompts, seed=cfg.seed, num_steps=steps,
                                            guidance_scale=cfg_scale,
                                            limit_per_category=cfg.eval_per_category)["gold"]["strict"]
                grid[sweep_key(steps, cfg_scale)] = strict
                _log(f"sweep steps {steps} cfg {cfg_scale}: strict {strict['overall']:.3f}")
        report["sweep_strict"] = grid
    return report
