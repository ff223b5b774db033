"""Where clips start and end: scene cuts (PySceneDetect's ContentDetector) and the clip plan.

Scene detection is fed the frames that the probe already decodes, one at a time, so it costs
no second decode and its frame numbers are the decoder's own (OpenCV, PySceneDetect's default
backend, may count frames differently from decord, which is what the loader uses).

The plan: the video (or each scene) is split into the fewest equal pieces no longer than
``max_clip_seconds``. Equal pieces rather than fixed-length ones plus a remainder: a 25 s
video at max 10 s gives 3 clips of 8.3 s instead of 10 + 10 + a 5 s tail, so no tail is lost
to the minimum length. Pieces shorter than the minimum (only whole scenes can be) are dropped
and reported, never silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ContentDetector scores a 0-255 HSV difference; PySceneDetect's default threshold.
DEFAULT_SCENE_THRESHOLD = 27.0
# Frames wider than this are subsampled before scoring: the score is a mean difference, so a
# 1/4-size frame scores the same cut, at 1/16 of the cost.
_SCENE_MAX_WIDTH = 256


@dataclass(frozen=True)
class ClipLimits:
    """Length limits for a clip, in seconds and frames (both minimums must be met)."""

    max_clip_seconds: float = 10.0
    min_clip_seconds: float = 1.0
    min_frames: int = 8

    def max_frames(self, fps: float) -> int:
        # The epsilon keeps 10 s * 29.97 fps = 299.7 -> 299, and 2 s * 10 fps = 20 -> 20 exactly.
        return max(1, math.floor(self.max_clip_seconds * fps + 1e-6))

    def min_len(self, fps: float) -> int:
        return max(1, self.min_frames, math.ceil(self.min_clip_seconds * fps - 1e-6))


class SceneCutter:
    """Feed frames in order; :meth:`cuts` gives the frame numbers where a new scene starts.

    Scenes shorter than the minimum clip length are merged into their neighbour by the
    detector itself (its ``min_scene_len``), so a flash or a fast cut sequence does not turn
    into clips that would only be dropped.
    """

    def __init__(self, limits: ClipLimits, threshold: float = DEFAULT_SCENE_THRESHOLD) -> None:
        try:
            from scenedetect import ContentDetector, FrameTimecode
        except ImportError as e:  # pragma: no cover - depends on the environment
            from sora_train.utils.errors import SoraError

            raise SoraError("--scene-split needs PySceneDetect: pip install 'sora_train[scenes]'") from e
        self._detector_cls, self._timecode = ContentDetector, FrameTimecode
        self.limits, self.threshold = limits, float(threshold)
        self._detector = None
        self._fps = 0.0
        self._cuts: list[int] = []
        self._last = -1

    def feed(self, index: int, rgb: np.ndarray, fps: float) -> None:
        """One RGB frame (H, W, 3) uint8 of a video at ``fps``; ``index`` counts up from 0."""
        if index != self._last + 1:
            raise ValueError(f"SceneCutter: frame {index} after {self._last}; frames must be sequential")
        if self._detector is None:
            self._fps = float(fps)
            self._detector = self._detector_cls(threshold=self.threshold, min_scene_len=self.limits.min_len(fps))
        self._last = index
        step = max(1, -(-rgb.shape[1] // _SCENE_MAX_WIDTH))
        bgr = np.ascontiguousarray(rgb[::step, ::step, ::-1])  # (H/s, W/s, 3), OpenCV's channel order
        self._cuts += [c.frame_num for c in self._detector.process_frame(self._timecode(index, fps=self._fps), bgr)]

    def cuts(self) -> list[int]:
        if self._detector is not None:
            last = self._timecode(self._last, fps=self._fps)
            self._cuts += [c.frame_num for c in self._detector.post_process(last)]
        return sorted({c for c in self._cuts if 0 < c <= self._last})


def plan_clips(
    num_frames: int, fps: float, limits: ClipLimits, cuts: list[int] | tuple[int, ...] = ()
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split ``[0, num_frames)`` at ``cuts``, then each scene into the fewest equal pieces of at
    most ``max_clip_seconds``.

    Returns:
        (kept, dropped): ``[start, end)`` frame ranges; ``dropped`` are scenes shorter than the
        minimum length.
    """
    max_len, min_len = limits.max_frames(fps), limits.min_len(fps)
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < num_frames) + [num_frames]
    kept: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        pieces = max(1, math.ceil(length / max_len))
        edges = [start + round(i * length / pieces) for i in range(pieces + 1)]
        for s, e in zip(edges[:-1], edges[1:]):
            (kept if e - s >= min_len else dropped).append((s, e))
    return kept, dropped
