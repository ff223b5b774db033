"""Boxes: where each object is, frame by frame — the data contract of box motion control.

One JSON format serves the shard sample's ``boxes`` field, the ingest sidecar
(``NAME.boxes.json`` beside a video) and ``sora-sample --boxes FILE``::

    {"num_frames": 17,                       # optional: frames the boxes refer to
     "objects": [
       {"id": 0, "mode": "hard",             # hard: the object fills the box; soft: it stays inside
        "keyframes": [{"frame": 0, "box": [0.10, 0.20, 0.30, 0.40]},
                      {"frame": 16, "box": [0.60, 0.20, 0.80, 0.40]}]}]}

A box is ``[x0, y0, x1, y1]`` normalised to the frame (x right, y down, 0..1, x0 < x1,
y0 < y1). Between two keyframes of an object its box is interpolated linearly; before the
first and after the last keyframe the object is unconstrained (no box). The shapes world
writes every frame as a keyframe; a user draws a few.

In a batch, boxes travel dense: ``boxes`` (B, K, F, 4) float32, ``box_valid`` (B, K, F) bool
(False: no box for that object in that frame), ``box_hard`` (B, K) bool. The DiT sees them
rasterised onto its latent grid (:func:`rasterise_boxes`): per object slot one channel of
hard-box coverage and one of soft-box coverage, averaged over the pixel frames each latent
frame covers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sora_train.utils.errors import SoraError

MODES = ("hard", "soft")
CHANNELS_PER_OBJECT = 2  # hard-box coverage, soft-box coverage
BOXES_SUFFIX = ".boxes.json"  # the ingest sidecar: clip.mp4 -> clip.boxes.json


@dataclass(frozen=True)
class BoxTrack:
    """One object's keyframes: ``frames`` (K,) increasing ints, ``boxes`` (K, 4) normalised."""

    id: int
    mode: str
    frames: tuple[int, ...]
    boxes: tuple[tuple[float, float, float, float], ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode,
                "keyframes": [{"frame": f, "box": [round(v, 5) for v in b]} for f, b in zip(self.frames, self.boxes)]}


