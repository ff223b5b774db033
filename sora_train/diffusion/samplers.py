"""ODE samplers for rectified flow with classifier-free guidance and clean context frames.

Integrates dx/dt = v(x, t) from t = start_t (1 = pure noise) down to t = 0.

Model API: `model_fn(x, t, guided)` with x (B, C, f, h, w) and t (B,) float32:
    guided=False -> v_cond (B, C, f, h, w)
    guided=True  -> (v_cond, v_uncond), each (B, C, f, h, w)
so the caller decides how to compute both (e.g. one forward on a 2B batch of [text; negative
text]). A negative prompt is just a different unconditional text, built by the caller.
`guided_model_fn(cond_fn, uncond_fn)` builds one from two plain (x, t) -> v callables.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

from .timesteps import shift_timesteps, unshift_timesteps

METHODS = ("euler", "heun")
# How the steps are spaced: "uniform" (ours: uniform in the un-shifted t, then shifted) or
# "flow_match_euler" (diffusers' FlowMatchEulerDiscreteScheduler, the schedule Wan's and other
# public flow models' pipelines sample with: it stops short of the shifted 1/1000 before the
# final jump to 0). Sampling a public base model with its pipeline's schedule reproduces it.
SCHEDULES = ("uniform", "flow_match_euler")
# FlowMatchEulerDiscreteScheduler's num_train_timesteps (its sigma_min is 1 / this, shifted).
FLOW_MATCH_TRAIN_TIMESTEPS = 1000
log = get_logger(__name__)


def guided_model_fn(cond_fn: Callable, uncond_fn: Callable) -> Callable:
    """model_fn for `sample` from separate conditional and unconditional (x, t) -> v callables."""

    def model_fn(x, t, guided):
        return (cond_fn(x, t), uncond_fn(x, t)) if guided else cond_fn(x, t)

    return model_fn


def timestep_schedule(steps: int, shift: float = 1.0, start_t: float = 1.0, device=None, schedule: str = "uniform") -> torch.Tensor:
    """(steps + 1,) decreasing timesteps from start_t to 0: uniform in the un-shifted domain,
    then shifted, so the first entry is exactly start_t (see SCHEDULES for "flow_match_euler")."""
    if schedule not in SCHEDULES:
        raise SoraError(f"sampler schedule={schedule!r} is unknown; choose one of {list(SCHEDULES)}")
    u0 = unshift_timesteps(torch.tensor(float(start_t), dtype=torch.float64), shift)
    if schedule == "flow_match_euler":
        # diffusers: sigma_min is shift(1/N) of the float32 training table; set_timesteps spaces
        # `steps` sigmas linearly (numpy, float64) from sigma_max to sigma_min, shifts them again
        # and appends 0 — reproduced operation for operation, so the sigmas are the same floats.
        n = FLOW_MATCH_TRAIN_TIMESTEPS
        sigma_min = float(shift_timesteps(torch.tensor(1.0, dtype=torch.float32) / n, shift))
        u = np.linspace(float(u0) * n, sigma_min * n, steps) / n  # (steps,) float64
        sigmas = torch.from_numpy(shift_timesteps(u, shift)).float()  # (steps,)
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)  # (steps + 1,)
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) * u0  # (steps + 1,)
    return shift_timesteps(u, shift).float().to(device)


@torch.no_grad()
def sample(
    model_fn: Callable,
    noise: torch.Tensor,
    steps: int = 30,
    method: str = "euler",
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    context: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    start_t: float = 1.0,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    schedule: str = "uniform",
) -> torch.Tensor:
    """Generate x0 by integrating the flow ODE.

    Args:
        model_fn: see the module docstring; called with guided=True only if guidance_scale != 1.
        noise: (B, C, f, h, w) eps, the starting point at t = 1.
        steps: ODE steps (Heun costs 2 model calls per step except the last).
        method: "euler" or "heun".
        shift: timestep shift (FlowMatching.sampling_shift(num_tokens): the training shift
            unless the config sets sampler.shift).
        guidance_scale: v = v_uncond + s * (v_cond - v_uncond); 1 = conditional only.
        context: (B, C, f, h, w) clean latents of the context frames (others are ignored).
        cond_mask: (B, f) bool, True = context frame; clamped to `context` before every model
            call and in the output, so context frames come back exactly.
        start_t, x_init: video-to-video editing: start from x_init noised to t = start_t
            ("strength"); start_t = 0 returns x_init unchanged (context frames aside).
        generator: unused by these deterministic ODE methods (kept for stochastic ones).
        progress: log every step at info level.
        schedule: how the steps are spaced, one of SCHEDULES.
    Returns:
        (B, C, f, h, w) the sample at t = 0, in noise's dtype (integrated in float32 or wider).
    """
    del generator
    if method not in METHODS:
        raise SoraError(f"sampler method={method!r} is unknown; choose one of {list(METHODS)}")
    if steps < 1:
        raise SoraError(f"sampler steps must be >= 1, got {steps}")
    if not 0.0 <= start_t <= 1.0:
        raise SoraError(f"sampler start_t (edit strength) must be in [0, 1], got {start_t}")
    if start_t < 1.0 and x_init is None:
        raise SoraError(f"sampler start_t={start_t} < 1 needs x_init (the video to edit)")
    if (context is None) != (cond_mask is None):
        raise SoraError("sampler needs both context and cond_mask, or neither")
    B, f = noise.shape[0], noise.shape[2]
    if cond_mask is not None and cond_mask.shape != (B, f):
        raise SoraError(f"sampler cond_mask must be (B, f)=({B}, {f}), got {tuple(cond_mask.shape)}")

    state = torch.promote_types(noise.dtype, torch.float32)  # integrate in >= float32

    def clamp(x):
        return x if cond_mask is None else torch.where(cond_mask[:, None, :, None, None], context.to(state), x)

    def velocity(x, t):  # the state x is >= float32; the model sees the caller's dtype
        x, t_b = x.to(noise.dtype), t.expand(B)  # (B, C, f, h, w), (B,)
        if guidance_scale == 1.0:
            return model_fn(x, t_b, False).to(state)
        v_cond, v_uncond = model_fn(x, t_b, True)
        return torch.lerp(v_uncond.to(state), v_cond.to(state), guidance_scale)  # v_uncond + s * (v_cond - v_uncond)

    if x_init is None:
        x = noise.to(state)  # (B, C, f, h, w)
    else:
        if start_t == 0.0:
            return clamp(x_init.to(state)).to(noise.dtype)
        x = (1 - start_t) * x_init.to(state) + start_t * noise.to(state)  # (B, C, f, h, w)
    ts = timestep_schedule(steps, shift, start_t, device=noise.device, schedule=schedule)  # (steps + 1,)
    x = clamp(x)
    for i in range(steps):
        t, t_next = ts[i : i + 1], ts[i + 1 : i + 2]  # (1,), (1,)
        dt = t_next - t  # (1,) negative
        v = velocity(x, t)
        x_next = x + dt * v
        if method == "heun" and i < steps - 1:  # last step stays Euler: no model call at t = 0
            v_next = velocity(clamp(x_next), t_next)
            x_next = x + dt * 0.5 * (v + v_next)
        x = clamp(x_next)
        if progress:
            log.info("sample step %d/%d t=%.3f", i + 1, steps, float(t_next))
    return x.to(noise.dtype)
