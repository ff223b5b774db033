"""Rectified-flow diffusion: objective, timestep sampling, conditioning masks, ODE samplers.

Knows nothing of the model: everything takes a callable.
"""

from .flow import FlowMatching, loss_by_timestep_bins
from .masks import MODES, ConditionSampler, mode_mask
from .samplers import guided_model_fn, sample, timestep_schedule
from .timesteps import TimestepSampler, shift_timesteps, token_shift, unshift_timesteps

__all__ = [
    "FlowMatching",
    "loss_by_timestep_bins",
    "MODES",
    "ConditionSampler",
    "mode_mask",
    "sample",
    "guided_model_fn",
    "timestep_schedule",
    "TimestepSampler",
    "shift_timesteps",
    "unshift_timesteps",
    "token_shift",
]
