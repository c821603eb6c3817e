"""One GRPO loop for flow models; Flow-GRPO, DanceGRPO, Pref-GRPO, TempFlow-GRPO and MixGRPO are configs.

Each iteration (``GRPOTrainer.train_iteration``):

1. ``sample_prompts``: ``prompts_per_iteration`` prompts, drawn without replacement epoch by epoch from
   a permutation fixed by (seed, epoch), each repeated ``group_size`` times (a group). The
   ``P·G`` images are split into contiguous per-process slices, so a group may span processes.
2. ``rollout``: initial noise for all ``P·G`` images from a generator fixed by (seed, iteration) (the
   same images whatever the number of processes); the plan (full / window / random window /
   progressive window / branching) and SDE kind from ``sampling``.
3. ``score``: the rewards on this process's images, then gathered, so advantages
   (``advantages.multi_reward_advantages``) use whole groups; each process keeps its slice.
4. ``update``: for each inner epoch, samples of flat groups are left out (masked), the rest visited in
   micro-batches; for each, its trained steps (all, or a shuffled ``timestep_fraction`` of them):
   recompute the transition's log-prob under the current policy, PPO-clipped objective
   (``losses.ppo_clip_loss``) + β·KL to the reference (``losses.mean_kl``), times the step weight,
   backward; an optimizer step every ``gradient_accumulation_steps`` micro-batches.
5. EMA, evaluation (ODE, fixed seeds) every ``eval.every`` iterations, metrics, checkpoints.

A TempFlow-GRPO branching rollout is flattened into one *unit* per (image, branch step, branch) with a
single recorded transition; its group is (prompt group, branch step), so each branch step gets its own
group-relative advantage.

All randomness of an iteration comes from generators seeded by (run seed, iteration, purpose, rank), so
a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, save_config, to_yaml
from ..sampling.plans import plan_from_config
from ..sampling.rollout import group_noise, rollout, rollout_branched
from ..sampling.steps import step_mean_std, transition_log_prob
from .advantages import multi_reward_advantages
from .losses import approx_kl, clip_fraction, mean_kl, nft_loss, nft_optimality, ppo_clip_loss, timestep_weights

_MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
_PAIRWISE = ("win_rate",)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _gen(device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


@dataclasses.dataclass
class RolloutBatch:
    """This process's share of an iteration: n units, each with T recorded transitions."""

    prompts: list[str]  # [n]
    metadata: list[dict]  # [n]
    group_ids: torch.Tensor  # [n] long, global group of each unit
    cond: object  # Cond with n rows
    latents: torch.Tensor  # [n, T, C, H, W] state before each recorded step
    next_latents: torch.Tensor  # [n, T, C, H, W]
    log_probs: torch.Tensor  # [n, T] at sampling time (the "old" policy)
    sigmas: torch.Tensor  # [n, T]
    sigmas_next: torch.Tensor  # [n, T]
    weights: torch.Tensor  # [n, T] per-step loss weights
    images: torch.Tensor  # [n, 3, H, W] in [0, 1]
    finals: torch.Tensor | None = None  # [n, C, H, W] final (clean) latents, what objective=nft learns from
    advantages: torch.Tensor | None = None  # [n]
    masked: torch.Tensor | None = None  # [n] bool, flat group (left out of the update)


