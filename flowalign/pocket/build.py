"""``flowalign pocket build``: train the pocket models from scratch, deterministically for a seed.

Stages (each resumable: a finished stage leaves its folder and is skipped on the next run):

1. ``data``  – render a dataset of scenes for prompts of every category (uint8, cached as .npz).
2. ``vae``   – an ``AutoencoderKL`` 32×32×3 → 8×8×4, reconstruction + a small KL; then the latent
               shift/scale are measured so latents are ~N(0, 1), as SD3's VAE config does.
3. ``clip``  – a ``CLIPModel`` trained contrastively, each image against the batch's captions *and*
               its own hard negatives (swapped color, changed count, flipped relation, ...).
4. ``t2i``   – an ``SD3Transformer2DModel`` trained with the rectified-flow loss on cached latents,
               conditioned on the frozen pocket-CLIP text tower (both SD3 text-encoder slots), 10%
               caption dropout for classifier-free guidance, cosine LR, EMA of the weights. Saved
               as a ``StableDiffusion3Pipeline`` folder (no T5).
5. calibration – gold accuracy per category on the held-out test prompts (ODE, default steps and
               CFG, fixed seeds) and the pocket CLIP's zero-shot pick among hard negatives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.sd3 import use_collapsed_null_tokens
from . import models as pm

NULL_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length



@dataclass
class BuildConfig:
    seed: int = 0
    dataset_size: int = 60_000
    vae_steps: int = 1200
    vae_batch: int = 48
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_negatives: int = 3
    t2i_steps: int = 4500
    t2i_batch: int = 64
    t2i_lr: float = 1e-3
    t2i_layers: int = 5
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    eval_per_category: int = 64

    @classmethod
    def quick(cls) -> "BuildConfig":
        """A minutes-long build for smoke tests (the models will be poor)."""
        return cls(dataset_size=512, vae_steps=20, vae_batch=16, clip_steps=20, clip_batch=16, t2i_steps=20,
                   t2i_batch=16, t2i_layers=2, eval_per_category=2)


def _log(msg: str) -> None:
    print(f"[pocket build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device() -> torch.device:
    """Train on the GPU when there is one; random numbers are always drawn on the CPU, so a seed gives
    the same data, noise and timesteps everywhere."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def _atomic_dir(final: Path):
    """A temp folder that becomes ``final`` when the stage finishes (so a killed stage restarts)."""
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------------
# 1. data


