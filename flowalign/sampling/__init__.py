"""Sampling core: schedules, ODE/SDE steps with log-probs, rollout plans and the rollout loop.

Pure tensor code; no model library is imported here.
"""

from .plans import (
    RolloutPlan,
    branching_plan,
    full_sde_plan,
    plan_from_config,
    progressive_window_plan,
    random_window_plan,
    window_plan,
)
from .policy import SDEPolicy, Units
from .rollout import BranchedTrajectory, Trajectory, group_noise, rollout, rollout_branched
from .schedules import exponential_time_shift, flux_mu, flux_sigmas, sd3_sigmas, shift_sigmas
from .steps import (
    SDE_KINDS,
    STEP_KINDS,
    StepResult,
    cps_mean_std,
    dance_mean_std,
    flow_grpo_mean_std,
    gaussian_log_prob,
    ode_step,
    sde_step,
    step_mean_std,
    step_std,
    transition_log_prob,
)

__all__ = [
    "RolloutPlan", "branching_plan", "full_sde_plan", "plan_from_config", "progressive_window_plan", "random_window_plan",
    "window_plan", "SDEPolicy", "Units", "BranchedTrajectory", "Trajectory", "group_noise", "rollout", "rollout_branched",
    "exponential_time_shift", "flux_mu", "flux_sigmas", "sd3_sigmas", "shift_sigmas", "SDE_KINDS",
    "STEP_KINDS", "StepResult", "cps_mean_std", "dance_mean_std", "flow_grpo_mean_std",
    "gaussian_log_prob", "ode_step", "sde_step", "step_mean_std", "step_std", "transition_log_prob",
]
