"""Native shape, measured (issue 18): ``sora-eval shapes --shapes FxHxW ...``.

Sora's promise is one model for any duration, aspect ratio and resolution. This scores a
shapes-world DiT at each requested clip shape, seen in training or not, with the same seeded
prompts everywhere:

- **one object per frame**: the fraction of generated frames in which the reader counts
  exactly one object (:meth:`AttributeReader.count_objects`). A model that only knows 32x32
  frames, asked for 32x64, tiles its 32x32 world and draws two copies;
- **caption adherence**: colour, shape and direction read back from pixels, as for the main
  text-to-video score (an image, ``1xHxW``, has no direction: colour and shape only);
- **points lost** per attribute against the reference shape, the one the export trained on
  first (``train_shape``, scored here with the same prompts and seeds).

Which shapes were trained on comes from the export (``train_buckets``, every bucket of the
run). The world each shape is drawn in is the training world resized: sizes and travel are
fractions of the frame (:class:`~sora_train.data.shapes.ShapesWorld`), so a 48x48 clip shows
a larger object than a 32x32 one, as a 48x48 training clip would.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sora_train.data.shapes import AttributeReader, ShapeAttrs, ShapesWorld
from sora_train.utils.errors import SoraError

# The bar at every shape, seen or not.
ONE_OBJECT_MIN = 0.95
MAX_POINTS_LOST = 10.0
VIDEO_ATTRIBUTES = ("colour", "shape", "direction")
IMAGE_ATTRIBUTES = ("colour", "shape")


def parse_shape(text: str) -> tuple[int, int, int]:
    """"17x32x64" -> (17, 32, 64); a one-line error names the bad entry."""
    try:
        f, h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise SoraError(f"sora-eval shapes --shapes {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 17x32x64") from None
    if f < 1 or h < 16 or w < 16:
        raise SoraError(f"sora-eval shapes --shapes {text!r}: need >= 1 frame and frames of >= 16x16 pixels")
    return f, h, w


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def world_at(base: ShapesWorld, num_frames: int, height: int, width: int) -> ShapesWorld:
    """The training world at another clip shape (an image keeps 2 frames: the world needs
    motion; only its frame size matters to the reader of a 1-frame sample)."""
    try:
        return replace(base, num_frames=max(int(num_frames), 2), height=int(height), width=int(width))
    except SoraError as e:
        raise SoraError(f"sora-eval shapes --shapes {shape_name((num_frames, height, width))}: {e}") from None


def score_clip(reader: AttributeReader, video: np.ndarray, attrs: ShapeAttrs, attributes: Sequence[str]) -> dict[str, Any]:
    """One sample (F, H, W, 3) uint8: per-attribute hits and the object count of every frame."""
    got = reader.read(video)
    counts = reader.count_objects(video)  # (F,)
    return {"hits": {k: got[k] == getattr(attrs, k) for k in attributes}, "read": {k: got[k] for k in attributes},
            "one_object_frames": int((counts == 1).sum()), "frames": int(counts.size),
            "objects_per_frame_max": int(counts.max()) if counts.size else 0}


def summarize_shape(records: Sequence[dict[str, Any]], attributes: Sequence[str]) -> dict[str, Any]:
    frames = sum(r["frames"] for r in records)
    return {
        "n": len(records),
        "accuracy": {k: float(np.mean([r["hits"][k] for r in records])) for k in attributes} if records else {},
        "one_object_frac": sum(r["one_object_frames"] for r in records) / frames if frames else None,
        # clips with a frame of two or more objects (a tiled world draws copies)
        "clips_with_copies": float(np.mean([r["objects_per_frame_max"] > 1 for r in records])) if records else None,
    }


def score_shape(pipe, base: ShapesWorld, combos: Sequence[ShapeAttrs], shape: tuple[int, int, int], settings, advance: Callable[[int], None] = lambda n: None) -> tuple[dict[str, Any], np.ndarray]:
    """Text-to-video of every caption of ``combos`` at one clip shape, in batches seeded
    ``settings.seed + first index``, scored by ``summarize_shape``. Returns (the summary, the
    first sample (F, H, W, 3) uint8)."""
    from sora_train.training.pipeline import to_uint8

    f, h, w = shape
    reader = AttributeReader(world_at(base, f, h, w))
    attributes = IMAGE_ATTRIBUTES if f == 1 else VIDEO_ATTRIBUTES
    records, first = [], None
    for b in range(0, len(combos), settings.batch_size):
        batch = list(combos[b : b + settings.batch_size])
        gen = pipe.generate([a.caption() for a in batch], f, h, w, mode="t2v", steps=settings.steps,
                            guidance_scale=settings.guidance_scale, shift=settings.shift, seed=settings.seed + b)
        videos = to_uint8(gen.video)  # (B, F, H, W, 3)
        records += [score_clip(reader, video, attrs, attributes) for video, attrs in zip(videos, batch)]
        first = videos[0] if first is None else first
        advance(len(batch))
    return summarize_shape(records, attributes), first


def evaluate_native(pipe, base: ShapesWorld, combos: Sequence[ShapeAttrs], shapes: Sequence[tuple[int, int, int]], reference: tuple[int, int, int], trained: Sequence[str], settings, advance: Callable[[int], None]) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Text-to-video at every shape in ``shapes`` (``reference`` first, added if missing), the
    same prompts and seeds at each. Returns (the report's ``native`` section, one sample per shape)."""
    order = [tuple(reference)] + [tuple(s) for s in shapes if tuple(s) != tuple(reference)]
    out: dict[str, Any] = {}
    samples: list[tuple[str, np.ndarray]] = []
    trained_set = set(trained)
    for shape in order:
        f, h, w = shape
        name = shape_name(shape)
        summary, first = score_shape(pipe, base, combos, shape, settings, advance)
        if first is not None:
            samples.append((f"{name} ({'seen' if name in trained_set else 'unseen'}): {combos[0].caption()}", first))
        out[name] = {"seen_in_training": name in trained_set, "frames": f, "height": h, "width": w, **summary}
    ref = out[shape_name(reference)]["accuracy"]
    for entry in out.values():
        entry["points_lost"] = {k: 100.0 * (ref[k] - v) for k, v in entry["accuracy"].items() if k in ref}
    return {"reference": shape_name(reference), "trained_buckets": list(trained), "shapes": out}, samples