@dataclass(frozen=True)
class Boxes:
    """Every object's box track (validated: see :func:`parse_boxes`)."""

    objects: tuple[BoxTrack, ...]
    num_frames: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objects": [o.to_json() for o in self.objects]}
        if self.num_frames is not None:
            out["num_frames"] = self.num_frames
        return out

    def dense(self, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keyframes interpolated to every frame -> boxes (K, F, 4) float32, valid (K, F) bool,
        hard (K,) bool; objects in id order."""
        K = len(self.objects)
        boxes = np.zeros((K, num_frames, 4), np.float32)
        valid = np.zeros((K, num_frames), bool)
        for k, obj in enumerate(self.objects):
            fr = np.asarray(obj.frames, np.float64)  # (Kf,)
            bx = np.asarray(obj.boxes, np.float64)  # (Kf, 4)
            t = np.arange(num_frames, dtype=np.float64)  # (F,)
            inside = (t >= fr[0]) & (t <= fr[-1])
            for c in range(4):
                boxes[k, :, c] = np.interp(t, fr, bx[:, c])
            valid[k] = inside
        hard = np.array([o.mode == "hard" for o in self.objects], bool)
        return boxes, valid, hard

    def at_frames(self, indices: Sequence[float]) -> "Boxes":
        """The tracks resampled at source frames ``indices`` (a clip cut or frames chosen by the
        loader): new frame i is source frame indices[i]; frames outside a track drop out."""
        out = []
        for obj in self.objects:
            fr = np.asarray(obj.frames, np.float64)
            bx = np.asarray(obj.boxes, np.float64)
            keep = [(i, s) for i, s in enumerate(indices) if fr[0] <= s <= fr[-1]]
            if not keep:
                continue
            new = tuple(tuple(float(np.interp(s, fr, bx[:, c])) for c in range(4)) for _, s in keep)
            out.append(BoxTrack(obj.id, obj.mode, tuple(i for i, _ in keep), new))  # type: ignore[arg-type]
        return Boxes(tuple(out), len(indices))

    def cropped(self, scale_h: int, scale_w: int, top: int, left: int, height: int, width: int) -> "Boxes":
        """Coordinates after resizing the frame to (scale_h, scale_w) pixels and cropping
        (height, width) at (top, left); boxes are clipped to the crop and dropped where nothing
        of them is left."""
        out = []
        for obj in self.objects:
            frames, boxes = [], []
            for f, (x0, y0, x1, y1) in zip(obj.frames, obj.boxes):
                nx0, nx1 = (x0 * scale_w - left) / width, (x1 * scale_w - left) / width
                ny0, ny1 = (y0 * scale_h - top) / height, (y1 * scale_h - top) / height
                nx0, ny0, nx1, ny1 = max(nx0, 0.0), max(ny0, 0.0), min(nx1, 1.0), min(ny1, 1.0)
                if nx1 > nx0 and ny1 > ny0:
                    frames.append(f)
                    boxes.append((nx0, ny0, nx1, ny1))
            if frames:
                out.append(BoxTrack(obj.id, obj.mode, tuple(frames), tuple(boxes)))
        return Boxes(tuple(out), self.num_frames)


def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SoraError(f"{where}: {v!r} is not a finite number")
    return float(v)


def parse_boxes(data: Any, where: str = "boxes", num_frames: int | None = None, max_objects: int | None = None) -> Boxes:
    """Validate the boxes JSON (already parsed) -> :class:`Boxes`.

    Args:
        where: how errors name the input (a file name, ``--boxes FILE``, a shard key).
        num_frames: frames of the clip the boxes are for; a keyframe at or past it is refused.
        max_objects: objects the model was trained for; more are refused.
    Raises:
        SoraError with one line naming the field: ``boxes.json: objects[0].keyframes[1].box: ...``.
    """
    if not isinstance(data, dict):
        raise SoraError(f"{where}: expected a JSON object with 'objects', got {type(data).__name__}")
    unknown = sorted(set(data) - {"objects", "num_frames"})
    if unknown:
        raise SoraError(f"{where}: unknown field(s) {unknown}; expected 'objects' and optionally 'num_frames'")
    declared = data.get("num_frames")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
        raise SoraError(f"{where}: num_frames={declared!r} must be a positive integer")
    limit = num_frames if num_frames is not None else declared
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise SoraError(f"{where}: 'objects' must be a non-empty list")
    if max_objects is not None and len(objects) > max_objects:
        raise SoraError(f"{where}: objects has {len(objects)} objects; the model was trained for at most {max_objects}")
    tracks, ids = [], set()
    for i, obj in enumerate(objects):
        at = f"{where}: objects[{i}]"
        if not isinstance(obj, dict):
            raise SoraError(f"{at}: expected an object with id, mode, keyframes")
        bad = sorted(set(obj) - {"id", "mode", "keyframes"})
        if bad:
            raise SoraError(f"{at}: unknown field(s) {bad}; expected id, mode, keyframes")
        oid = obj.get("id", i)
        if isinstance(oid, bool) or not isinstance(oid, int) or oid < 0:
            raise SoraError(f"{at}.id: {oid!r} must be an integer >= 0")
        if oid in ids:
            raise SoraError(f"{at}.id: {oid} is used by another object")
        ids.add(oid)
        mode = obj.get("mode", "hard")
        if mode not in MODES:
            raise SoraError(f"{at}.mode: {mode!r} must be one of {list(MODES)}")
        kfs = obj.get("keyframes")
        if not isinstance(kfs, list) or not kfs:
            raise SoraError(f"{at}.keyframes: must be a non-empty list of {{frame, box}}")
        frames, boxes = [], []
        for j, kf in enumerate(kfs):
            kat = f"{at}.keyframes[{j}]"
            if not isinstance(kf, dict) or "frame" not in kf or "box" not in kf:
                raise SoraError(f"{kat}: expected {{\"frame\": int, \"box\": [x0, y0, x1, y1]}}")
            fr = kf["frame"]
            if isinstance(fr, bool) or not isinstance(fr, int) or fr < 0:
                raise SoraError(f"{kat}.frame: {fr!r} must be an integer >= 0")
            if limit is not None and fr >= limit:
                raise SoraError(f"{kat}.frame: {fr} is past the clip (frames 0..{limit - 1})")
            if frames and fr <= frames[-1]:
                raise SoraError(f"{kat}.frame: {fr} does not come after the previous keyframe ({frames[-1]}); list keyframes in increasing frame order")
            box = kf["box"]
            if not isinstance(box, list) or len(box) != 4:
                raise SoraError(f"{kat}.box: {box!r} must be [x0, y0, x1, y1]")
            x0, y0, x1, y1 = (_num(v, f"{kat}.box") for v in box)
            if min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
                raise SoraError(f"{kat}.box: {box} lies outside the frame; coordinates are fractions of the frame in [0, 1]")
            if x1 <= x0 or y1 <= y0:
                raise SoraError(f"{kat}.box: {box} is inverted or empty; need x0 < x1 and y0 < y1")
            frames.append(fr)
            boxes.append((x0, y0, x1, y1))
        tracks.append(BoxTrack(oid, mode, tuple(frames), tuple(boxes)))
    tracks.sort(key=lambda t: t.id)
    return Boxes(tuple(tracks), declared)


def load_boxes(path: str | os.PathLike, num_frames: int | None = None, max_objects: int | None = None, what: str | None = None) -> Boxes:
    """Read and validate a boxes JSON file (errors name the file and the field)."""
    name = what or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SoraError(f"{name}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SoraError(f"{name}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return parse_boxes(data, name, num_frames=num_frames, max_objects=max_objects)


def boxes_from_meta(meta: dict[str, Any], key: str = "sample") -> Boxes | None:
    """The sample json's ``boxes``, validated against its ``num_frames``; None if absent."""
    raw = meta.get("boxes")
    if raw is None:
        return None
    return parse_boxes(raw, f"{key}.json boxes", num_frames=int(meta["num_frames"]) if meta.get("num_frames") else None)


def boxes_for_clip(meta: dict[str, Any], key: str, geometry: dict[str, Any], height: int, width: int) -> Boxes | None:
    """The sample's boxes on the clip a loader cut from it: ``geometry`` as
    ``ShardVideoDataset.decode_clip`` fills it (source frame indices, resized size, crop
    offset), empty when the clip is the sample as stored (latent shards)."""
    boxes = boxes_from_meta(meta, key)
    if boxes is None or not geometry:
        return boxes
    (rh, rw), (top, left) = geometry["resized"], geometry["crop"]
    return boxes.at_frames(geometry["indices"]).cropped(rh, rw, top, left, height, width)


def collate_boxes(items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None], num_frames: int) -> dict[str, torch.Tensor] | None:
    """Per-sample dense boxes (or None) -> the batch's ``boxes`` (B, K, F, 4), ``box_valid``
    (B, K, F), ``box_hard`` (B, K) with K the most objects of any sample; None when no sample
    has boxes."""
    if all(it is None for it in items):
        return None
    K = max(1, max(it[0].shape[0] for it in items if it is not None))
    B = len(items)
    boxes = np.zeros((B, K, num_frames, 4), np.float32)
    valid = np.zeros((B, K, num_frames), bool)
    hard = np.ones((B, K), bool)
    for b, it in enumerate(items):
        if it is None:
            continue
        bx, vd, hd = it
        k = bx.shape[0]
        boxes[b, :k], valid[b, :k], hard[b, :k] = bx, vd, hd
    return {"boxes": torch.from_numpy(boxes), "box_valid": torch.from_numpy(valid), "box_hard": torch.from_numpy(hard)}


