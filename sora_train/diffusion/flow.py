"""Rectified-flow (flow matching) training objective; knows nothing of the model.

Conventions: x_t = (1 - t) * x0 + t * eps with t in [0, 1] (t = 1 is pure noise); the model
predicts the velocity v = dx_t/dt = eps - x0; samplers integrate from t = 1 down to t = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from sora_train.utils.errors import SoraError

from .timesteps import TimestepSampler, shift_timesteps, token_shift

SAMPLER_KEYS = ("steps", "method", "guidance_scale", "shift", "schedule")


class FlowMatching:
    """Rectified-flow objective with token-count-dependent timestep shift.

    Args:
        timestep_sampler: distribution of training t before the shift.
        shift_base_tokens, base_shift, max_shift: the shift rule of `token_shift` (base_shift at
            or below shift_base_tokens tokens, growing as sqrt(tokens), capped at max_shift).
        use_token_shift: False = always base_shift, whatever the sample's size.
        sampler: default sampling settings (steps, method, guidance_scale, shift, schedule) kept for
            callers; see `sora_train.diffusion.samplers.sample`. shift (null: `shift_for` the
            sample's token count, as in training) spaces the sampler's steps on its own.
    """

    def __init__(
        self,
        timestep_sampler: TimestepSampler | None = None,
        shift_base_tokens: int = 256,
        base_shift: float = 1.0,
        max_shift: float = 6.0,
        use_token_shift: bool = True,
        sampler: Mapping | None = None,
    ):
        if base_shift <= 0 or max_shift < base_shift:
            raise SoraError(f"diffusion needs 0 < base_shift <= max_shift, got {base_shift=}, {max_shift=}")
        self.timestep_sampler = timestep_sampler if timestep_sampler is not None else TimestepSampler()
        self.shift_base_tokens = int(shift_base_tokens)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.use_token_shift = bool(use_token_shift)
        self.sampler_defaults = dict(sampler or {})  # dict() also unwraps an OmegaConf node
        unknown = sorted(set(self.sampler_defaults) - set(SAMPLER_KEYS))
        if unknown:
            raise SoraError(f"diffusion.sampler has unknown key {unknown[0]!r}; valid: {list(SAMPLER_KEYS)}")
        self.sampling_shift(None)  # a bad sampler.shift fails here, not at the first sample

    def config(self) -> dict:
        """The settings as plain data (what an export records; `from_config` reads it back)."""
        return {"timestep_sampler": self.timestep_sampler.config(), "shift_base_tokens": self.shift_base_tokens, "base_shift": self.base_shift,
                "max_shift": self.max_shift, "use_token_shift": self.use_token_shift, "sampler": dict(self.sampler_defaults)}

    @classmethod
    def from_config(cls, settings: Mapping | None, source: str = "diffusion settings") -> "FlowMatching":
        """Rebuild from `config()` data, validated key by key: nothing named in it is imported
        or called. Exports written before exports held plain data carry Hydra's `_target_`
        keys; those are accepted only where they name these very classes.

        Raises:
            SoraError: an unknown key, a foreign `_target_`, or a value of the wrong kind.
        """
        settings = dict(settings or {})
        _check_target(settings, _FLOW_TARGETS, source)
        ts = settings.pop("timestep_sampler", None)
        if ts is not None:
            if not isinstance(ts, Mapping):
                raise SoraError(f"{source}: timestep_sampler must be a mapping, got {type(ts).__name__}")
            ts = dict(ts)
            _check_target(ts, _SAMPLER_TARGETS, f"{source}: timestep_sampler")
            _check_keys(ts, ("kind", "mean", "std"), f"{source}: timestep_sampler")
            ts = TimestepSampler(**ts)
        _check_keys(settings, ("shift_base_tokens", "base_shift", "max_shift", "use_token_shift", "sampler"), source)
        sampler = settings.get("sampler")
        if sampler is not None and not isinstance(sampler, Mapping):
            raise SoraError(f"{source}: sampler must be a mapping, got {type(sampler).__name__}")
        for key, value in {**settings, **(sampler or {})}.items():
            if key != "sampler" and not (value is None or isinstance(value, (bool, int, float, str))):
                raise SoraError(f"{source}: {key} must be a number or a string, got {type(value).__name__}")
        return cls(timestep_sampler=ts, **settings)

    def shift_for(self, num_tokens: int | None) -> float:
        """The training timestep shift for samples of `num_tokens` DiT tokens."""
        if not self.use_token_shift or num_tokens is None:
            return self.base_shift
        return token_shift(num_tokens, self.shift_base_tokens, self.base_shift, self.max_shift)

    def sampling_shift(self, num_tokens: int | None, shift: float | None = None) -> float:
        """The shift that spaces sampler steps: `shift` if given, else the config's
        sampler.shift, else the training rule (`shift_for`)."""
        if shift is None:
            shift = self.sampler_defaults.get("shift")
        if shift is None:
            return self.shift_for(num_tokens)
        if not float(shift) > 0:
            raise SoraError(f"sampling shift must be > 0 (diffusion.sampler.shift or --shift; null: the training shift), got {shift}")
        return float(shift)

    def training_losses(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One flow-matching training step's loss: sample t -> noise -> x_t -> predict -> MSE.

        Args:
            model_fn: (x_t (B, C, f, h, w), t (B,)) -> predicted velocity, same shape as x0.
                Close over text and cond_mask, e.g. `lambda x, t: dit(x, t, text, mask, cond_mask)`.
            x0: (B, C, f, h, w) clean latents.
            cond_mask: (B, f) bool; True frames are context: given clean in x_t and left out
                of the loss. None = no context (text-to-video).
            num_tokens: DiT tokens per sample, for the token shift; None = base_shift.
            generator: for t and noise; t and noise are drawn on its device.
            noise: (B, C, f, h, w) eps to use instead of sampling it.
            t: (B,) timesteps to use as given (no shift) instead of sampling them.
        Returns:
            {"loss": scalar mean over samples, "loss_per_sample": (B,) MSE over each sample's
            generated frames (float32), "t": (B,) the timesteps used}.
        """
        B, f = x0.shape[0], x0.shape[2]
        if cond_mask is not None and cond_mask.shape != (B, f):
            raise SoraError(f"cond_mask must be (B, f)=({B}, {f}), got {tuple(cond_mask.shape)}")
        if t is None:
            t = self.timestep_sampler.sample(B, generator, device=x0.device)  # (B,)
            t = shift_timesteps(t, self.shift_for(num_tokens))  # (B,)
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        t_b = t.to(x0.dtype)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        x_t = (1 - t_b) * x0 + t_b * noise  # (B, C, f, h, w)
        if cond_mask is not None:
            x_t = torch.where(cond_mask[:, None, :, None, None], x0, x_t)  # context frames clean
        v_pred = model_fn(x_t, t)  # (B, C, f, h, w)
        target = noise - x0  # (B, C, f, h, w)
        err = (v_pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # (B, f)
        if cond_mask is None:
            loss_per_sample = err.mean(dim=1)  # (B,)
        else:
            keep = (~cond_mask).float()  # (B, f)
            loss_per_sample = (err * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B,); all-context -> 0
        return {"loss": loss_per_sample.mean(), "loss_per_sample": loss_per_sample, "t": t}

    def __repr__(self) -> str:
        return (
            f"FlowMatching({self.timestep_sampler!r}, shift_base_tokens={self.shift_base_tokens}, "
            f"base_shift={self.base_shift}, max_shift={self.max_shift}, use_token_shift={self.use_token_shift})"
        )


# Hydra targets that an old export's diffusion settings may name: these classes, nothing else.
_FLOW_TARGETS = ("sora_train.diffusion.FlowMatching", "sora_train.diffusion.flow.FlowMatching")
_SAMPLER_TARGETS = ("sora_train.diffusion.TimestepSampler", "sora_train.diffusion.timesteps.TimestepSampler")


def _check_target(settings: dict, allowed: tuple[str, ...], source: str) -> None:
    """Drop Hydra's bookkeeping keys, refusing any `_target_` but the allowed class paths."""
    target = settings.pop("_target_", None)
    if target is not None and target not in allowed:
        raise SoraError(f"{source}: refusing _target_={target!r}; an export's diffusion settings are data, only {allowed[0]} is known")
    for key in [k for k in settings if isinstance(k, str) and k.startswith("_") and k.endswith("_")]:
        raise SoraError(f"{source}: refusing key {key!r}; an export's diffusion settings are data")


def _check_keys(settings: dict, known: tuple[str, ...], source: str) -> None:
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise SoraError(f"{source}: unknown key {unknown[0]!r}; valid: {list(known)}")


DEFAULT_BIN_EDGES = tuple(i / 10 for i in range(11))


def loss_by_timestep_bins(
    loss_per_sample: torch.Tensor, t: torch.Tensor, edges=DEFAULT_BIN_EDGES
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-timestep-bin (loss sum, count), keyed "loss_t0.0-0.1", ..., for metrics such as
    train/loss_t0.0-0.1 (sum across steps / ranks, then divide). The last bin includes its
    upper edge. Tensors stay on device: no host sync here."""
    edges_t = torch.as_tensor(edges, dtype=t.dtype, device=t.device)
    idx = torch.bucketize(t, edges_t[1:-1], right=True)  # (B,) bin index in [0, K)
    K = len(edges) - 1
    loss = loss_per_sample.detach().float()
    sums = torch.zeros(K, device=t.device).index_add_(0, idx, loss)  # (K,)
    counts = torch.zeros(K, device=t.device).index_add_(0, idx, torch.ones_like(loss))  # (K,)
    return {f"loss_t{_edge(edges[i])}-{_edge(edges[i + 1])}": (sums[i], counts[i]) for i in range(K)}


def _edge(e: float) -> str:
    return f"{e:.1f}" if round(e, 1) == e else f"{e:g}"
