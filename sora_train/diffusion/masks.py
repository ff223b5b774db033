"""Conditioning masks: one mechanism (clean context frames) for every prompting mode.

A cond mask is (B, f) bool over latent frames: True = the frame is given clean as context
(the model sees it un-noised and is not trained / sampled on it), False = generate it.
    t2v              no context
    i2v              latent frame 0 (a causal VAE's first latent frame is the image)
    extend_forward   the first k frames: continue a video forwards
    extend_backward  the last k frames: generate what came before
    interpolate      the first k and last k frames: fill in between
"""

from __future__ import annotations

import torch

from sora_train.utils.errors import SoraError

MODES = ("t2v", "i2v", "extend_forward", "extend_backward", "interpolate")
_HEAD_MODES = ("i2v", "extend_forward", "interpolate")  # context at the start
_TAIL_MODES = ("extend_backward", "interpolate")  # context at the end


def _max_context(mode: str, num_latent_frames: int, max_context_frames: int) -> int:
    """Largest k for a mode that still leaves >= 1 frame to generate (0 = mode impossible)."""
    f = num_latent_frames
    if mode == "t2v":
        return 0
    if mode == "i2v":
        return 1 if f >= 2 else 0
    if mode == "interpolate":
        return min(max_context_frames, (f - 1) // 2)
    return min(max_context_frames, f - 1)


def mode_mask(mode: str, num_latent_frames: int, num_context: int = 1) -> torch.Tensor:
    """(f,) bool cond mask of one mode; num_context = k (per side for interpolate; i2v uses 1)."""
    if mode not in MODES:
        raise SoraError(f"conditioning mode={mode!r} is unknown; choose one of {list(MODES)}")
    f = num_latent_frames
    mask = torch.zeros(f, dtype=torch.bool)
    if mode == "t2v":
        return mask
    k = 1 if mode == "i2v" else num_context
    if k < 1 or k > _max_context(mode, f, max_context_frames=f):
        raise SoraError(
            f"conditioning mode={mode!r} with num_context={k} leaves no frame to generate "
            f"in {f} latent frame(s)"
        )
    if mode in _HEAD_MODES:
        mask[:k] = True
    if mode in _TAIL_MODES:
        mask[f - k :] = True
    return mask


class ConditionSampler:
    """Samples a training cond mask per sample: a mode by `weights`, then k context frames.

    Args:
        weights: relative frequency per mode, e.g. {"t2v": 0.7, "i2v": 0.1, ...}; missing
            modes get 0. A mode impossible for the clip (e.g. i2v on a 1-frame image) falls
            back to t2v for that sample.
        max_context_frames: largest k (per side for interpolate); k ~ U{1..min(max, feasible)}.
    """

    def __init__(self, weights: dict[str, float], max_context_frames: int = 4):
        unknown = sorted(set(weights) - set(MODES))
        if unknown:
            raise SoraError(f"condition weights has unknown mode {unknown[0]!r}; choose from {list(MODES)}")
        if any(float(w) < 0 for w in weights.values()):
            raise SoraError(f"condition weights must be >= 0, got {dict(weights)}")
        if sum(float(w) for w in weights.values()) <= 0:
            raise SoraError("condition weights must have a positive total")
        if max_context_frames < 1:
            raise SoraError(f"condition max_context_frames must be >= 1, got {max_context_frames}")
        self.weights = {m: float(weights.get(m, 0.0)) for m in MODES}
        self.max_context_frames = int(max_context_frames)
        self._probs = torch.tensor([self.weights[m] for m in MODES], dtype=torch.float64)

    def sample_modes(self, batch_size: int, num_latent_frames: int, generator=None):
        """(mode index (B,) into MODES, k (B,)) with impossible modes replaced by t2v (k=0)."""
        mode = torch.multinomial(self._probs, batch_size, replacement=True, generator=generator)  # (B,)
        kmax = torch.tensor([_max_context(m, num_latent_frames, self.max_context_frames) for m in MODES])[mode]  # (B,)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)  # (B,)
        k = 1 + (u * kmax).long().clamp(max=(kmax - 1).clamp(min=0))  # (B,) uniform in 1..kmax
        k = torch.where(kmax > 0, k, 0)  # (B,)
        mode = torch.where(kmax > 0, mode, MODES.index("t2v"))  # (B,)
        return mode, k

    def sample(self, batch_size: int, num_latent_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, f) bool cond mask on the CPU (move it with the batch)."""
        mode, k = self.sample_modes(batch_size, num_latent_frames, generator)
        sides = torch.tensor([[m in _HEAD_MODES, m in _TAIL_MODES] for m in MODES])  # (modes, 2)
        first, last = sides[mode].unbind(-1)  # (B,), (B,)
        pos = torch.arange(num_latent_frames)  # (f,)
        head = first[:, None] & (pos[None] < k[:, None])  # (B, f)
        tail = last[:, None] & (pos[None] >= num_latent_frames - k[:, None])  # (B, f)
        return head | tail

    def __repr__(self) -> str:
        return f"ConditionSampler(weights={self.weights}, max_context_frames={self.max_context_frames})"