def native_targets(report: dict[str, Any]) -> dict[str, tuple[str, str, float]]:
    """The issue's bar at each scored shape: one object in >= 95% of frames, and no attribute
    more than 10 points below the reference shape's."""
    native = report.get("native") or {}
    targets: dict[str, tuple[str, str, float]] = {}
    for name, entry in (native.get("shapes") or {}).items():
        tag = "seen" if entry.get("seen_in_training") else "unseen"
        targets[f"native {name} ({tag}): one object per frame"] = (f"native.shapes.{name}.one_object_frac", ">=", ONE_OBJECT_MIN)
        if name == native.get("reference"):
            continue
        for attr in entry.get("points_lost", {}):
            targets[f"native {name} ({tag}): {attr} points lost vs {native['reference']}"] = (
                f"native.shapes.{name}.points_lost.{attr}", "<=", MAX_POINTS_LOST)
    return targets


def write_native_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, max_frames: int = 9) -> Path:
    """One row per shape: its label above evenly spaced frames, each frame at its own size
    (wide frames wide, tall frames tall), on a white canvas."""
    from PIL import Image, ImageDraw

    if not rows:
        raise SoraError("write_native_grid: no samples to draw")
    scale, label_h, gap = 2, 12, 4
    row_h = [label_h + v.shape[1] * scale + gap for _, v in rows]
    row_w = [min(max_frames, v.shape[0]) * (v.shape[2] * scale + gap) for _, v in rows]
    canvas = Image.new("RGB", (max(max(row_w), 480), sum(row_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, frames), h in zip(rows, row_h):
        idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
        draw.text((2, y), label[:110], fill=(0, 0, 0))
        x = 0
        for i in idx:
            img = Image.fromarray(frames[i]).resize((frames.shape[2] * scale, frames.shape[1] * scale), Image.NEAREST)
            canvas.paste(img, (x, y + label_h))
            x += frames.shape[2] * scale + gap
        y += h
    canvas.save(path)
    return Path(path)


__all__ = ["evaluate_native", "native_targets", "parse_shape", "shape_name", "world_at", "write_native_grid"]
