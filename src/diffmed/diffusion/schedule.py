"""Noise schedules: thin wrappers over diffusers schedulers, one place for their settings.

Training adds noise with a ``DDPMScheduler`` over the full chain (``num_train_timesteps``, 1000 by
default). Sampling uses a *respaced* schedule of ``steps`` evenly spread timesteps over the whole
chain: diffusers' ``"trailing"`` spacing gives ``999, 999 - k, ..., k - 1`` with ``k = T // steps``,
so the first step starts from pure noise and the last one lands next to the clean image. This is
what DiffMIC's public code gets wrong (it runs the *last* N timesteps of the 1000-step chain).
"""
from __future__ import annotations

from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffmed.errors import ConfigError

BetaSchedule = Literal["linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]
Sampler = Literal["ddim", "ddpm", "dpm"]
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "dpm")
SPACING = "trailing"

_DIFFUSERS_BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
_SAMPLER_CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}
# DDIM and DDPM clip their x0 estimate to the data range [-1, 1] by default (clip_sample); DPM-Solver's
# counterpart is thresholding at 1. Without it the x0 estimate near t = T (the noise error amplified by
# 1 / sqrt(alpha_bar)) drove DPM-Solver to saturated noise with a generator that DDIM sampled fine.
_SAMPLER_OPTIONS = {"dpm": {"thresholding": True, "sample_max_value": 1.0}}


def _common(beta_schedule: str, prediction_type: str, num_train_timesteps: int) -> dict:
    if beta_schedule not in _DIFFUSERS_BETAS:
        raise ConfigError(f"beta_schedule '{beta_schedule}' is not one of {sorted(_DIFFUSERS_BETAS)}")
    # linear: beta 1e-4 .. 0.02 (Ho et al., the thesis); cosine: Nichol & Dhariwal's squared cosine
    return {"num_train_timesteps": num_train_timesteps, "beta_schedule": _DIFFUSERS_BETAS[beta_schedule],
            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": prediction_type,
            "timestep_spacing": SPACING}


def training_scheduler(beta_schedule: BetaSchedule = "linear", prediction_type: PredictionType = "epsilon",
                       num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The forward (noising) process used during training: ``add_noise`` and the regression target."""
    return DDPMScheduler(**_common(beta_schedule, prediction_type, num_train_timesteps))


def sampling_scheduler(sampler: Sampler, steps: int, beta_schedule: BetaSchedule = "linear",
                       prediction_type: PredictionType = "epsilon", num_train_timesteps: int = 1000) -> SchedulerMixin:
    """A fresh scheduler respaced to ``steps`` timesteps over the whole chain (``set_timesteps`` done).

    A fresh one per batch: DPM-Solver keeps the previous model outputs as state between steps.
    """
    if sampler not in _SAMPLER_CLASSES:
        raise ConfigError(f"sampler '{sampler}' is not one of {list(SAMPLERS)}")
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"steps={steps} must be between 1 and num_train_timesteps={num_train_timesteps}")
    sched = _SAMPLER_CLASSES[sampler](**_common(beta_schedule, prediction_type, num_train_timesteps),
                                      **_SAMPLER_OPTIONS.get(sampler, {}))
    sched.set_timesteps(steps)
    return sched


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the network regresses: the noise (epsilon) or the velocity ``sqrt(a) eps - sqrt(1-a) x0``."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise
