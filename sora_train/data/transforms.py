"""Temporal sampling and aspect-preserving resize + crop, computed from metadata.

Frame indices are computed before decoding so the decoder reads only the frames a sample
needs; the resize target is computed so decord resizes inside the decoder.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def frame_indices(num_frames: int, src_fps: float, want_frames: int, target_fps: float | None, rng: np.random.Generator | None, random_start: bool = True) -> list[int] | None:
    """Indices of ``want_frames`` frames resampled from ``src_fps`` to ``target_fps``.

    Returns None when the clip is too short. ``target_fps`` None keeps the native rate.
    Start is random (training) or centred (evaluation, or ``rng`` None).
    """
    stride = 1.0 if not target_fps or not src_fps else src_fps / target_fps
    span = (want_frames - 1) * stride  # source frames covered, first to last
    if span > num_frames - 1 + 1e-6:
        return None
    slack = num_frames - 1 - span
    if random_start and rng is not None and slack > 0:
        start = float(rng.uniform(0.0, slack))
    else:
        start = slack / 2.0
    return [min(num_frames - 1, int(round(start + i * stride))) for i in range(want_frames)]


def resize_for_crop(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Smallest (h, w) with the source aspect ratio that covers (out_h, out_w)."""
    scale = max(out_h / height, out_w / width)
    return max(out_h, math.ceil(height * scale - 1e-6)), max(out_w, math.ceil(width * scale - 1e-6))


def crop_offsets(h: int, w: int, out_h: int, out_w: int, rng: np.random.Generator | None) -> tuple[int, int]:
    if rng is None:
        return (h - out_h) // 2, (w - out_w) // 2
    return int(rng.integers(0, h - out_h + 1)), int(rng.integers(0, w - out_w + 1))


def resize_frames(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, out_h, out_w, 3) uint8 with antialiased bilinear (torch)."""
    if frames.shape[1] == out_h and frames.shape[2] == out_w:
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (F, h, w, 3)


def video_to_float(video: torch.Tensor) -> torch.Tensor:
    """uint8 video (B, F, H, W, 3) in [0, 255], channels last as decoded -> float32
    (B, 3, F, H, W) in [-1, 1], the model's layout; float input is returned as is.

    The loader's workers hand batches over as uint8 channels-last (a quarter of the bytes
    through shared memory and host-to-device copies, and neither the float conversion nor the
    channel transpose on the decode path, which on a CPU cost about as much as decoding);
    `VideoDataModule.on_after_batch_transfer` calls this on the training device, so the model
    still sees float (B, 3, F, H, W) in [-1, 1]."""
    if video.dtype != torch.uint8:
        return video
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"uint8 video must be (B, F, H, W, 3), got {tuple(video.shape)}")
    out = torch.empty(video.permute(0, 4, 1, 2, 3).shape, dtype=torch.float32, device=video.device)
    out.copy_(video.permute(0, 4, 1, 2, 3))  # (B, 3, F, H, W), contiguous
    return out.mul_(2.0 / 255.0).sub_(1.0)  # (B, 3, F, H, W) in [-1, 1]
