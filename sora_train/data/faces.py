"""Faces out of training clips: detect them and blur them before a clip is stored in a shard.

The detector is the LBP frontal-face cascade that scikit-image ships
(``skimage.data.lbp_frontal_face_cascade_filename()``: OpenCV's ``lbpcascade_frontalface``,
run by ``skimage.feature.Cascade``), so nothing is downloaded. (OpenCV 5's wheels no longer
carry ``CascadeClassifier`` or its XML files, and YuNet needs an ONNX file no package ships.)
It finds frontal faces from about 24 px at the detection scale; profiles, small and occluded
faces are missed (recall measured in docs/benchmarks.md) -- blurring lowers, not removes, the
chance a face reaches training.

Cost control: detection runs on a grey copy scaled to ``detect_size`` px on its long side,
on every ``detect_every``-th frame; each frame blurs the union of the boxes of the detection
frames on both sides of it (a face that moves between two detections stays covered), grown by
``margin``. Blurring is a mosaic then a Gaussian, strong enough that the face is not
recoverable by sharpening.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sora_train.utils.errors import SoraError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the full frame


@dataclass
class BlurStats:
    faces: int  # the most faces seen in one detection frame (a stand-in for "people in the clip")
    detections: int  # face boxes over all detection frames
    frames_blurred: int  # frames in which at least one region was blurred

    def to_dict(self) -> dict[str, int]:
        return {"faces": self.faces, "detections": self.detections, "frames_blurred": self.frames_blurred}


class FaceBlur:
    """Args:
        detect_every: run the detector on every N-th frame (and the last).
        detect_size: long side, in px, of the grey copy the detector sees (smaller is faster,
            misses smaller faces).
        min_face: smallest face, in px at the detection scale.
        scale_factor: the cascade's pyramid step (smaller: slower, finds more).
        margin: each box grows by this fraction of its size on every side (hair, chin).
        mosaic: the blurred region is reduced to this many cells across before smoothing.
    """

    def __init__(self, detect_every: int = 4, detect_size: int = 480, min_face: int = 24, scale_factor: float = 1.15,
                 margin: float = 0.25, mosaic: int = 6) -> None:
        if detect_every < 1 or detect_size < 64 or min_face < 12:
            raise SoraError(f"FaceBlur: detect_every >= 1, detect_size >= 64 and min_face >= 12 (got {detect_every}, {detect_size}, {min_face})")
        try:
            from skimage import data
            from skimage.feature import Cascade
        except ImportError:
            raise SoraError("--blur-faces needs scikit-image (pip install scikit-image)") from None
        self._cascade = Cascade(data.lbp_frontal_face_cascade_filename())
        self.detect_every, self.detect_size, self.min_face = detect_every, detect_size, min_face
        self.scale_factor, self.margin, self.mosaic = scale_factor, margin, mosaic

    def detect(self, frame: np.ndarray) -> list[Box]:
        """Face boxes in one RGB frame (H, W, 3) uint8, in its pixel coordinates."""
        import cv2

        H, W = frame.shape[:2]
        s = min(1.0, self.detect_size / max(H, W))
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if s < 1.0:
            grey = cv2.resize(grey, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
        h, w = grey.shape
        biggest = min(h, w)
        if biggest < self.min_face:
            return []
        found = self._cascade.detect_multi_scale(img=grey, scale_factor=self.scale_factor, step_ratio=1,
                                                 min_size=(self.min_face, self.min_face), max_size=(biggest, biggest), min_neighbor_number=3)
        boxes = []
        for d in found:
            x0, y0 = d["c"] / s, d["r"] / s
            boxes.append((int(x0), int(y0), int(round(x0 + d["width"] / s)), int(round(y0 + d["height"] / s))))
        return _merge(boxes)

    def _grow(self, box: Box, H: int, W: int) -> Box:
        x0, y0, x1, y1 = box
        dx, dy = (x1 - x0) * self.margin, (y1 - y0) * self.margin
        return max(0, int(x0 - dx)), max(0, int(y0 - dy)), min(W, int(x1 + dx + 1)), min(H, int(y1 + dy + 1))

    def blur_region(self, frame: np.ndarray, box: Box) -> None:
        """Mosaic + Gaussian over ``box`` of ``frame``, in place."""
        import cv2

        x0, y0, x1, y1 = box
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        region = frame[y0:y1, x0:x1]
        cells = max(2, self.mosaic)
        small = cv2.resize(region, (cells, max(2, round(cells * (y1 - y0) / (x1 - x0)))), interpolation=cv2.INTER_AREA)
        coarse = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        sigma = max(1.0, (x1 - x0) / 8)
        frame[y0:y1, x0:x1] = cv2.GaussianBlur(coarse, (0, 0), sigma)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, BlurStats]:
        """Blur the faces of a clip (F, H, W, 3) uint8 -> (a new array, what was found)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise SoraError(f"FaceBlur: expected uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        F, H, W, _ = frames.shape
        at = sorted(set(range(0, F, self.detect_every)) | {F - 1})
        found = {i: self.detect(frames[i]) for i in at}
        out = frames.copy()
        blurred = 0
        for f in range(F):
            before = max(i for i in at if i <= f)
            after = min(i for i in at if i >= f)
            boxes = _merge(found[before] + found[after])
            for box in boxes:
                self.blur_region(out[f], self._grow(box, H, W))
            blurred += bool(boxes)
        stats = BlurStats(max((len(b) for b in found.values()), default=0), sum(len(b) for b in found.values()), blurred)
        return out, stats


def _iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _merge(boxes: list[Box], iou: float = 0.3) -> list[Box]:
    """Overlapping boxes (the cascade reports one face at neighbouring scales) -> their union."""
    merged: list[Box] = []
    for b in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        for i, m in enumerate(merged):
            if _iou(b, m) > iou or (b[0] >= m[0] and b[1] >= m[1] and b[2] <= m[2] and b[3] <= m[3]):
                merged[i] = (min(b[0], m[0]), min(b[1], m[1]), max(b[2], m[2]), max(b[3], m[3]))
                break
        else:
            merged.append(b)
    return merged


def blur_media(data: bytes, ext: str, fps: float, blur: FaceBlur, crf: int = 17) -> tuple[bytes, str, int, int, BlurStats]:
    """Blur the faces of one clip's bytes -> (bytes, ext, width, height, stats).

    A clip with no face comes back as it was (same bytes, no re-encode). One with faces is
    re-encoded: video as H.264 mp4 at ``crf`` (even sides: an odd last row/column is dropped),
    images as PNG. Raises SoraError when the result does not decode to the same frame count.
    """
    from sora_train.data.video_io import IMAGE_EXTS, decode_image, decode_video, encode_image, encode_video, probe_video

    image = ext.lower() in IMAGE_EXTS
    frames = decode_image(data) if image else decode_video(data)  # (F, H, W, 3)
    out, stats = blur(frames)
    F, H, W, _ = frames.shape
    if stats.detections == 0:
        return data, ext, W, H, stats
    if image:
        return encode_image(out[0], "png"), "png", W, H, stats
    h, w = H - H % 2, W - W % 2
    clip = encode_video(np.ascontiguousarray(out[:, :h, :w]), fps, "mp4", crf=crf)
    if probe_video(clip).num_frames != F:
        raise SoraError(f"face blur: the re-encoded clip has {probe_video(clip).num_frames} frames, not {F}")
    return clip, "mp4", w, h, stats
