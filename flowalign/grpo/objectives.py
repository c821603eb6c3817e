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
* ``batch_unit``: ``"unit"`` — micro-batches take the unmasked units in any order. An objective that
  compares units of one group (PRDP's pairs of trajectories of a prompt, DRAGON's demonstration
  pairs) declares ``"group"``: its micro-batches hold whole groups (``micro_batch_size`` a multiple
  of ``group_size``), every group of the iteration including flat ones (the objective decides what a
  flat group contributes), and all units of a group visit the same columns in the same order;
* ``begin(mb)``: once per micro-batch, before its columns (e.g. PRDP's no-grad pass over all steps).

It sees, through ``mb``: the units' transitions (``latents``, ``next_latents``, ``sigmas``,
``sigmas_next`` at the micro-step's column), ``old_log_probs``, ``weights``, ``cond``,
``advantages``, ``rewards`` and ``group_ids``; through ``self``: the flow ``policy`` (current
weights; ``policy.reference()`` is the frozen reference, LoRA off), the ``sde`` policy (log-probs and
means of transitions) and the ``train`` config section.

A new objective is a subclass here, an entry in ``OBJECTIVES`` (the ``train.objective`` value) and
its hyperparameters in ``TrainConfig``; its math goes in its own module as pure functions (PRDP:
``grpo/prdp.py``, DRAGON: ``grpo/dragon.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch

from . import dragon, prdp
from .losses import approx_kl, clip_fraction, mean_kl, nft_loss, nft_optimality, ppo_clip_loss

__all__ = ["RolloutBatch", "MicroBatch", "Objective", "PPOClip", "NFT", "PRDP", "Dragon", "OBJECTIVES"]


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

    def prepare(self, batch: RolloutBatch, generator: torch.Generator) -> dict[str, float] | None:
        """Per-iteration work before the update (none by default) → metrics of the iteration (logged as
        ``train/<key>``) or None."""

    def begin(self, mb: MicroBatch) -> None:
        """Per-micro-batch work before its columns (none by default); ``mb``'s column fields are unused."""

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """→ (loss_B [B] to minimise, metrics over the live rows)."""
        raise NotImplementedError


class PPOClip(Objective):
    """The Flow-GRPO family's objective (Flow-GRPO, DanceGRPO, Pref-GRPO, TempFlow-GRPO, MixGRPO):
    the PPO-clipped ratio of the transition's log-prob under the current policy to the sampling one
    (``losses.ppo_clip_loss``), + β·KL to the reference (``losses.mean_kl``, mean-space, in the
    ``train.kl_form``), times the
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
            kl = mean_kl(res.mean, ref_mean, res.std, t.kl_form, sig - sig_next)  # [B]
            loss_B = pg + t.kl_beta * kl
        a = mb.alive
        with torch.no_grad():
            live = bool(a.any())
            # approx_kl per element, like kl: ½·(mean log-ratio)² is the KL over D² (D latent elements), not D,
            # so unscaled it read ~1e-7 (0.0000) while the policy moved ~0.02 nats per transition
            D = x[0].numel()
            metrics = {"policy_loss": mb.live_mean(pg), "kl": mb.live_mean(kl),
                       "approx_kl": D * float(approx_kl(res.log_prob[a], mb.old_log_probs[a])) if live else 0.0,
                       "clipfrac": float(clip_fraction(ratio[a], t.clip_range)) if live else 0.0,
                       "ratio_mean": mb.live_mean(ratio, empty=1.0),
                       # the trainer keeps its largest value before the iteration's first optimizer step
                       "ratio_dev": float((ratio[a] - 1).abs().max()) if live else 0.0}
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




def _log_probs(obj: Objective, batch: RolloutBatch, rows: torch.Tensor) -> torch.Tensor:
    """log π of every recorded transition of units ``rows`` under the policy as it is now (no gradient)
    → [len(rows), T] float32 on the policy's device; micro-batched by ``train.micro_batch_size``."""
    dev, mb = obj.policy.device, obj.train.micro_batch_size
    T = batch.log_probs.shape[1]
    out = torch.empty(len(rows), T, device=dev)
    with torch.no_grad():
        for a in range(0, len(rows), mb):
            r = rows[a:a + mb]
            cond = batch.cond[r.tolist()]
            for j in range(T):
                x, sig = batch.latents[r, j].to(dev), batch.sigmas[r, j].to(dev)
                v = obj.policy.velocity(x, sig, cond, obj.guidance_scale)
                out[a:a + mb, j] = obj.sde.log_prob(x, batch.next_latents[r, j].to(dev), v, sig,
                                                    batch.sigmas_next[r, j].to(dev)).log_prob.float()
    return out


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _live_group_ids(mb: MicroBatch) -> torch.Tensor:
    """The micro-batch's group ids with each padding row in a group of its own (so it pairs with nothing)."""
    gids = mb.group_ids.clone()
    dead = ~mb.alive
    gids[dead] = -1 - torch.nonzero(dead).flatten()
    return gids


class PRDP(Objective):
    """PRDP (Deng et al., CVPR 2024, arXiv 2402.08714): for pairs of trajectories of one prompt, the
    predicted reward difference β·(r̂ᵃ − r̂ᵇ), r̂ = Σ_t log π_θ/π_ref over the recorded steps, is
    regressed onto the observed one, with the proximal clipping of each step's log-ratio to π_old
    (``grpo/prdp.py``: ``prdp_loss``). Raw rewards, not advantages; flat groups are kept (their target
    is a zero difference). Columns: the recorded steps, a ``timestep_fraction`` of them per epoch.

    The loss couples all steps of both trajectories, so each micro-batch starts (``begin``) with a
    no-grad pass over all its units' steps giving the exact per-(unit, step) weights W =
    ∂ mean_pairs loss / ∂ log π_θ (``prdp_surrogate_weights``); each column then back-propagates
    W·log π_θ, scaled so the columns' gradients add up to the micro-batch's mean-over-pairs gradient.
    ``prepare`` computes the reference's log-probs (``prdp_reference: pretrained``, LoRA off) once per
    iteration and, on these fresh samples at the sampling policy, the relative residual
    rms(Δr̂ − Δr/β) / rms(Δr/β) (1 when the policy predicts nothing, 0 at the optimum) and the
    correlation of Δr̂ with Δr (``train/prdp_*_before``). ``train/prdp_residual_ratio``: at the start of
    each micro-batch, rms of its pairs' residuals now / at the sampling policy, i.e. after the update's
    steps on the iteration's other groups (groups not trained on yet, in the first inner epoch); left out
    for a micro-batch whose residual at sampling is ~0 (under 1e-3 of its target's rms)."""

    name = "prdp"
    batch_unit = "group"

    @classmethod
    def trained_columns(cls, train, columns: int) -> int:
        return max(1, int(columns * train.timestep_fraction))

    def _clip(self) -> float | None:
        return self.train.prdp_clip_range or None

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch, generator: torch.Generator) -> dict[str, float]:
        t = self.train
        self.generator = generator  # the pairs drawn per micro-batch (prdp_pairs_per_group)
        self.ref_log_probs = None
        if t.prdp_reference == "pretrained":
            with self.policy.reference():
                self.ref_log_probs = _log_probs(self, batch, torch.arange(len(batch.prompts))).cpu()
        old = batch.log_probs.float()
        r_hat = prdp.predicted_reward(old, old if self.ref_log_probs is None else self.ref_log_probs)  # [n]
        pairs = prdp.prdp_pairs(batch.group_ids)
        if len(pairs) == 0:
            return {}
        a, b = pairs[:, 0], pairs[:, 1]
        target = (batch.rewards[a] - batch.rewards[b]).float() / t.prdp_beta
        residual = r_hat[a] - r_hat[b] - target
        predicted = residual + target
        corr = torch.corrcoef(torch.stack([predicted, target]))[0, 1] if len(pairs) > 1 else torch.tensor(0.0)
        return {"prdp_residual_rms_before": _rms(residual), "prdp_target_rms": _rms(target),
                "prdp_relative_residual_before": _rms(residual) / max(_rms(target), 1e-12),
                "prdp_correlation_before": float(corr.nan_to_num(0.0))}

    def begin(self, mb: MicroBatch) -> None:
        t = self.train
        lp = _log_probs(self, mb.batch, mb.rows)  # [B, T] at the current weights
        old = mb.batch.log_probs[mb.rows].to(lp.device)
        ref = None if self.ref_log_probs is None else self.ref_log_probs[mb.rows].to(lp.device)
        pairs = prdp.prdp_pairs(_live_group_ids(mb).cpu(), t.prdp_pairs_per_group or None, self.generator).to(lp.device)
        kw = dict(beta=t.prdp_beta, clip_range=self._clip(), ref_log_prob_NT=ref)
        self.W = prdp.prdp_surrogate_weights(lp, old, mb.rewards, pairs, **kw)  # [B, T]
        if len(pairs):
            loss, info = prdp.prdp_loss(lp, old, mb.rewards, pairs, **kw)
            at_sampling, _ = prdp.prdp_loss(old, old, mb.rewards, pairs, beta=t.prdp_beta, clip_range=None,
                                            ref_log_prob_NT=ref)  # the same pairs' squared residuals at π_old
            self.mb_metrics = {"policy_loss": float(loss.mean()), "prdp_residual_rms": _rms(info["residual"]),
                               "prdp_clipped_frac": float(info["clipped"].float().mean()),
                               "clipfrac": float(info["clip_frac"])}
            before = float(at_sampling.mean().sqrt())
            target_rms = _rms((mb.rewards[pairs[:, 0]] - mb.rewards[pairs[:, 1]]).float() / t.prdp_beta)
            # no ratio where there is nothing to predict (every pair's rewards equal) or the sampling policy
            # predicted it already (a residual ~0, e.g. flat groups with π_old = π_ref in iteration 1): any
            # move would read as ~1e9 (it did: 8e8 in a pocket run's first iteration)
            if target_rms > 0 and before > 1e-3 * target_rms:
                self.mb_metrics["prdp_residual_ratio"] = _rms(info["residual"]) / before
        else:
            self.mb_metrics = {}

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        x, sig, sig_next = mb.latents, mb.sigmas, mb.sigmas_next
        v = self.policy.velocity(x, sig, mb.cond, self.guidance_scale)
        lp = self.sde.log_prob(x, mb.next_latents, v, sig, sig_next).log_prob  # [B]
        w = self.W[torch.arange(len(mb), device=self.W.device), mb.cols.to(self.W.device)].to(lp.device)
        # the trainer averages over the B rows and the trained columns: B·T·W·log π makes the columns add
        # up to Σ_{unit, step} W·log π (T/T_train times it, in expectation, when a subset of steps is trained)
        return len(mb) * self.W.shape[1] * w * lp, self.mb_metrics


class Dragon(Objective):
    """DRAGON (Bai et al. 2025, arXiv 2504.15217) on a flow model: the iteration's scored generations are
    split into demonstrations, positive D⁺ and negative D⁻ (``dragon_loss: dpo``: pairs within each
    prompt group, ``dragon_pairs``; ``kto``: the top / bottom ``dragon_fraction`` of each group), and
    the model is trained towards D⁺ and away from D⁻ by a Diffusion-DPO or Diffusion-KTO surrogate in
    velocity space against the frozen reference (LoRA off) (``grpo/dragon.py``). The scores are the
    units' reward totals: an instance-wise reward, an instance-to-distribution one
    (``exemplar_similarity``) or a distribution-to-distribution one (``exemplar_fd``, whose per-image
    score is its leave-one-out gain: whether the generation improves the batch's Fréchet distance).

    Columns: ``dragon_timesteps`` noise levels per unit, drawn from the sampler's sigmas each iteration;
    σ and ε are shared by the units of a group, so both members of a pair are noised alike (as
    Diffusion-DPO does). Units in no demonstration set are not forwarded."""

    name = "dragon"
    column_name = "noise levels"
    batch_unit = "group"

    @classmethod
    def columns_per_unit(cls, train, recorded_steps: int) -> int:
        return train.dragon_timesteps

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch, generator: torch.Generator) -> dict[str, float]:
        if batch.finals is None:
            raise ValueError("objective=dragon needs the rollout's final latents (RolloutBatch.finals)")
        t = self.train
        n, K = len(batch.prompts), t.dragon_timesteps
        if t.dragon_loss == "dpo":
            self.pos, self.neg = dragon.paired_demonstrations(batch.rewards, batch.group_ids, t.dragon_pairs)
        else:
            self.pos, self.neg = dragon.unpaired_demonstrations(batch.rewards, batch.group_ids, t.dragon_fraction)
        self.role = torch.zeros(n, dtype=torch.long)  # 1: in D⁺, -1: in D⁻, 0: neither
        self.role[self.neg], self.role[self.pos] = -1, 1
        # σ and ε per (group, noise level), shared by the group's units
        _, group_of = torch.unique_consecutive(batch.group_ids, return_inverse=True)
        n_groups = int(group_of.max()) + 1
        grid = self.sde.sigmas[:-1]
        sig = grid[torch.randint(len(grid), (n_groups, K), generator=generator)][group_of]  # [n, K]
        x0 = batch.finals.float().cpu()
        eps = torch.randn((n_groups, K, *x0.shape[1:]), generator=generator)[group_of]  # [n, K, C, H, W]
        x_t, target = dragon.flow_noising(x0[:, None].expand_as(eps).flatten(0, 1), sig.flatten(), eps.flatten(0, 1))
        x_t, target = x_t.unflatten(0, (n, K)).to(batch.finals.dtype), target.unflatten(0, (n, K))
        v_ref = torch.zeros_like(x_t)
        demo = torch.nonzero(self.role != 0).flatten()
        dev, mb = self.policy.device, t.micro_batch_size
        with self.policy.reference():
            for a in range(0, len(demo), mb):
                r = demo[a:a + mb]
                cond = batch.cond[r.tolist()]
                for k in range(K):
                    v_ref[r, k] = self.policy.velocity(x_t[r, k].to(dev), sig[r, k].to(dev), cond,
                                                       self.guidance_scale).to(v_ref.dtype).cpu()
        self.targets = {"x_t": x_t, "sigmas": sig, "target": target, "v_ref": v_ref}
        return {"dragon_positives": float(len(self.pos)), "dragon_negatives": float(len(self.neg))}

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t, prep = self.train, self.targets
        B = len(mb)
        keep = torch.nonzero((self.role[mb.rows] != 0) & mb.alive.cpu()).flatten()  # positions in the micro-batch
        empty = len(keep) == 0
        if empty:  # nothing to learn here; a zero loss still runs backward (every process must)
            keep = torch.zeros(1, dtype=torch.long)
        rows, cols = mb.rows[keep], mb.cols[keep]
        get = lambda name: prep[name][rows, cols].to(mb.device)  # noqa: E731
        x, sig, target, v_ref = get("x_t"), get("sigmas"), get("target"), get("v_ref")
        v = self.policy.velocity(x, sig, mb.batch.cond[rows.tolist()], self.guidance_scale)
        loss_B = torch.zeros(B, device=mb.device) + 0.0 * v.float().mean()
        if empty:
            return loss_B, {}
        at = {int(u): i for i, u in enumerate(rows.tolist())}  # unit → position among the forwarded rows
        if t.dragon_loss == "dpo":
            pairs = [(at[int(p)], at[int(q)]) for p, q in zip(self.pos, self.neg) if int(p) in at and int(q) in at]
            if not pairs:
                return loss_B, {}
            a, b = (torch.tensor(c, device=mb.device) for c in zip(*pairs))
            loss_P, info = dragon.diffusion_dpo_loss(v[a], v_ref[a], target[a], v[b], v_ref[b], target[b], t.dragon_beta)
            # the mean over the micro-batch's pairs, carried by the positives' rows
            loss_B = loss_B.index_add(0, keep.to(mb.device)[a], loss_P * B / len(pairs))
            metrics = {"policy_loss": float(loss_P.detach().mean()), "dragon_margin": float(info["margin"].mean()),
                       "dragon_accuracy": float(info["accuracy"])}
        else:
            desirable = self.role[rows] > 0
            loss_k, info = dragon.diffusion_kto_loss(v, v_ref, target, desirable, t.dragon_beta,
                                                     reference_point=_reference_point(t.kto_reference_point))
            loss_B = loss_B.index_add(0, keep.to(mb.device), loss_k * B / len(keep))
            metrics = {"policy_loss": float(loss_k.detach().mean()), "dragon_implicit_reward": float(info["implicit_reward"].mean()),
                       "kto_reference_point": float(info["reference_point"])}
        return loss_B, metrics


def _reference_point(value: str) -> float | str:
    """``train.kto_reference_point``: ``batch`` or a number (validated with the config)."""
    return value if value == "batch" else float(value)


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (PPOClip, NFT, PRDP, Dragon)}
