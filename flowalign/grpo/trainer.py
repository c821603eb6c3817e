"""One GRPO loop for flow models; Flow-GRPO, DanceGRPO, Pref-GRPO, TempFlow-GRPO, MixGRPO and
DiffusionNFT are configs.

One iteration (``GRPOTrainer.train_iteration``), top-down:

1. ``sample_prompts``: ``prompts_per_iteration`` prompts, drawn without replacement epoch by epoch from
   a permutation fixed by (seed, epoch), each repeated ``group_size`` times (a group). The ``P·G``
   images are split into contiguous per-process slices, so a group may span processes.
2. ``rollout``: initial noise for all ``P·G`` images (the same images whatever the number of
   processes), rolled out by the SDE policy (``sampling.SDEPolicy``: plan, SDE kind, noise level) into
   training *units*: one per image, or with TempFlow branching one per (image, branch step, branch),
   whose group is (prompt group, branch step).
3. ``score``: the rewards on this process's images, gathered, so the advantages
   (``advantages.multi_reward_advantages``) use whole groups; each process keeps its slice.
4. ``update``: per inner epoch, the units of flat groups are left out (masked), the rest visited in
   micro-batches × trained columns; each micro-step back-propagates the objective's loss
   (``objectives``: PPO-clip + KL, NFT, PRDP or DRAGON), an optimizer step every
   ``gradient_accumulation_steps`` micro-batches, then the EMA. An objective that compares the units
   of a group (``batch_unit = "group"``: PRDP, DRAGON) gets micro-batches of whole groups, all of them
   (flat ones too), shuffled group by group, with one column order per group.
5. (``train``) evaluation every ``eval.every`` iterations, metrics, checkpoints; the final export.

Where the rest lives: ``grpo/config.py`` (the train/eval sections, ``Sizes``), ``grpo/objectives.py``
(the losses of a micro-step), ``grpo/state.py`` (checkpoints, resume, EMA, final export),
``grpo/evaluation.py`` (held-out eval), ``grpo/advantages.py`` and ``grpo/losses.py`` (the math),
``grpo/logging.py`` (metrics files).

All randomness of an iteration comes from generators seeded by (run seed, iteration, ``Stream``,
rank), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError, save_config, to_yaml
from ..errors import UserError, check_output_dir
from ..io import check_safetensors
from ..prompts import read_prompts
from ..rewards.base import check_prompts, needs_groups
from ..rewards.pairwise import judge_counts
from ..sampling.policy import SDEPolicy, Units
from ..sampling.rollout import group_noise
from ..seeding import seeded_generator
from ..torch_utils import full_tensor, local_tensor, resolve_device, resolve_dtype
from .advantages import multi_reward_advantages
from .config import Config, Sizes
from .evaluation import Evaluator
from .losses import timestep_weights
from .objectives import OBJECTIVES, MicroBatch, RolloutBatch
from .state import TrainingStopped, TrainState

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["GRPOTrainer", "RolloutBatch", "Stream", "train"]

_MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


class Stream(enum.IntEnum):
    """What each seeded generator of an iteration draws: seeded by (run seed, iteration, stream, ...)."""

    NOISE = 1  # the iteration's initial noise (every process draws all images, keeps its slice)
    PLAN = 2  # the plan (a random window's start)
    SDE = 3  # the rollout's SDE noise (per process)
    SHUFFLE = 4  # the update's order of units and columns (per inner epoch and process)
    EVAL_NOISE = 5  # the evaluation noise (seeded by eval.seed and image index instead)
    OBJECTIVE = 6  # the objective's own draws, e.g. NFT's noise levels (per process)
    SIZES = 7  # the plan drawn to size the start-up summary
    PROMPTS = 11  # the prompt permutation of each epoch of the prompt file (seeded by run seed and epoch)


def _forget_single_process_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another mixed
    precision; in one process (a notebook running a bf16 recipe, then an fp32 one) that is not a
    conflict, so the old state is dropped. Launched processes (WORLD_SIZE > 1) are left alone."""
    from accelerate.state import AcceleratorState

    old = AcceleratorState._shared_state.get("_mixed_precision")
    if old is not None and old != mixed_precision and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


