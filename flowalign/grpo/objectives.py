"""Policy objectives: what one micro-step of the update minimises, one class each.

The trainer's update is the same loop for every objective (``GRPOTrainer.update``): per inner
epoch, shuffle the unmasked units; per micro-batch and trained column, build a ``MicroBatch``,
call ``objective.loss(mb)``, back-propagate ``mean(alive · loss_B)``, and step the optimizer every
``gradient_accumulation_steps`` micro-batches. An objective says

* ``loss(mb) -> (loss_B [B], metrics)``: the per-unit loss of the micro-batch (already weighted
  per unit where the objective uses weights; padding rows are masked by the loop) and float
  metrics averaged over the live rows (logged as ``train/<key>``, means over micro-steps);
* ``prepare(batch, generator)``: once per iteration before the update, e.g. targets it computes
  under the rollout policy (NFT), drawing randomness only from ``generator`` (seeded by run seed,
  iteration and rank, so a resumed run repeats);
* ``columns_per_unit`` / ``trained_columns``: what a unit's columns are (``column_name``: the
  recorded SDE steps, or NFT's noise levels) and how many are visited per unit and inner epoch;
* ``batch_unit``: ``"unit"`` — micro-batches take units in any order. An objective that compares
  units of one group (e.g. PRDP's pairs of trajectories of the same prompt) declares ``"group"``:
  its micro-batches must hold whole groups (not built yet: the trainer refuses it with a message).

It sees, through ``mb``: the units' transitions (``latents``, ``next_latents``, ``sigmas``,
``sigmas_next`` at the micro-step's column), ``old_log_probs``, ``weights``, ``cond``,
``advantages``, ``rewards`` and ``group_ids``; through ``self``: the flow ``policy`` (current
weights; ``policy.reference()`` is the frozen reference, LoRA off), the ``sde`` policy (log-probs and
means of transitions) and the ``train`` config section.

A new objective (PRDP: regression of β·Σ log-ratio differences of two trajectories of a prompt onto
their reward difference; DRAGON: a Diffusion-DPO/KTO-style velocity-space contrastive loss) is a
subclass here, an entry in ``OBJECTIVES`` (the ``train.objective`` value) and its hyperparameters
in ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch

from .losses import approx_kl, clip_fraction, mean_kl, nft_loss, nft_optimality, ppo_clip_loss

__all__ = ["RolloutBatch", "MicroBatch", "Objective", "PPOClip", "NFT", "OBJECTIVES"]


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
    rewards: torch.Tensor | None = None  # [n] weighted reward total of each unit


class MicroBatch:
    """One micro-step's B units: unit ``rows[i]`` of the batch at column ``cols[i]``; ``alive[i]``
    False marks a padding row (every process runs the same number of backward passes), which the
    loop gives weight 0. Fields are sliced from the batch on first use and moved to ``device``; the
    step fields (``latents`` … ``weights``) are the unit's recorded transition at its column, so an
    objective whose columns are not recorded steps (NFT) reads its own prepared tensors instead."""

    def __init__(self, batch: RolloutBatch, rows: torch.Tensor, cols: torch.Tensor, alive: torch.Tensor, device):
        self.batch, self.rows, self.cols, self.device = batch, rows, cols, device
        self.alive = alive.to(device)  # [B] bool

    def __len__(self) -> int:
        return len(self.rows)

    def _step(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rows, self.cols].to(self.device)

    @functools.cached_property
    def latents(self) -> torch.Tensor:  # [B, C, H, W]
        return self._step(self.batch.latents)

    @functools.cached_property
    def next_latents(self) -> torch.Tensor:  # [B, C, H, W]
        return self._step(self.batch.next_latents)

    @functools.cached_property
    def sigmas(self) -> torch.Tensor:  # [B]
        return self._step(self.batch.sigmas)

    @functools.cached_property
    def sigmas_next(self) -> torch.Tensor:  # [B]
        return self._step(self.batch.sigmas_next)

    @functools.cached_property
    def old_log_probs(self) -> torch.Tensor:  # [B] at sampling time
        return self._step(self.batch.log_probs)

    @functools.cached_property
    def weights(self) -> torch.Tensor:  # [B] the step's loss weight (timestep weighting)
        return self._step(self.batch.weights)

    @functools.cached_property
    def advantages(self) -> torch.Tensor:  # [B]
        return self.batch.advantages[self.rows].to(self.device)

    @functools.cached_property
    def rewards(self) -> torch.Tensor:  # [B] weighted reward totals
        return self.batch.rewards[self.rows].to(self.device)

    @functools.cached_property
    def group_ids(self) -> torch.Tensor:  # [B] long
        return self.batch.group_ids[self.rows].to(self.device)

    @functools.cached_property
    def cond(self):  # Cond with B rows
        return self.batch.cond[self.rows.tolist()]

    def live_mean(self, x_B: torch.Tensor, empty: float = 0.0) -> float:
        """Mean of ``x_B`` over the live rows (``empty`` when there are none), for metrics."""
        return float(x_B[self.alive].mean()) if self.alive.any() else empty


class Objective:
    """The contract of an objective (module docstring). Subclasses set ``name`` and ``loss``."""

    name: ClassVar[str]
    column_name: ClassVar[str] = "steps"  # what a unit's columns are (start-up summary)
    batch_unit: ClassVar[str] = "unit"  # "unit", or "group" for objectives that compare units of a group

    def __init__(self, train, policy, sde, guidance_scale: float):
        self.train = train  # the train config section (hyperparameters)
        self.policy = policy  # the flow policy being trained; policy.reference() is the frozen reference
        self.sde = sde  # the SDEPolicy that sampled the rollouts
        self.guidance_scale = guidance_scale

    @classmethod
    def columns_per_unit(cls, train, recorded_steps: int) -> int:
        """Columns of a unit whose plan records ``recorded_steps`` transitions."""
        return recorded_steps

    @classmethod
    def trained_columns(cls, train, columns: int) -> int:
        """Columns visited per unit and inner epoch."""
        return columns

    def prepare(self, batch: RolloutBatch, generator: torch.Generator) -> None:
        """Per-iteration work before the update (none by default)."""

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """→ (loss_B [B] to minimise, metrics over the live rows)."""
        raise NotImplementedError


class PPOClip(Objective):
    """The Flow-GRPO family's objective (Flow-GRPO, DanceGRPO, Pref-GRPO, TempFlow-GRPO, MixGRPO):
    the PPO-clipped ratio of the transition's log-prob under the current policy to the sampling one
    (``losses.ppo_clip_loss``), + β·KL to the reference (``losses.mean_kl``, mean-space), times the
    step weight. Columns: the recorded SDE steps, a ``timestep_fraction`` of them per epoch."""

    name = "grpo"

    @classmethod
    def trained_columns(cls, train, columns: int) -> int:
        return max(1, int(columns * train.timestep_fraction))

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.train
        x, sig, sig_next = mb.latents, mb.sigmas, mb.sigmas_next
        v = self.policy.velocity(x, sig, mb.cond, self.guidance_scale)
        res = self.sde.log_prob(x, mb.next_latents, v, sig, sig_next)  # log_prob [B], mean, std
        pg, ratio = ppo_clip_loss(res.log_prob, mb.old_log_probs, mb.advantages, t.clip_range)  # [B], [B]
        loss_B = pg
        kl = torch.zeros_like(pg)
        if t.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.policy.velocity(x, sig, mb.cond, self.guidance_scale)
            ref_mean, _ = self.sde.mean_std(x, v_ref, sig, sig_next)
            kl = mean_kl(res.mean, ref_mean, res.std)  # [B]
            loss_B = pg + t.kl_beta * kl
        a = mb.alive
        with torch.no_grad():
            live = bool(a.any())
            metrics = {"policy_loss": mb.live_mean(pg), "kl": mb.live_mean(kl),
                       "approx_kl": float(approx_kl(res.log_prob[a], mb.old_log_probs[a])) if live else 0.0,
                       "clipfrac": float(clip_fraction(ratio[a], t.clip_range)) if live else 0.0,
                       "ratio_mean": mb.live_mean(ratio, empty=1.0)}
        return mb.weights * loss_B, metrics


class NFT(Objective):
    """DiffusionNFT (Zheng et al. 2025): flow matching on the rollouts' final images, pulled towards
    an implicit positive policy and pushed from a negative one by each image's optimality
    r = ½ + ½·A/A_max (``losses.nft_loss``), + β·‖v_θ − v_ref‖². No log-probs, no step weights.
    Columns: ``nft_timesteps`` noise levels per image, drawn from the sampler's sigmas each iteration."""

    name = "nft"
    column_name = "noise levels"

    @classmethod
    def columns_per_unit(cls, train, recorded_steps: int) -> int:
        return train.nft_timesteps

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch, generator: torch.Generator) -> None:
        """``nft_timesteps`` noised copies of each final image, x_t = (1−σ)·x₀ + σ·ε with σ drawn from the
        sampler's sigmas, their flow-matching targets ε − x₀ and the rollout policy's velocity there
        (v_old, fixed for the whole update) → ``self.targets``, tensors [n, K, ...]."""
        if batch.finals is None:
            raise ValueError("objective=nft needs the rollout's final latents (RolloutBatch.finals)")
        t = self.train
        n, K = len(batch.prompts), t.nft_timesteps
        grid = self.sde.sigmas[:-1]
        sig = grid[torch.randint(len(grid), (n, K), generator=generator)]
        x0 = batch.finals.float().cpu()[:, None]
        eps = torch.randn((n, K, *x0.shape[2:]), generator=generator)
        sb = sig.reshape(n, K, *([1] * (x0.ndim - 2)))
        x_t = ((1 - sb) * x0 + sb * eps).to(batch.finals.dtype)
        v_old = torch.empty_like(x_t)
        mb = t.micro_batch_size
        dev = self.policy.device
        for a in range(0, n, mb):
            cond = batch.cond[a:a + mb]
            for k in range(K):
                v_old[a:a + mb, k] = self.policy.velocity(x_t[a:a + mb, k].to(dev), sig[a:a + mb, k].to(dev), cond,
                                                          self.guidance_scale).to(v_old.dtype).cpu()
        self.targets = {"x_t": x_t, "sigmas": sig, "target": eps - x0, "v_old": v_old}

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t, prep = self.train, self.targets
        x, sig = prep["x_t"][mb.rows, mb.cols].to(mb.device), prep["sigmas"][mb.rows, mb.cols].to(mb.device)
        v_old, target = prep["v_old"][mb.rows, mb.cols].to(mb.device), prep["target"][mb.rows, mb.cols].to(mb.device)
        r = nft_optimality(mb.advantages, t.adv_clip_max)  # [B]
        v = self.policy.velocity(x, sig, mb.cond, self.guidance_scale)
        loss_B = nft_loss(v, v_old, target, r, t.nft_beta)  # [B]
        kl = torch.zeros_like(loss_B)
        if t.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.policy.velocity(x, sig, mb.cond, self.guidance_scale)
            kl = ((v.float() - v_ref.float()) ** 2).flatten(1).mean(1)
        with torch.no_grad():
            metrics = {"policy_loss": mb.live_mean(loss_B), "kl": mb.live_mean(kl)}
        return loss_B + t.kl_beta * kl, metrics


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (PPOClip, NFT)}