class GRPOTrainer:
    """Build with a ``Config``; ``policy``/``reward`` may be passed in already loaded (notebooks, tests)."""

    def __init__(self, cfg: Config, *, policy=None, reward=None, eval_reward=None, accelerator=None,
                 log=print):
        from accelerate import Accelerator

        from ..prompts import read_prompts

        self.cfg = cfg
        self.log = log
        t, s = cfg.train, cfg.sampling
        self.acc = accelerator or Accelerator(mixed_precision=_MIXED_PRECISION[t.mixed_precision],
                                              cpu=cfg.model.device == "cpu")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.output_dir = Path(cfg.run.output_dir)

        n_images = t.group_size * t.prompts_per_iteration
        if n_images % self.world:
            raise ConfigError(
                f"train.group_size·prompts_per_iteration = {n_images} images per iteration cannot be split over "
                f"{self.world} processes; make it a multiple of {self.world}"
            )
        self.pairwise = any(r.name in _PAIRWISE for r in cfg.rewards)
        if self.pairwise and t.prompts_per_iteration % self.world:
            raise ConfigError(
                f"a pairwise reward (win_rate) judges whole groups on one process: train.prompts_per_iteration="
                f"{t.prompts_per_iteration} must be a multiple of the {self.world} processes"
            )
        self.prompts = read_prompts(t.prompts)
        self.eval_prompts = read_prompts(cfg.eval.prompts) if cfg.eval.prompts else None

        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)  # LoRA's random init (the same on every process)
        if policy is None:
            from ..models import load_policy

            model_cfg = cfg.model
            if model_cfg.device == "auto":
                model_cfg = dataclasses.replace(model_cfg, device=str(self.acc.device))
            policy = load_policy(model_cfg)
        self.policy = policy
        if not hasattr(policy, "velocity"):
            raise ConfigError(f"GRPO trains flow models; {type(policy).__name__} has no velocity()")
        self.device = policy.device
        if reward is None:
            from ..rewards import build_rewards

            reward = build_rewards(cfg.rewards)
        self.reward = reward
        if eval_reward is None and self.eval_prompts is not None:
            if cfg.eval.rewards:
                from ..rewards import build_rewards

                eval_reward = build_rewards(cfg.eval.rewards)
            elif not self.pairwise:
                eval_reward = reward
        self.eval_reward = eval_reward

        self.params = policy.trainable_parameters()
        if not self.params:
            raise ConfigError("the policy has no trainable parameters; use model.train_mode=lora or full")
        self.param_names = [n for n, p in policy.denoiser.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        model, self.optimizer = self.acc.prepare(policy.denoiser, opt)
        self._wrapped = model
        policy.wrap_denoiser(model)
        self.ema = [p.detach().clone() for p in self.params] if t.ema else None

        self.height, self.width = s.height, s.width
        self.latent_shape = policy.latent_shape(s.height, s.width)
        self.sigmas = policy.sigmas(s.num_steps, s.height, s.width, s.shift).float()
        self.iteration = 0
        self._eval_cond = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def summary(self) -> dict:
        """Derived quantities printed at start-up."""
        t, s = self.cfg.train, self.cfg.sampling
        n_images = t.group_size * t.prompts_per_iteration
        plan = plan_from_config(s, 0, _gen("cpu", self.cfg.run.seed, 0, 7))
        if plan.is_branching:
            recorded, units = 1, n_images * len(plan.branch_steps) * plan.num_branches
        else:
            recorded, units = len(plan.record), n_images
        trained = t.nft_timesteps if t.objective == "nft" else max(1, int(recorded * t.timestep_fraction))
        per_proc = units // self.world
        micro = math.ceil(per_proc / t.micro_batch_size)
        return {
            "objective": t.objective,
            "processes": self.world,
            "trainable_params": sum(p.numel() for p in self.params),
            "groups_per_iteration": t.prompts_per_iteration,
            "group_size": t.group_size,
            "images_per_iteration": n_images,
            "trained_units_per_iteration": units,
            "units_per_process": per_proc,
            "recorded_steps_per_unit": recorded,
            "trained_steps_per_unit": trained,
            "micro_batches_per_epoch": micro,
            "optimizer_steps_per_iteration": t.num_inner_epochs * math.ceil(micro / t.gradient_accumulation_steps),
            "effective_batch": f"{t.micro_batch_size * t.gradient_accumulation_steps * self.world} samples × "
                               f"{trained} {'noise levels' if t.objective == 'nft' else 'steps'} per optimizer step",
            "total_images": n_images * t.num_iterations,
        }

    # ------------------------------------------------------------------ 1. prompts
    def sample_prompts(self, iteration: int) -> list[int]:
        """Indices of the ``prompts_per_iteration`` prompts of ``iteration`` (same on every process)."""
        P, n = self.cfg.train.prompts_per_iteration, len(self.prompts)
        start = iteration * P
        out = []
        for pos in range(start, start + P):
            epoch, k = divmod(pos, n)
            perm = torch.randperm(n, generator=_gen("cpu", self.cfg.run.seed, epoch, 11))
            out.append(int(perm[k]))
        return out

    # ------------------------------------------------------------------ 2. rollout
    @torch.no_grad()
    def rollout(self, iteration: int, prompt_ids: list[int] | None = None) -> RolloutBatch:
        """The iteration's groups: ``prompt_ids`` (indices into the training prompts, one per group;
        default ``sample_prompts(iteration)``), noise and SDE draws seeded by (seed, iteration)."""
        cfg, s, t = self.cfg, self.cfg.sampling, self.cfg.train
        G, P = t.group_size, t.prompts_per_iteration
        N = G * P
        n = N // self.world
        lo = self.rank * n
        seed = cfg.run.seed
        ids = self.sample_prompts(iteration) if prompt_ids is None else list(prompt_ids)
        if len(ids) != P:
            raise ValueError(f"rollout needs {P} prompt ids (train.prompts_per_iteration), got {len(ids)}")
        rows = [self.prompts[i] for i in ids]
        noise = group_noise(P, G, self.latent_shape, shared=s.share_group_noise,
                            generator=_gen("cpu", seed, iteration, 1))[lo:lo + n].to(self.device)
        gids = torch.arange(lo, lo + n) // G
        prompts = [rows[g]["prompt"] for g in gids.tolist()]
        metas = [{k: v for k, v in rows[g].items() if k != "prompt"} for g in gids.tolist()]
        cond = self.policy.encode(prompts)
        plan = plan_from_config(s, iteration, _gen("cpu", seed, iteration, 2))
        sde_gen = _gen(self.device, seed, iteration, 3, self.rank)
        sigmas = self.sigmas.to(self.device)
        plan_std = self._plan_std(plan)
        chunk = s.batch_size or n
        parts = []
        for a in range(0, n, chunk):
            vel = functools.partial(self._velocity, cond=cond[a:a + chunk])
            if plan.is_branching:
                parts.append(rollout_branched(vel, noise[a:a + chunk], sigmas, plan, kind=s.sde_kind,
                                              noise_level=s.noise_level, generator=sde_gen))
            else:
                parts.append(rollout(vel, noise[a:a + chunk], sigmas, plan, kind=s.sde_kind,
                                     noise_level=s.noise_level, generator=sde_gen))
        w_plan = timestep_weights(t.timestep_weighting, plan_std)  # [T_plan]
        if plan.is_branching:
            J, K = len(plan.branch_steps), plan.num_branches
            reps = J * K
            lat = torch.cat([p.latents for p in parts])  # [n, J, ...]
            latents = lat.unsqueeze(2).expand(-1, -1, K, *lat.shape[2:]).reshape(n * reps, 1, *lat.shape[2:])
            next_latents = torch.cat([p.next_latents for p in parts]).reshape(n * reps, 1, *lat.shape[2:])
            log_probs = torch.cat([p.log_probs for p in parts]).reshape(n * reps, 1)
            finals = torch.cat([p.finals for p in parts]).reshape(n * reps, *lat.shape[2:])
            step_j = torch.arange(J).repeat_interleave(K).repeat(n)  # [n·J·K] branch step of each unit
            sig, sig_next = parts[0].sigmas, parts[0].sigmas_next
            sigmas_u, sigmas_next_u = sig[step_j][:, None], sig_next[step_j][:, None]
            weights = w_plan[step_j][:, None]
            gids = gids.repeat_interleave(reps) * J + step_j
            prompts = [p for p in prompts for _ in range(reps)]
            metas = [m for m in metas for _ in range(reps)]
            cond = cond.repeat_interleave(reps)
        else:
            latents = torch.cat([p.latents for p in parts])
            next_latents = torch.cat([p.next_latents for p in parts])
            log_probs = torch.cat([p.log_probs for p in parts])
            finals = torch.cat([p.final for p in parts])
            T = latents.shape[1]
            sigmas_u = parts[0].sigmas[None].expand(len(latents), T)
            sigmas_next_u = parts[0].sigmas_next[None].expand(len(latents), T)
            weights = w_plan[None].expand(len(latents), T)
        images = torch.cat([self.policy.decode(finals[a:a + chunk]) for a in range(0, len(finals), chunk)])
        metas = [{**m, "group_id": int(g)} for m, g in zip(metas, gids.tolist())]
        return RolloutBatch(prompts, metas, gids, cond, latents, next_latents, log_probs, sigmas_u.contiguous(),
                            sigmas_next_u.contiguous(), weights.contiguous(), images, finals=finals)

    def _velocity(self, x, sigma, cond):
        """Velocity for a rollout; branch batches hold K rows per conditioning row (contiguous)."""
        k = x.shape[0] // len(cond)
        return self.policy.velocity(x, sigma, cond if k == 1 else cond.repeat_interleave(k),
                                    self.cfg.sampling.guidance_scale)

    def _plan_std(self, plan) -> torch.Tensor:
        """Transition std of each recorded (or branch) step of ``plan`` → [T_plan] (for noise-aware weights)."""
        s = self.cfg.sampling
        steps = plan.branch_steps if plan.is_branching else plan.record
        z = torch.zeros(1, 1)
        stds = [step_mean_std(s.sde_kind, z, z, self.sigmas[i], self.sigmas[i + 1], s.noise_level)[1].reshape(())
                for i in steps]
        return torch.stack(stds) if stds else torch.zeros(0)

    # ------------------------------------------------------------------ 3. rewards → advantages
    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> dict:
        t = self.cfg.train
        total, info = self.reward(batch.images, batch.prompts, batch.metadata)
        per_reward = info.get("per_reward", {self.reward.name: total}) if isinstance(info, dict) else {}
        weights = info.get("weights", {self.reward.name: 1.0})
        gather = self._gather
        g_ids = gather(batch.group_ids.to(self.device))
        g_per = {k: gather(v.float().to(self.device)) for k, v in per_reward.items()}
        adv, masked = multi_reward_advantages(g_per, weights, g_ids, mode=t.reward_normalization,
                                              std_mode=t.std_mode, clip_max=t.adv_clip_max)
        n = len(batch.prompts)
        lo = self.rank * n
        batch.advantages = adv[lo:lo + n].cpu()
        batch.masked = masked[lo:lo + n].cpu()
        g_total = sum(weights[k] * v for k, v in g_per.items())
        metrics = {"reward/total/mean": g_total.mean().item(), "reward/total/std": g_total.std().item(),
                   "train/zero_std_frac": masked.float().mean().item(),
                   "train/adv_abs_mean": adv.abs().mean().item()}
        for k, v in g_per.items():
            metrics[f"reward/{k}/mean"] = v.mean().item()
            metrics[f"reward/{k}/std"] = v.std().item()
        return metrics

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x.contiguous()) if self.world > 1 else x

    # ------------------------------------------------------------------ 4. policy update
    def update(self, batch: RolloutBatch, iteration: int) -> dict:
        cfg, t, s = self.cfg, self.cfg.train, self.cfg.sampling
        seed = cfg.run.seed
        idx = torch.nonzero(~batch.masked).flatten()
        n = len(batch.prompts)
        T, micro_step = self._objective(batch, iteration)
        T_train = T if t.objective == "nft" else max(1, int(T * t.timestep_fraction))
        # every process must run the same number of backward passes (DDP): pad with weight-0 samples
        counts = self._gather(torch.tensor([len(idx)], device=self.device)).cpu()
        n_train = int(counts.max())
        if n_train == 0:
            return {"train/optimizer_steps": 0}
        stats: dict[str, list] = {"grad_norm": []}
        steps = 0
        mb = t.micro_batch_size
        for epoch in range(t.num_inner_epochs):
            g = _gen("cpu", seed, iteration, 4, epoch, self.rank)
            order = idx[torch.randperm(len(idx), generator=g)]
            live = torch.ones(n_train, dtype=torch.bool)
            if len(order) < n_train:
                live[len(order):] = False
                filler = order[:1] if len(order) else torch.zeros(1, dtype=torch.long)
                order = torch.cat([order, filler.repeat(n_train - len(order))])
            if t.shuffle_timesteps:
                cols = torch.stack([torch.randperm(T, generator=g) for _ in range(n)])[:, :T_train]
            else:
                cols = torch.arange(T)[:T_train].expand(n, T_train)
            n_micro = math.ceil(n_train / mb)
            for first in range(0, n_micro, t.gradient_accumulation_steps):
                group = range(first, min(first + t.gradient_accumulation_steps, n_micro))
                for m in group:
                    rows, alive = order[m * mb:(m + 1) * mb], live[m * mb:(m + 1) * mb]
                    for j in range(T_train):
                        sync = m == group[-1] and j == T_train - 1
                        ctx = (contextlib.nullcontext() if sync or self.world == 1
                               else self.acc.no_sync(self._wrapped))
                        with ctx:
                            out = micro_step(batch, rows, cols[rows, j], alive,
                                             scale=1.0 / (T_train * len(group)))
                        for k, v in out.items():
                            stats.setdefault(k, []).append(v)
                if t.max_grad_norm > 0:
                    stats["grad_norm"].append(float(self.acc.clip_grad_norm_(self.params, t.max_grad_norm)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._ema_update()
                steps += 1
        mean = lambda v: float(sum(v) / len(v)) if v else 0.0  # noqa: E731
        names = {"ratio": "ratio_mean"}
        return {**{f"train/{names.get(k, k)}": mean(v) for k, v in stats.items()}, "train/optimizer_steps": steps}

    def _objective(self, batch: RolloutBatch, iteration: int):
        """(columns per unit, micro-step) of the configured objective: the recorded SDE steps and the
        clipped policy-gradient step, or (nft) the noise levels drawn for ``iteration`` and NFT's step."""
        if self.cfg.train.objective == "nft":
            return self.cfg.train.nft_timesteps, functools.partial(self._nft_micro_step,
                                                                   self._nft_targets(batch, iteration))
        return batch.log_probs.shape[1], self._micro_step

    @torch.no_grad()
    def _nft_targets(self, batch: RolloutBatch, iteration: int) -> dict:
        """objective=nft: ``nft_timesteps`` noised copies of each final image, x_t = (1−σ)·x₀ + σ·ε with σ
        drawn from the sampler's sigmas, their flow-matching targets ε − x₀ and the rollout policy's
        velocity there (v_old, fixed for the whole update) → dict of [n, K, ...] tensors."""
        t, s = self.cfg.train, self.cfg.sampling
        if batch.finals is None:
            raise ValueError("objective=nft needs the rollout's final latents (RolloutBatch.finals)")
        n, K = len(batch.prompts), t.nft_timesteps
        g = _gen("cpu", self.cfg.run.seed, iteration, 6, self.rank)
        grid = self.sigmas[:-1]
        sig = grid[torch.randint(len(grid), (n, K), generator=g)]
        x0 = batch.finals.float().cpu()[:, None]
        eps = torch.randn((n, K, *x0.shape[2:]), generator=g)
        sb = sig.reshape(n, K, *([1] * (x0.ndim - 2)))
        x_t = ((1 - sb) * x0 + sb * eps).to(batch.finals.dtype)
        v_old = torch.empty_like(x_t)
        mb = t.micro_batch_size
        for a in range(0, n, mb):
            cond = batch.cond[a:a + mb]
            for k in range(K):
                v_old[a:a + mb, k] = self.policy.velocity(x_t[a:a + mb, k].to(self.device),
                                                          sig[a:a + mb, k].to(self.device), cond,
                                                          s.guidance_scale).to(v_old.dtype).cpu()
        return {"x_t": x_t, "sigmas": sig, "target": eps - x0, "v_old": v_old}

    def _nft_micro_step(self, prep: dict, batch: RolloutBatch, rows, cols, alive, scale: float) -> dict:
        """objective=nft: DiffusionNFT's loss on one micro-batch at one noised copy per row; backward."""
        t, s = self.cfg.train, self.cfg.sampling
        dev = self.device
        x, sig = prep["x_t"][rows, cols].to(dev), prep["sigmas"][rows, cols].to(dev)
        v_old, target = prep["v_old"][rows, cols].to(dev), prep["target"][rows, cols].to(dev)
        r = nft_optimality(batch.advantages[rows].to(dev), t.adv_clip_max)
        cond = batch.cond[rows.tolist()]
        v = self.policy.velocity(x, sig, cond, s.guidance_scale)
        loss_B = nft_loss(v, v_old, target, r, t.nft_beta)
        kl = torch.zeros_like(loss_B)
        if t.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.policy.velocity(x, sig, cond, s.guidance_scale)
            kl = ((v.float() - v_ref.float()) ** 2).flatten(1).mean(1)
        a = alive.to(dev)
        loss = (a.float() * (loss_B + t.kl_beta * kl)).sum() / len(rows) * scale
        self.acc.backward(loss)
        with torch.no_grad():
            return {"policy_loss": float(loss_B[a].mean()) if a.any() else 0.0,
                    "kl": float(kl[a].mean()) if a.any() else 0.0}

    def policy_gradient(self, batch: RolloutBatch, rows=None, iteration: int = 0) -> torch.Tensor:
        """The gradient of the configured objective (GRPO, or nft with the noise levels drawn for
        ``iteration``) over ``rows`` of a scored batch (default: every unmasked unit), all recorded steps
        (noise levels), flattened over the trainable parameters; nothing is stepped and the parameters'
        ``.grad`` is left empty. For diagnostics: the cosine between the gradients of independent
        batches measures how much of an update is signal (``benchmarks/grpo_gradient_snr.py``)."""
        if batch.advantages is None:
            raise ValueError("score(batch) first: the gradient needs the advantages")
        rows = torch.nonzero(~batch.masked).flatten() if rows is None else torch.as_tensor(rows)
        T, micro_step = self._objective(batch, iteration)
        self.optimizer.zero_grad(set_to_none=True)
        mb = self.cfg.train.micro_batch_size
        chunks = [rows[a:a + mb] for a in range(0, len(rows), mb)]
        for chunk in chunks:
            for j in range(T):
                micro_step(batch, chunk, torch.full((len(chunk),), j), torch.ones(len(chunk), dtype=torch.bool),
                           scale=len(chunk) / (T * max(1, len(rows))))
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
                          for p in self.params])
        self.optimizer.zero_grad(set_to_none=True)
        return grad

    def _micro_step(self, batch: RolloutBatch, rows, cols, alive, scale: float) -> dict:
        """Loss of one micro-batch at one step per row (column ``cols[i]`` of row ``rows[i]``); backward."""
        t, s = self.cfg.train, self.cfg.sampling
        dev = self.device
        x = batch.latents[rows, cols].to(dev)
        x_next = batch.next_latents[rows, cols].to(dev)
        sig, sig_next = batch.sigmas[rows, cols].to(dev), batch.sigmas_next[rows, cols].to(dev)
        old_lp = batch.log_probs[rows, cols].to(dev)
        w = batch.weights[rows, cols].to(dev) * alive.to(dev).float()
        adv = batch.advantages[rows].to(dev)
        cond = batch.cond[rows.tolist()]
        v = self.policy.velocity(x, sig, cond, s.guidance_scale)
        res = transition_log_prob(s.sde_kind, x, x_next, v, sig, sig_next, s.noise_level)
        pg, ratio = ppo_clip_loss(res.log_prob, old_lp, adv, t.clip_range)
        loss_B = pg
        kl = torch.zeros_like(pg)
        if t.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.policy.velocity(x, sig, cond, s.guidance_scale)
            ref_mean, _ = step_mean_std(s.sde_kind, x, v_ref, sig, sig_next, s.noise_level)
            kl = mean_kl(res.mean, ref_mean, res.std)
            loss_B = pg + t.kl_beta * kl
        loss = (w * loss_B).sum() / len(rows) * scale
        self.acc.backward(loss)
        a = alive.to(dev)
        with torch.no_grad():
            lp, olp, r = res.log_prob[a], old_lp[a], ratio[a]
            return {"policy_loss": float(pg[a].mean()) if a.any() else 0.0,
                    "kl": float(kl[a].mean()) if a.any() else 0.0,
                    "approx_kl": float(approx_kl(lp, olp)) if a.any() else 0.0,
                    "clipfrac": float(clip_fraction(r, t.clip_range)) if a.any() else 0.0,
                    "ratio": float(r.mean()) if a.any() else 1.0}

    # ------------------------------------------------------------------ 5. EMA, eval, checkpoints
    @torch.no_grad()
    def _ema_update(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.train.ema_decay
        for e, p in zip(self.ema, self.params):
            e.mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped into the model inside the context (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict:
        """ODE samples of the eval prompts (fixed seeds) scored by the eval rewards (main process)."""
        if self.eval_prompts is None or self.eval_reward is None:
            return {}
        metrics = {}
        if self.is_main:
            t0 = time.time()
            images, prompts = self.sample_eval()
            metas = [{k: v for k, v in r.items() if k != "prompt"}
                     for r in self.eval_prompts for _ in range(self.cfg.eval.num_images)]
            total, info = self.eval_reward(images, prompts, metas)
            metrics["eval/reward"] = float(total.mean())
            per = info.get("per_reward", {}) if isinstance(info, dict) else {}
            for key, scores in per.items():
                metrics[f"eval/{key}"] = float(scores.float().mean())
                sub = info["info"].get(key, {})
                for field, val in sub.items():
                    if torch.is_tensor(val) and val.ndim == 1 and len(val) == len(images):
                        metrics[f"eval/{key}/{field}"] = float(val.float().mean())
                    elif field == "per_category" and isinstance(val, dict):
                        for cat, v in val.items():
                            metrics[f"eval/{key}/{cat}"] = float(v)
            from ..io import save_image_grid

            save_image_grid(self.output_dir / "eval" / f"iter_{iteration:06d}.png", images[:64], nrow=8,
                            scale=max(1, 128 // images.shape[-1]))
            metrics["time/eval_s"] = time.time() - t0
        self.acc.wait_for_everyone()
        return metrics

    @torch.no_grad()
    def sample_eval(self) -> tuple[torch.Tensor, list[str]]:
        """The eval images: image i of the eval set starts from noise seeded by (eval.seed, i)."""
        e, s = self.cfg.eval, self.cfg.sampling
        prompts = [r["prompt"] for r in self.eval_prompts for _ in range(e.num_images)]
        out = []
        with self.local_denoiser(), self.ema_weights():
            for a in range(0, len(prompts), e.batch_size):
                chunk = prompts[a:a + e.batch_size]
                noise = torch.stack([torch.randn(self.latent_shape, generator=_gen("cpu", e.seed, a + i, 5))
                                     for i in range(len(chunk))]).to(self.device)
                cond = self.policy.encode(chunk)
                out.append(self.policy.generate(noise, cond, num_steps=s.eval_num_steps,
                                                guidance_scale=s.guidance_scale, shift=s.shift,
                                                checkpoint=False).cpu())
        return torch.cat(out), prompts

    @contextlib.contextmanager
    def local_denoiser(self):
        """The policy with its bare denoiser (no distributed wrapper) inside the context: for sampling on
        one process (eval, notebooks, diagnostics), where a wrapper's collective ops would hang."""
        self.policy.wrap_denoiser(None)
        try:
            yield self.policy
        finally:
            self.policy.wrap_denoiser(self._wrapped)

    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self, iteration: int) -> Path | None:
        """Atomically write ``checkpoints/iter_XXXXXX`` (written under a temporary name, then renamed):
        trainable weights, optimizer, EMA, RNG states and the iteration."""
        from safetensors.torch import save_file

        from ..io import atomic_write_json

        final = self.checkpoint_dir() / f"iter_{iteration:06d}"
        if self.is_main:
            tmp = self.checkpoint_dir() / f".tmp-iter_{iteration:06d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in zip(self.param_names, self.params)},
                      str(tmp / "trainable.safetensors"))
            if self.ema is not None:
                save_file({n: e.cpu().contiguous() for n, e in zip(self.param_names, self.ema)},
                          str(tmp / "ema.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            atomic_write_json(tmp / "state.json", {"iteration": iteration, "processes": self.world,
                                                   "sampler_position": iteration * self.cfg.train.prompts_per_iteration})
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            kept = sorted(self.checkpoint_dir().glob("iter_*"))
            for old in kept[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in self.checkpoint_dir().glob("iter_*") if (p / "state.json").is_file())
        return found[-1] if found else None

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint → the iteration to continue from."""
        import json

        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(self.param_names) - set(weights)
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model: {len(missing)} trainable tensors missing "
                             f"(e.g. {sorted(missing)[0]}); was it written with another model or LoRA config?")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                p.copy_(weights[n].to(p.device, p.dtype))
            if self.ema is not None and (path / "ema.safetensors").is_file():
                ema = load_file(str(path / "ema.safetensors"))
                for e, n in zip(self.ema, self.param_names):
                    e.copy_(ema[n].to(e.device, e.dtype))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=self.device))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration = int(state["iteration"])
        return self.iteration

    def save_final(self) -> Path | None:
        """The trained weights (EMA when enabled): LoRA in diffusers format under ``final/lora`` (loadable by
        the stock pipeline's ``load_lora_weights``), or the full denoiser under ``final/<denoiser>``."""
        out = self.output_dir / "final"
        if self.is_main:
            name = "lora" if self.policy.train_mode == "lora" else self.policy.denoiser_name
            tmp = out / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            with self.ema_weights():
                self.policy.save_adapter(tmp)
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(tmp, out / name)
        self.acc.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ the loop
    def train_iteration(self, iteration: int) -> dict:
        t0 = time.time()
        batch = self.rollout(iteration)
        t1 = time.time()
        metrics = self.score(batch)
        t2 = time.time()
        metrics.update(self.update(batch, iteration))
        t3 = time.time()
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2,
                        "time/iteration_s": t3 - t0})
        return metrics

    def train(self) -> dict:
        """Run (or resume) to ``train.num_iterations``; returns the last eval metrics."""
        from .logging import MetricsLogger

        cfg = self.cfg
        start = 0
        if cfg.run.resume and (ck := self.latest_checkpoint()) is not None:
            start = self.load_checkpoint(ck)
            if self.is_main:
                self.log(f"resumed from {ck} (iteration {start})")
        logger = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
            logger = MetricsLogger(self.output_dir, cfg.run.tracker, config=_as_dict(cfg),
                                   resume_iteration=start if start else -1)
            info = self.summary()
            self.log("flowalign train: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        last_eval: dict = {}
        if start == 0 and cfg.eval.at_start and self.eval_prompts is not None:
            last_eval = self.evaluate(0)
            if logger is not None and last_eval:
                logger.log(0, last_eval)
        bar = None
        if self.is_main and cfg.run.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.num_iterations, initial=start, desc="grpo", dynamic_ncols=True, file=sys.stderr)
        for it in range(start, cfg.train.num_iterations):
            metrics = self.train_iteration(it)
            done = it + 1
            self.iteration = done
            if done % cfg.eval.every == 0 or done == cfg.train.num_iterations:
                ev = self.evaluate(done)
                if ev:
                    last_eval = ev
                    metrics.update(ev)
            if logger is not None and (done % cfg.run.log_every == 0 or done == cfg.train.num_iterations):
                logger.log(done, metrics)
            if bar is not None:
                post = {"reward": f"{metrics['reward/total/mean']:.3f}"}
                gold = [k for k in last_eval if k.endswith("/strict")]
                if gold:
                    post["eval_strict"] = f"{last_eval[gold[0]]:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if done % cfg.run.save_every == 0 or done == cfg.train.num_iterations:
                self.save_checkpoint(done)
        if bar is not None:
            bar.close()
        self.save_final()
        if logger is not None:
            logger.close()
        return last_eval


def _as_dict(cfg: Config) -> dict:
    import yaml

    return yaml.safe_load(to_yaml(cfg))


def train(cfg: Config, **kwargs) -> dict:
    """Build a ``GRPOTrainer`` from ``cfg`` and run it (what ``flowalign train`` does)."""
    return GRPOTrainer(cfg, **kwargs).train()