class GRPOTrainer:
    """Build with a ``Config``; ``policy``/``reward`` may be passed in already loaded (notebooks, tests).

    Components: ``acc`` (accelerate), ``policy`` (the flow model, LoRA or full), ``sde`` (the SDE
    policy of the rollouts), ``objective``, ``reward`` and ``evaluator``, ``state`` (optimizer, EMA,
    checkpoints, export) and ``sizes`` (what an iteration handles)."""

    def __init__(self, cfg: Config, *, policy=None, reward=None, eval_reward=None, accelerator=None, log=print):
        from accelerate import Accelerator

        self.cfg, self.log = cfg, log
        t, s = cfg.train, cfg.sampling
        if accelerator is None:  # before accelerate picks this process's GPU, which fails with a CUDA error
            check_launch(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count(), cfg.model.device)
        if accelerator is None:
            _forget_single_process_precision(_MIXED_PRECISION[t.mixed_precision])
        self._owns_acc = accelerator is None  # close() ends only the process group this trainer started
        self.acc = accelerator or Accelerator(mixed_precision=_MIXED_PRECISION[t.mixed_precision],
                                              cpu=cfg.model.device == "cpu")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.output_dir = Path(cfg.run.output_dir)
        self.prompts = read_prompts(t.prompts)
        self.eval_prompts = read_prompts(cfg.eval.prompts) if cfg.eval.prompts else None
        self._check_before_loading(policy)
        self.reward, eval_reward = self._load_rewards(reward, eval_reward)
        check_prompts(self.reward, self.prompts, f"train.prompts={t.prompts}")
        if self.eval_prompts is not None and eval_reward is not None:
            check_prompts(eval_reward, self.eval_prompts, f"eval.prompts={cfg.eval.prompts}")
        self.policy = self._load_policy(policy)
        self.device = self.policy.device
        self.sde = SDEPolicy.from_config(s, self.policy.sigmas(s.num_steps, s.height, s.width, s.shift))
        self.latent_shape = self.policy.latent_shape(s.height, s.width)
        self.sizes = self._sizes()
        self.state = self._build_state()
        self.objective = OBJECTIVES[t.objective](t, self.policy, self.sde, s.guidance_scale)
        self.evaluator = None
        if self.eval_prompts is not None and eval_reward is not None:
            self.evaluator = Evaluator(self.eval_prompts, eval_reward, cfg.eval, s, self.latent_shape,
                                       noise_stream=Stream.EVAL_NOISE, output_dir=self.output_dir)
        self.iteration = 0
        self._ratio_warned = False  # the ratio check warns once per run; the metric is logged every iteration

    def _check_before_loading(self, policy) -> None:
        """What can fail without a model, checked before minutes go into loading one: the output folder
        can be written, the device exists, a LoRA to start from is whole (``UserError`` otherwise)."""
        from ..models import check_model_files

        check_output_dir(self.output_dir, "run.output_dir")
        if policy is None:
            m = self.cfg.model
            if m.device != "auto":
                resolve_device(m.device, "model.device")
            check_model_files(m)
            if m.lora_init_path is not None:
                if not Path(m.lora_init_path).expanduser().is_dir():
                    raise UserError(f"model.lora_init_path={m.lora_init_path!r} is not a folder; give a folder "
                                    "written by save_adapter() (e.g. runs/x/final/lora)")
                check_safetensors(m.lora_init_path, "model.lora_init_path")

    def _load_policy(self, policy):
        """The given policy, or the configured one (LoRA initialised from the run seed, the same on every
        process); it must be a flow model."""
        from accelerate.utils import set_seed

        set_seed(self.cfg.run.seed)
        if policy is None:
            from ..models import load_policy

            model_cfg = self.cfg.model
            if model_cfg.device == "auto":
                model_cfg = dataclasses.replace(model_cfg, device=str(self.acc.device))
            policy = load_policy(model_cfg)
        if not hasattr(policy, "velocity"):
            raise ConfigError(f"GRPO trains flow models; {type(policy).__name__} has no velocity()")
        return policy

    def _load_rewards(self, reward, eval_reward):
        """(training reward, eval reward or None): given or built from the config; without
        ``eval.rewards`` the eval reuses the training reward unless it needs groups (eval images have none)."""
        from ..rewards import build_rewards

        cfg = self.cfg
        reward = reward if reward is not None else build_rewards(cfg.rewards)
        if eval_reward is None and self.eval_prompts is not None:
            if cfg.eval.rewards:
                eval_reward = build_rewards(cfg.eval.rewards)
            elif not needs_groups(reward):
                eval_reward = reward
        return reward, eval_reward

    def _sizes(self) -> Sizes:
        t = self.cfg.train
        plan = self.sde.plan(0, self._gen(0, Stream.SIZES))  # sizes do not depend on the draw
        sizes = Sizes.of(self.cfg, self.world, units_per_image=self.sde.units_per_image(plan),
                         recorded_steps_per_unit=self.sde.steps_per_unit(plan))
        if needs_groups(self.reward) and t.prompts_per_iteration % self.world:
            raise ConfigError(
                f"a reward that needs groups (win_rate) judges whole groups on one process: train.prompts_per_iteration="
                f"{t.prompts_per_iteration} must be a multiple of the {self.world} processes"
            )
        return sizes

    def _build_state(self) -> TrainState:
        """The trainable parameters, AdamW, the distributed wrapper of the denoiser and the EMA. The parameters
        (and so the EMA) are taken after ``accelerator.prepare``: FSDP replaces them with shards."""
        t = self.cfg.train
        params = self.policy.trainable_parameters()
        if not params:
            raise ConfigError("the policy has no trainable parameters; use model.train_mode=lora or full")
        self._check_sharding()
        if self.policy.train_mode == "full" and t.kl_beta > 0:  # the initial weights, before any wrapper shards them
            self.policy.attach_reference(self._frozen_reference())
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self._wrapped, optimizer = self.acc.prepare(self.policy.denoiser, opt)
        self.policy.wrap_denoiser(self._wrapped)
        named = [(n, p) for n, p in self.policy.denoiser.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        assert [id(p) for g in optimizer.optimizer.param_groups for p in g["params"]] == [id(p) for p in params]
        m = self.cfg.model  # a checkpoint's weights fit only a model built with the same settings
        settings = {f"model.{k}": getattr(m, k) for k in ("family", "train_mode", "lora_rank", "lora_alpha",
                                                          "lora_targets")}
        return TrainState(self.acc, self.output_dir, params, names, optimizer, device=self.device,
                          ema_decay=t.ema_decay if t.ema else None, ema_every=t.ema_every, ema_warmup=t.ema_warmup,
                          keep_checkpoints=self.cfg.run.keep_checkpoints,
                          prompts_per_iteration=t.prompts_per_iteration, settings=settings, model=self._wrapped)

    def _check_sharding(self) -> None:
        """FSDP runs as FSDP2 (``fully_shard``: parameters keep their names, LoRA's frozen base and trainable
        adapters may share a wrapped block); FSDP1's flat parameters are refused with the fix."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.FSDP:
            return
        plugin = self.acc.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ConfigError(
                f"the accelerate launch file asks for FSDP version {plugin.fsdp_version}; flowalign trains with FSDP2 "
                "(per-parameter sharding, which LoRA's mix of frozen and trainable weights in one block needs): set "
                "fsdp_config.fsdp_version: 2 (see configs/accelerate/fsdp_full_ft.yaml)")

    def _frozen_reference(self):
        """Full fine-tuning's KL reference: a frozen copy of the denoiser as loaded (``train.reference_device``,
        ``train.reference_dtype``)."""
        from .reference import FrozenReference

        t, model_dtype = self.cfg.train, self.policy.dtype
        return FrozenReference(self.policy.denoiser, device="cpu" if t.reference_device == "cpu" else self.device,
                               dtype=model_dtype if t.reference_dtype == "model" else resolve_dtype(t.reference_dtype),
                               model_dtype=model_dtype, out_device=self.device)

    def _gen(self, iteration: int, stream: Stream, *more: int, device="cpu") -> torch.Generator:
        return seeded_generator(self.cfg.run.seed, iteration, stream, *more, device=device)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def params(self) -> list[torch.Tensor]:
        return self.state.params

    @property
    def optimizer(self):
        return self.state.optimizer

    @property
    def sigmas(self) -> torch.Tensor:
        """The rollout schedule, N+1 sigmas."""
        return self.sde.sigmas

    def summary(self) -> dict:
        """Derived quantities printed at start-up."""
        return self.sizes.summary(self.cfg.train.objective, sum(p.numel() for p in self.params))

    # ------------------------------------------------------------------ the iteration
    def train_iteration(self, iteration: int) -> dict:
        t0 = time.time()
        batch = self.rollout(iteration)  # 1-2. prompts → SDE rollouts → training units and images
        t1 = time.time()
        metrics = self.score(batch)  # 3. rewards → group-relative advantages
        t2 = time.time()
        metrics.update(self.update(batch, iteration))  # 4. inner epochs × micro-batches × the objective
        t3 = time.time()
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2,
                        "time/iteration_s": t3 - t0})
        return metrics

    # ------------------------------------------------------------------ 1. prompts
    def sample_prompts(self, iteration: int) -> list[int]:
        """Indices of the ``prompts_per_iteration`` prompts of ``iteration`` (same on every process)."""
        P, n = self.cfg.train.prompts_per_iteration, len(self.prompts)
        out = []
        for pos in range(iteration * P, (iteration + 1) * P):
            epoch, k = divmod(pos, n)
            perm = torch.randperm(n, generator=seeded_generator(self.cfg.run.seed, epoch, Stream.PROMPTS))
            out.append(int(perm[k]))
        return out

    # ------------------------------------------------------------------ 2. rollout
    @torch.no_grad()
    def rollout(self, iteration: int, prompt_ids: list[int] | None = None) -> RolloutBatch:
        """The iteration's groups: ``prompt_ids`` (indices into the training prompts, one per group;
        default ``sample_prompts(iteration)``), noise and SDE draws seeded by (seed, iteration)."""
        s, t, z = self.cfg.sampling, self.cfg.train, self.sizes
        n, lo = z.images_per_process, self.rank * z.images_per_process
        ids = self.sample_prompts(iteration) if prompt_ids is None else list(prompt_ids)
        if len(ids) != z.groups:
            raise ValueError(f"rollout needs {z.groups} prompt ids (train.prompts_per_iteration), got {len(ids)}")
        rows = [self.prompts[i] for i in ids]
        noise = group_noise(z.groups, z.group_size, self.latent_shape, shared=s.share_group_noise,
                            generator=self._gen(iteration, Stream.NOISE))[lo:lo + n].to(self.device)
        gids = torch.arange(lo, lo + n) // z.group_size  # [n] prompt group of each image
        prompts = [rows[g]["prompt"] for g in gids.tolist()]
        metas = [{k: v for k, v in rows[g].items() if k != "prompt"} for g in gids.tolist()]
        cond = self.policy.encode(prompts)
        plan = self.sde.plan(iteration, self._gen(iteration, Stream.PLAN))
        sde_gen = self._gen(iteration, Stream.SDE, self.rank, device=self.device)
        chunk = s.batch_size or n
        units = Units.cat([self.sde.rollout(self._velocity(cond[a:a + chunk]), noise[a:a + chunk], plan, sde_gen)
                           for a in range(0, n, chunk)])
        # each unit inherits its image's prompt and conditioning; its group is (prompt group, subgroup)
        r = units.per_image
        gids = gids.repeat_interleave(r) * units.subgroups + units.subgroup
        prompts = [p for p in prompts for _ in range(r)]
        metas = [{**m, "group_id": int(g)} for m, g in zip([m for m in metas for _ in range(r)], gids.tolist())]
        weights = timestep_weights(t.timestep_weighting, self.sde.step_stds(plan))[units.steps]  # [n·r, T]
        images = torch.cat([self.policy.decode(units.finals[a:a + chunk]) for a in range(0, len(units), chunk)])
        return RolloutBatch(prompts, metas, gids, cond.repeat_interleave(r), units.latents, units.next_latents,
                            units.log_probs, units.sigmas.contiguous(), units.sigmas_next.contiguous(),
                            weights.contiguous(), images, finals=units.finals)

    def _velocity(self, cond):
        """A rollout's velocity on rows of ``cond``; branch steps hold K rows per conditioning row (contiguous)."""
        guidance = self.cfg.sampling.guidance_scale

        def velocity(x, sigma):
            k = x.shape[0] // len(cond)
            return self.policy.velocity(x, sigma, cond if k == 1 else cond.repeat_interleave(k), guidance)

        return velocity

    # ------------------------------------------------------------------ 3. rewards → advantages
    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> dict:
        """Rewards of this process's units, gathered; the group-relative advantages of its slice."""
        t = self.cfg.train
        total, info = self.reward(batch.images, batch.prompts, batch.metadata)
        per_reward = info.get("per_reward", {self.reward.name: total}) if isinstance(info, dict) else {}
        weights = info.get("weights", {self.reward.name: 1.0})
        g_ids = self._gather(batch.group_ids.to(self.device))
        g_per = {k: self._gather(v.float().to(self.device)) for k, v in per_reward.items()}
        judge = self._judge_metrics(info)  # before the check below: a failing judge stops the run here
        for k, v in g_per.items():
            if not bool(torch.isfinite(v).all()):
                raise TrainingStopped(f"reward {k} returned {int((~torch.isfinite(v)).sum())} non-finite scores "
                                      f"of {len(v)}; fix the reward (a NaN score has no advantage)")
        adv, masked = multi_reward_advantages(g_per, weights, g_ids, mode=t.reward_normalization,
                                              std_mode=t.std_mode, clip_max=t.adv_clip_max,
                                              unbiased=t.adv_std == "unbiased", eps=t.adv_eps)
        g_total = sum(weights[k] * v for k, v in g_per.items())
        lo, n = self.rank * len(batch.prompts), len(batch.prompts)
        batch.advantages, batch.masked = adv[lo:lo + n].cpu(), masked[lo:lo + n].cpu()
        batch.rewards = g_total[lo:lo + n].cpu()
        metrics = {"reward/total/mean": g_total.mean().item(), "reward/total/std": g_total.std().item(),
                   "train/zero_std_frac": masked.float().mean().item(),
                   "train/adv_abs_mean": adv.abs().mean().item()}
        for k, v in g_per.items():
            metrics[f"reward/{k}/mean"] = v.mean().item()
            metrics[f"reward/{k}/std"] = v.std().item()
        return {**metrics, **judge}

    def _judge_metrics(self, info) -> dict:
        """``judge/requests``, ``judge/failures``, ``judge/ties_from_failures`` over all processes, for rewards
        that ask a judge (``rewards.pairwise.judge_counts``); a warning line when some failed, and
        ``TrainingStopped`` past ``train.judge_failure_limit`` (or when all failed) with
        ``train.judge_on_failure=error``."""
        counts = judge_counts(info)
        if counts is None:
            return {}
        keys = list(counts)
        summed = self._gather(torch.tensor([[counts[k] for k in keys]], device=self.device)).sum(0).tolist()
        metrics = {f"judge/{k}": int(v) for k, v in zip(keys, summed)}
        requests, failures = metrics["judge/requests"], metrics["judge/failures"]
        if failures == 0:
            return metrics
        t = self.cfg.train
        what = f"the judge failed {failures} of {requests} requests ({failures / requests:.0%})"
        if t.judge_on_failure == "error" and (failures / requests > t.judge_failure_limit or failures == requests):
            raise TrainingStopped(
                f"{what}, past train.judge_failure_limit={t.judge_failure_limit}: is the judge server up, and its "
                f"endpoint and API key right? (train.judge_on_failure=warn goes on, scoring failures as ties)",
                metrics=metrics)
        self._warn(f"iteration {self.iteration + 1}: {what}; scored as ties")
        return metrics

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x.contiguous()) if self.world > 1 else x

    # ------------------------------------------------------------------ 4. policy update
    def update(self, batch: RolloutBatch, iteration: int) -> dict:
        """The objective on the unmasked units: per inner epoch, micro-batches × trained columns."""
        t = self.cfg.train
        prepared = self.objective.prepare(batch, self._gen(iteration, Stream.OBJECTIVE, self.rank)) or {}
        T = self.objective.columns_per_unit(t, batch.log_probs.shape[1])  # columns per unit
        T_train = self.objective.trained_columns(t, T)  # visited per unit and epoch
        # whole groups (every one: the objective weighs flat groups itself), or the units of groups with a signal
        grouped = self.objective.batch_unit == "group"
        G = self.sizes.group_size if grouped else 1  # units kept together, contiguous in the batch
        idx = torch.arange(len(batch.prompts)) if grouped else torch.nonzero(~batch.masked).flatten()
        # every process must run the same number of backward passes (DDP): pad with weight-0 rows
        n_train = int(self._gather(torch.tensor([len(idx)], device=self.device)).cpu().max())
        if n_train == 0:
            return {"train/optimizer_steps": 0}
        mb, accumulate = t.micro_batch_size, t.gradient_accumulation_steps
        n_micro = math.ceil(n_train / mb)
        stats: dict[str, list] = {"grad_norm": []}
        steps = 0
        ratio_dev = None  # largest |ratio - 1| before the first optimizer step, where the ratio must be 1
        loss_sum = torch.zeros((), device=self.device)  # what was back-propagated since the last step
        for epoch in range(t.num_inner_epochs):
            g = self._gen(iteration, Stream.SHUFFLE, epoch, self.rank)
            # [n_train] unit per row (whole groups in a row when grouped); live False: padding
            order, live = _shuffled(idx, n_train, g, per=G)
            cols = _columns(len(batch.prompts), T, T_train, t.shuffle_timesteps, g, per=G)  # [n, T_train]
            # one optimizer step per `accumulate` micro-batches (written out rather than accelerate's
            # accumulate(): a step averages over its own micro-batches × columns, the last one over fewer)
            for first in range(0, n_micro, accumulate):
                group = range(first, min(first + accumulate, n_micro))
                for m in group:
                    rows, alive = order[m * mb:(m + 1) * mb], live[m * mb:(m + 1) * mb]
                    self.objective.begin(MicroBatch(batch, rows, cols[rows, 0], alive, self.device))
                    for j in range(T_train):
                        # gradients are all-reduced across processes once per step, at its last backward
                        with self._grad_sync(m == group[-1] and j == T_train - 1):
                            out, loss = self._micro_step(batch, rows, cols[rows, j], alive,
                                                         scale=1.0 / (T_train * len(group)))
                        loss_sum += loss
                        dev = out.pop("ratio_dev", None)
                        if dev is not None and steps == 0:
                            ratio_dev = max(dev, ratio_dev or 0.0)
                        for k, v in out.items():
                            stats.setdefault(k, []).append(v)
                # (clipping to inf measures the norm and leaves the gradients as they are)
                grad_norm = self.acc.clip_grad_norm_(self.params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
                grad_norm = full_tensor(grad_norm)  # FSDP: a replicated DTensor
                if t.max_grad_norm > 0:
                    stats["grad_norm"].append(float(grad_norm))
                self._check_finite_step(loss_sum, grad_norm)
                loss_sum.zero_()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._check_finite_parameters()
                self.state.ema_update()
                steps += 1
        return {**{f"train/{k}": v for k, v in prepared.items()}, **{f"train/{k}": _mean(v) for k, v in stats.items()},
                "train/optimizer_steps": steps, **self._ratio_check(ratio_dev, iteration)}

    def _ratio_check(self, dev: float | None, iteration: int) -> dict:
        """``train/ratio_dev_first_step``: the largest |ratio - 1| over all processes before the iteration's
        first optimizer step, where the policy is still the rollout's and the recomputed log-prob must equal
        the recorded one (objectives without a ratio report none). Past ``train.ratio_dev_warn`` (default
        the clip range: PPO would clip on numerical noise) a warning line names what to check, the first time."""
        if dev is None:
            return {}
        t = self.cfg.train
        dev = float(self._gather(torch.tensor([dev], device=self.device)).max())
        limit = t.ratio_dev_warn if t.ratio_dev_warn is not None else t.clip_range
        if dev > limit and not self._ratio_warned:
            self._ratio_warned = True
            self._warn(f"iteration {iteration + 1}: before any update the recomputed log-probs differ from the "
                     f"rollout's (largest |ratio - 1| = {dev:.3g} > {limit:g}, train.ratio_dev_warn): the update sees "
                     "other numbers than the rollout did; check train.mixed_precision and model.dtype, and that a "
                     "row's velocity does not depend on its batch (sampling.batch_size vs train.micro_batch_size); "
                     "warned once, train/ratio_dev_first_step is logged every iteration")
        return {"train/ratio_dev_first_step": dev}

    def _micro_step(self, batch: RolloutBatch, rows, cols, alive, scale: float) -> tuple[dict, torch.Tensor]:
        """The objective's loss on units ``rows`` at columns ``cols``, averaged over the rows (padding rows
        weigh 0) and times ``scale``; backward. → (the objective's metrics, the back-propagated loss)."""
        mb = MicroBatch(batch, rows, cols, alive, self.device)
        loss_B, metrics = self.objective.loss(mb)
        loss = (mb.alive.float() * loss_B).sum() / len(mb) * scale
        self.acc.backward(loss)
        return metrics, loss.detach().float()

    def _check_finite_step(self, loss, grad_norm) -> None:
        """Before an optimizer step: the step's loss and gradient norm are finite on every process, else
        ``TrainingStopped``. (With fp16 loss scaling an inf gradient is routine: the scaler skips the step.)"""
        flags = torch.stack([torch.isfinite(loss), torch.isfinite(torch.as_tensor(grad_norm, device=self.device))])
        loss_ok, grad_ok = self._gather(flags[None].float()).min(0).values.bool().tolist()
        if not loss_ok:
            raise TrainingStopped("the loss is not finite; lower train.lr (or check the reward and train.clip_range)")
        if not grad_ok and self.acc.scaler is None:
            raise TrainingStopped(f"the gradient norm is {float(grad_norm)}; lower train.lr or set train.max_grad_norm")

    def _check_finite_parameters(self) -> None:
        """After an optimizer step: every trainable parameter is finite on every process (each may hold a
        shard), else ``TrainingStopped``."""
        finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in self.params]).all().float()
        if not bool(self._gather(finite[None]).min()):
            raise TrainingStopped("a trainable parameter is not finite after the optimizer step; lower train.lr")

    def _grad_sync(self, sync: bool):
        """A backward's context: gradients all-reduced across processes (``sync``) or kept local."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self._wrapped)

    def policy_gradient(self, batch: RolloutBatch, rows=None, iteration: int = 0) -> torch.Tensor:
        """The gradient of the configured objective (GRPO, or nft with the noise levels drawn for
        ``iteration``) over ``rows`` of a scored batch (default: every unmasked unit), all recorded steps
        (noise levels), flattened over the trainable parameters; nothing is stepped and the parameters'
        ``.grad`` is left empty. For diagnostics: the cosine between the gradients of independent
        batches measures how much of an update is signal (``benchmarks/grpo_gradient_snr.py``). For an
        objective that compares units of a group (prdp, dragon), ``rows`` must be whole groups in batch
        order (default: every unit)."""
        if batch.advantages is None:
            raise ValueError("score(batch) first: the gradient needs the advantages")
        t = self.cfg.train
        grouped = self.objective.batch_unit == "group"
        if rows is None:
            rows = torch.arange(len(batch.prompts)) if grouped else torch.nonzero(~batch.masked).flatten()
        rows = torch.as_tensor(rows)
        self.objective.prepare(batch, self._gen(iteration, Stream.OBJECTIVE, self.rank))
        T = self.objective.columns_per_unit(t, batch.log_probs.shape[1])
        self.optimizer.zero_grad(set_to_none=True)
        for a in range(0, len(rows), t.micro_batch_size):
            chunk = rows[a:a + t.micro_batch_size]
            self.objective.begin(MicroBatch(batch, chunk, torch.zeros(len(chunk), dtype=torch.long),
                                            torch.ones(len(chunk), dtype=torch.bool), self.device))
            for j in range(T):
                self._micro_step(batch, chunk, torch.full((len(chunk),), j), torch.ones(len(chunk), dtype=torch.bool),
                                 scale=len(chunk) / (T * max(1, len(rows))))
        grad = torch.cat([full_tensor(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
                          for p in self.params])  # (under FSDP every process calls this: the shards are gathered)
        self.optimizer.zero_grad(set_to_none=True)
        return grad

    # ------------------------------------------------------------------ 5. evaluation
    def evaluate(self, iteration: int) -> dict:
        """The eval metrics of the current (EMA) weights, computed by the main process."""
        metrics = {}
        if self.evaluator is not None:
            if self.is_main:
                with self.local_denoiser() as policy, self.state.ema_weights():
                    metrics = self.evaluator(policy, iteration)
            elif self.state.sharded:  # every process takes part in the sharded forwards; the main one scores
                with torch.no_grad(), self.local_denoiser() as policy, self.state.ema_weights():
                    self.evaluator.sample(policy)
            self.acc.wait_for_everyone()
        return metrics

    @contextlib.contextmanager
    def local_denoiser(self):
        """The policy with its bare denoiser (no distributed wrapper) inside the context: for sampling on
        one process (eval, notebooks, diagnostics), where a wrapper's collective ops would hang. Under FSDP
        the module itself holds shards: every process must sample alongside (``evaluate`` does)."""
        self.policy.wrap_denoiser(None)
        try:
            yield self.policy
        finally:
            self.policy.wrap_denoiser(self._wrapped)

    # ------------------------------------------------------------------ the loop
    def close(self) -> None:
        """End the run's process group (a no-op on one process, and for an accelerator passed in). Call it (or use
        the trainer as a context manager) before a launched process exits: a process leaving with the group's
        threads alive is aborted by the C++ runtime ("terminate called without an active exception")."""
        if self._owns_acc:
            self.acc.end_training()
            self._owns_acc = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def train(self) -> dict:
        """Run (or resume) to ``train.num_iterations``; returns the last eval metrics."""
        cfg, n = self.cfg, self.cfg.train.num_iterations
        start = self._resume()
        logger = self._open_log(start)
        last_eval: dict = {}
        if start == 0 and cfg.eval.at_start and self.eval_prompts is not None:
            last_eval = self.evaluate(0)
            if logger is not None and last_eval:
                logger.log(0, last_eval)
        bar = self._progress_bar(start)
        for it in range(start, n):
            try:
                metrics = self.train_iteration(it)
            except TrainingStopped as err:
                if logger is not None and err.metrics:
                    logger.log(it + 1, err.metrics)
                raise self._stopped(it + 1, err) from None
            done = self.iteration = it + 1
            if done % cfg.eval.every == 0 or done == n:
                if ev := self.evaluate(done):
                    last_eval = ev
                    metrics.update(ev)
            if logger is not None and (done % cfg.run.log_every == 0 or done == n):
                logger.log(done, metrics)
            if bar is not None:
                bar.set_postfix({"reward": f"{metrics['reward/total/mean']:.3f}",
                                 **({"eval": f"{last_eval['eval/reward']:.3f}"} if "eval/reward" in last_eval else {})})
                bar.update(1)
            if done % cfg.run.save_every == 0 or done == n:
                try:
                    self.state.save(done)
                except TrainingStopped as err:
                    raise self._stopped(done, err) from None
        if bar is not None:
            bar.close()
        self.state.export(self.policy)
        if logger is not None:
            logger.close()
        return last_eval

    def _stopped(self, iteration: int, err: TrainingStopped) -> TrainingStopped:
        """``err`` naming the iteration and the checkpoint a resume continues from (untouched by the stop)."""
        kept = self.state.checkpoints()
        where = (f"the last good checkpoint is {kept[-1]}, a resume continues from it" if kept
                 else "no checkpoint was written")
        return TrainingStopped(f"stopped at iteration {iteration}: {err}; {where}")

    def _warn(self, message: str) -> None:
        if self.is_main:
            print(f"flowalign train: warning: {message}", file=sys.stderr)

    def _resume(self) -> int:
        """The iteration to start from: the newest intact checkpoint's (with ``run.resume``; newer damaged
        ones are warned about), else 0. Temp folders of writes a killed run left are removed first."""
        for stale in self.state.remove_partial_writes():
            self._warn(f"removed {stale}, left by an interrupted write")
        if self.cfg.run.resume and (ck := self.state.latest(warn=self._warn)) is not None:
            self.iteration = self.state.load(ck)
            if self.is_main:
                self.log(f"resumed from {ck} (iteration {self.iteration})")
            return self.iteration
        return 0

    def _open_log(self, start: int):
        """Main process: the run folder's config.yaml, the metrics logger (from ``start``), the summary line."""
        if not self.is_main:
            return None
        from .logging import MetricsLogger

        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.output_dir / "config.yaml")
        logger = MetricsLogger(self.output_dir, self.cfg.run.tracker, config=_as_dict(self.cfg),
                               resume_iteration=start if start else -1)
        self.log("flowalign train: " + ", ".join(f"{k}={v}" for k, v in self.summary().items()))
        return logger

    def _progress_bar(self, start: int):
        if not (self.is_main and self.cfg.run.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.num_iterations, initial=start, desc="grpo", dynamic_ncols=True,
                    file=sys.stderr)


