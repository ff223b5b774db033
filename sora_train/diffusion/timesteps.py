"""Training timestep distributions and the noise-level shift (rectified flow, t = 1 is noise)."""

from __future__ import annotations

import math

import torch

from sora_train.utils.errors import SoraError

KINDS = ("logit_normal", "uniform")


class TimestepSampler:
    """Draws training timesteps t in (0, 1).

    kind="logit_normal": t = sigmoid(mean + std * z), z ~ N(0, 1) (SD3, Esser et al. 2024):
    concentrates training on mid-range t where the velocity is hardest to predict; the
    median is sigmoid(mean). kind="uniform": t ~ U[0, 1).
    """

    def __init__(self, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0):
        if kind not in KINDS:
            raise SoraError(f"timestep_sampler kind={kind!r} is unknown; choose one of {list(KINDS)}")
        if std <= 0:
            raise SoraError(f"timestep_sampler std must be > 0, got {std}")
        self.kind, self.mean, self.std = kind, float(mean), float(std)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) float32 timesteps; drawn on the generator's device, returned on `device`."""
        gen_device = generator.device if generator is not None else device
        if self.kind == "uniform":
            t = torch.rand(n, generator=generator, device=gen_device)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=gen_device))
        return t.to(device) if device is not None else t

    def config(self) -> dict:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}

    def __repr__(self) -> str:
        return f"TimestepSampler(kind={self.kind!r}, mean={self.mean}, std={self.std})"


def shift_timesteps(t, shift: float):
    """t' = shift * t / (1 + (shift - 1) * t): shift > 1 moves every t towards 1 (more noise),
    keeping 0 and 1 fixed; shift = 1 is the identity. Works on floats and tensors."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_timesteps(t, shift: float):
    """Inverse of shift_timesteps: t = t' / (shift - (shift - 1) * t')."""
    return t / (shift - (shift - 1) * t)


def token_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0, max_shift: float = 6.0) -> float:
    """Noise-level shift for a sample of `num_tokens` tokens.

    Rule (SD3's resolution-dependent shift, Esser et al. 2024, Sec. 5.3.2):
        shift = base_shift * sqrt(max(num_tokens, base_tokens) / base_tokens), clamped to max_shift.
    More tokens carry more redundant signal, so the same t destroys less information; to see
    equally hard noise levels, longer / larger videos need t pushed towards 1. At or below
    base_tokens the shift is base_shift; max_shift caps it for very long videos.
    """
    if num_tokens <= 0 or base_tokens <= 0:
        raise SoraError(f"token_shift needs positive num_tokens and base_tokens, got {num_tokens}, {base_tokens}")
    return float(min(max_shift, base_shift * math.sqrt(max(num_tokens, base_tokens) / base_tokens)))