def make_dataset(work: Path, cfg: BuildConfig) -> dict:
    path = work / "data.npz"
    if path.exists():
        d = np.load(path, allow_pickle=False)
        return {"images": d["images"], "prompts": [str(p) for p in d["prompts"]]}
    from .grammar import CATEGORIES, spec_to_prompt
    from .prompts import sample_specs
    from .render import render_batch

    rng = np.random.default_rng(cfg.seed)
    specs = sample_specs(cfg.dataset_size, rng, CATEGORIES, split="all")
    prompts = [spec_to_prompt(s) for s in specs]
    chunks = []
    for i in range(0, len(prompts), 2000):
        imgs, _ = render_batch(prompts[i:i + 2000], seed=cfg.seed + 1 + i // 2000)
        chunks.append((imgs * 255 + 0.5).astype(np.uint8))
    images = np.concatenate(chunks)
    tmp = work / "data.tmp.npz"
    np.savez(tmp, images=images, prompts=np.array(prompts))
    os.replace(tmp, path)
    return {"images": images, "prompts": prompts}


def _to_unit(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).float() / 255.0


# ---------------------------------------------------------------------------------------------
# 2. vae


def train_vae(work: Path, data: dict, cfg: BuildConfig):
    from diffusers import AutoencoderKL

    final = work / "vae"
    if final.exists():
        return AutoencoderKL.from_pretrained(final)
    g = _seed(cfg.seed + 10)
    dev = _device()
    vae = pm.vae_model().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    images = data["images"]
    t0 = time.time()
    for step in range(cfg.vae_steps):
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
    tmp = _atomic_dir(final)
    vae.save_pretrained(tmp)
    _finish_dir(tmp, final)
    _log(f"vae done: shift {shift:.4f} scale {scale:.4f}")
    return vae


# ---------------------------------------------------------------------------------------------
# 3. clip


def _tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_clip(work: Path, data: dict, cfg: BuildConfig):
    from transformers import CLIPModel

    final = work / "clip"
    tokenizer = pm.build_tokenizer()
    if final.exists():
        return CLIPModel.from_pretrained(final), tokenizer
    g = _seed(cfg.seed + 20)
    rng = np.random.default_rng(cfg.seed + 20)
    dev = _device()
    model = CLIPModel(pm.clip_config(tokenizer)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    images, prompts = data["images"], data["prompts"]
    negatives_cache: dict[str, list[str]] = {}
    t0 = time.time()
    for step in range(cfg.clip_steps):
        idx = torch.randint(len(images), (cfg.clip_batch,), generator=g).numpy()
        caps = [prompts[i] for i in idx]
        negs = []
        for c in caps:
            if c not in negatives_cache:
                negatives_cache[c] = pm.hard_negatives(c, np.random.default_rng(0))
            pool = negatives_cache[c]
            pick = rng.choice(len(pool), size=min(cfg.clip_negatives, len(pool)), replace=False)
            negs += [pool[j] for j in pick] + [c] * (cfg.clip_negatives - len(pick))  # pad (masked below)
        pixel = ((_to_unit(images[idx]) - 0.5) / 0.5).to(dev)
        ids = _tokens(tokenizer, caps + negs).to(dev)
        out = model(input_ids=ids, pixel_values=pixel)
        logits = out.logits_per_image  # [B, B + B*H]
        B, H = len(caps), cfg.clip_negatives
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
    tmp = _atomic_dir(final)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    pm.image_processor().save_pretrained(tmp)
    _finish_dir(tmp, final)
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


class PocketTextEncoder:
    """SD3's prompt embedding for the pocket pipeline: both CLIP slots (penultimate hidden states
    concatenated on features; pooled = both projections), plus one collapsed null T5 token."""

    def __init__(self, text_encoder, tokenizer):
        self.enc, self.tok = text_encoder, tokenizer

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.enc(_tokens(self.tok, prompts), output_hidden_states=True)
        h = out.hidden_states[-2]
        emb = torch.cat([h, h], -1)
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1, emb.shape[-1])], 1)
        return emb, torch.cat([out.text_embeds, out.text_embeds], -1)


def _text_encoder_from_clip(clip_model, tokenizer):
    from transformers import CLIPTextModelWithProjection

    te = CLIPTextModelWithProjection(clip_model.config.text_config)
    missing, unexpected = te.load_state_dict(
        {k: v for k, v in clip_model.state_dict().items() if k.startswith(("text_model.", "text_projection."))},
        strict=False,
    )
    assert not missing and not unexpected, (missing, unexpected)
    return te.eval()