def check_launch(local_processes: int, gpus: int, device: str) -> None:
    """``UserError`` when a launch does not match the machine: more processes on this machine
    (``accelerate launch``'s num_processes / num_machines) than it has GPUs, for a model on the GPU
    (``model.device`` auto or cuda; a machine without any is ``model.device``'s own error)."""
    on_gpu = gpus > 0 and (device == "auto" or device.startswith("cuda"))
    if on_gpu and local_processes > gpus:
        raise UserError(
            f"{local_processes} processes were launched on this machine, which has {gpus} GPU(s): the accelerate "
            f"launch file (num_processes / num_machines) does not match it; launch with --num_processes {gpus} "
            f"(times the number of machines), or use a launch file for this machine (configs/accelerate/)")


def _shuffled(idx: torch.Tensor, n: int, g: torch.Generator, per: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx`` in a random order of its consecutive blocks of ``per`` units (whole groups; 1: single units),
    padded to ``n`` rows by repeating its first block → (units [n], live [n]: False for padding rows)."""
    blocks = idx.reshape(-1, per)
    order = blocks[torch.randperm(len(blocks), generator=g)].flatten()
    live = torch.ones(n, dtype=torch.bool)
    if len(order) < n:
        live[len(order):] = False
        filler = order[:per] if len(order) else torch.zeros(per, dtype=torch.long)
        order = torch.cat([order, filler.repeat((n - len(order)) // per)])
    return order, live


def _columns(n: int, T: int, T_train: int, shuffle: bool, g: torch.Generator, per: int = 1) -> torch.Tensor:
    """The columns each of ``n`` units trains this epoch → [n, T_train]: a random subset in random order
    per block of ``per`` consecutive units (a prompt group when grouped), or the first ``T_train``."""
    if shuffle:
        perms = torch.stack([torch.randperm(T, generator=g) for _ in range(n // per)])[:, :T_train]
        return perms.repeat_interleave(per, dim=0)
    return torch.arange(T)[:T_train].expand(n, T_train)


def _mean(values: list) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _as_dict(cfg: Config) -> dict:
    import yaml

    return yaml.safe_load(to_yaml(cfg))


def train(cfg: Config, **kwargs) -> dict:
    """Build a ``GRPOTrainer`` from ``cfg``, run it and end its process group (what ``flowalign train`` does)."""
    with GRPOTrainer(cfg, **kwargs) as trainer:
        return trainer.train()