def _axis_coverage(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """Fraction of each of n equal cells of [0, 1] inside [lo, hi] -> (..., n)."""
    edges = torch.arange(n + 1, dtype=lo.dtype, device=lo.device) / n  # (n + 1,)
    a = torch.maximum(lo[..., None], edges[:-1])  # (..., n)
    b = torch.minimum(hi[..., None], edges[1:])  # (..., n)
    return (b - a).clamp(min=0) * n


def latent_frame_groups(num_frames: int, f: int) -> list[tuple[int, int]]:
    """Pixel frames [a, b) behind each of f latent frames: a causal VAE with temporal factor
    s = (F - 1) / (f - 1) encodes frame 0 alone, then groups of s; no compression (f == F)
    maps one to one."""
    if f == num_frames:
        return [(i, i + 1) for i in range(f)]
    if f == 1:
        return [(0, num_frames)]
    s = (num_frames - 1) // (f - 1)
    if 1 + (f - 1) * s != num_frames:
        raise SoraError(f"boxes: {num_frames} frames do not map onto {f} latent frames (need F = 1 + (f - 1) * s)")
    return [(0, 1)] + [(1 + (j - 1) * s, 1 + j * s) for j in range(1, f)]


def rasterise_boxes(boxes: torch.Tensor, valid: torch.Tensor, hard: torch.Tensor, max_objects: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Dense boxes -> box maps on the latent grid (B, 2 * max_objects, f, h, w).

    Channel 2k is object slot k's coverage of each latent cell when its box is hard, 2k + 1
    when soft; both are averaged over the pixel frames of a latent frame (frames without a
    box count 0). Slots past K stay 0: no boxes at all is the all-zero map.

    Args:
        boxes: (B, K, F, 4) normalised [x0, y0, x1, y1]; valid: (B, K, F) bool; hard: (B, K) bool.
        grid: the latent (f, h, w).
    """
    B, K, F, _ = boxes.shape
    if K > max_objects:
        raise SoraError(f"boxes: {K} objects, but the model was trained for at most {max_objects}")
    f, h, w = grid
    cov_x = _axis_coverage(boxes[..., 0], boxes[..., 2], w)  # (B, K, F, w)
    cov_y = _axis_coverage(boxes[..., 1], boxes[..., 3], h)  # (B, K, F, h)
    cov = cov_y[..., :, None] * cov_x[..., None, :] * valid[..., None, None].to(boxes.dtype)  # (B, K, F, h, w)
    pooled = torch.stack([cov[:, :, a:b].mean(dim=2) for a, b in latent_frame_groups(F, f)], dim=2)  # (B, K, f, h, w)
    hardf = hard.to(boxes.dtype)[:, :, None, None, None]  # (B, K, 1, 1, 1)
    maps = boxes.new_zeros(B, max_objects, CHANNELS_PER_OBJECT, f, h, w)  # (B, M, 2, f, h, w)
    maps[:, :K, 0] = pooled * hardf
    maps[:, :K, 1] = pooled * (1 - hardf)
    return maps.reshape(B, max_objects * CHANNELS_PER_OBJECT, f, h, w)  # (B, 2M, f, h, w)