def train_t2i(work: Path, data: dict, vae, clip_model, tokenizer, cfg: BuildConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    final = work / "t2i"
    if final.exists():
        return load_pipeline(final)
    g = _seed(cfg.seed + 30)
    te = _text_encoder_from_clip(clip_model, tokenizer)
    encode = PocketTextEncoder(te, tokenizer)
    images, prompts = data["images"], data["prompts"]
    distinct = sorted(set(prompts)) + [""]
    pos = {p: i for i, p in enumerate(distinct)}
    embs, pooled = [], []
    for i in range(0, len(distinct), 256):
        e, p = encode(distinct[i:i + 256])
        embs.append(e)
        pooled.append(p)
    embs, pooled = torch.cat(embs), torch.cat(pooled)
    prompt_idx = torch.tensor([pos[p] for p in prompts])
    empty = pos[""]
    vae.eval()
    with torch.no_grad():
        lat = []
        for i in range(0, len(images), 512):
            x = _to_unit(images[i:i + 512]) * 2 - 1
            lat.append((vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor)
        latents = torch.cat(lat)
    _log(f"t2i: {len(latents)} latents {tuple(latents.shape[1:])}, {len(distinct)} distinct prompts cached")
    width = embs.shape[-1]
    dev = _device()
    embs, pooled, latents = embs.to(dev), pooled.to(dev), latents.to(dev)
    transformer = pm.transformer_model(width, pooled.shape[-1], layers=cfg.t2i_layers).to(dev)
    use_collapsed_null_tokens(transformer, NULL_T5_TOKENS)
    ema = [p.detach().clone() for p in transformer.parameters()]
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.t2i_lr, weight_decay=0.01)
    ckpt_path = work / "t2i_checkpoint.pt"
    start = 0
    if ckpt_path.exists():  # resume a killed build where it stopped
        state = torch.load(ckpt_path, weights_only=True, map_location=dev)
        transformer.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for e, v in zip(ema, state["ema"]):
            e.copy_(v)
        g.set_state(state["rng"])
        start = state["step"]
        _log(f"t2i: resuming at step {start}")
    t0 = time.time()
    for step in range(start, cfg.t2i_steps):
        if step > start and step % 500 == 0:
            state = {"step": step, "model": transformer.state_dict(), "opt": opt.state_dict(), "ema": ema,
                     "rng": g.get_state()}
            torch.save(state, work / "t2i_checkpoint.tmp")
            os.replace(work / "t2i_checkpoint.tmp", ckpt_path)
        idx = torch.randint(len(latents), (cfg.t2i_batch,), generator=g)
        x0 = latents[idx.to(dev)]
        pid = prompt_idx[idx].clone()
        pid[torch.rand(len(pid), generator=g) < cfg.cfg_dropout] = empty
        pid = pid.to(dev)
        t = torch.sigmoid(torch.randn(len(idx), generator=g)).to(dev)  # logit-normal(0, 1), as SD3
        eps = torch.randn(x0.shape, generator=g).to(dev)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        v = transformer(hidden_states=xt, encoder_hidden_states=embs[pid], pooled_projections=pooled[pid],
                        timestep=t * 1000).sample
        loss = F.mse_loss(v, eps - x0)
        _optimizer_step(opt, transformer.parameters(), loss, cfg.t2i_lr * _cosine(step, cfg.t2i_steps, warmup=200))
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, transformer.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        if step % 200 == 0 or step == cfg.t2i_steps - 1:
            _log(f"t2i step {step}/{cfg.t2i_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for e, p in zip(ema, transformer.parameters()):
            p.copy_(e)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())  # saved models carry no custom processor
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to("cpu").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=vae,
        text_encoder=te, tokenizer=tokenizer,
        text_encoder_2=_text_encoder_from_clip(clip_model, tokenizer), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    tmp = _atomic_dir(final)
    pipe.save_pretrained(tmp)
    _finish_dir(tmp, final)
    return pipe


def load_pipeline(path):
    """The pocket T2I folder through the stock loader; like every SD3 folder without T5, it needs
    ``text_encoder_3=None, tokenizer_3=None`` (diffusers' documented way to drop T5)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)


def build(out_dir: str | os.PathLike, cfg: BuildConfig = BuildConfig(), work_dir: str | os.PathLike | None = None,
          test_prompts: str | os.PathLike | None = None) -> dict:
    """Train every pocket model into ``out_dir`` (``clip/``, ``t2i/``) and return the calibration."""
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "build_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    data = make_dataset(work, cfg)
    _log(f"dataset: {len(data['prompts'])} scenes ({time.time() - t0:.0f}s)")
    vae = train_vae(work, data, cfg)
    clip_model, tokenizer = train_clip(work, data, cfg)
    pipe = train_t2i(work, data, vae, clip_model, tokenizer, cfg)
    for name in ("clip", "t2i"):
        if (out / name).resolve() != (work / name).resolve():
            if (out / name).exists():
                shutil.rmtree(out / name)
            shutil.copytree(work / name, out / name)
    report = {"build_seconds": round(time.time() - t0, 1), "clip_zero_shot": clip_zero_shot(clip_model, tokenizer)}
    if test_prompts is not None:
        from ..models.sd3 import SD3Policy
        from .sample import evaluate_model

        policy = SD3Policy(pipe, device="cpu", dtype="float32", train_mode="none")
        report["gold"] = evaluate_model(policy, test_prompts, seed=cfg.seed, limit_per_category=cfg.eval_per_category,
                                        out_dir=out / "calibration")["gold"]
    (out / "calibration.json").write_text(json.dumps(report, indent=2))
    return report
