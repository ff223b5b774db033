"""The shapes world: procedurally generated clips whose every attribute can be read back.

Each clip shows one flat object — a known colour and shape, one of two sizes — gliding at
constant speed in one of four directions over a plain dark background, seen by a static
camera, and is captioned accordingly. It exists for two reasons:

- it is the framework's embedded default dataset: written as real H.264 mp4 into real
  shards (through :class:`~sora_train.data.shards.ShardWriter`), so the demo exercises
  exactly the path real footage takes, with nothing to download;
- it is an honest quality check: :class:`AttributeReader` measures colour, shape, direction
  and size back from pixels analytically (no learned judge to fool), so a model's samples
  can be scored for caption adherence, and held-out (colour, shape) pairs test
  compositional generalisation.

Geometry is in pixel coordinates: x right, y down, pixel ``i`` covers ``[i, i + 1)``.
Sizes and speeds are fractions of the frame, so the same world works at 32x32 and 64x64.
All shapes of one size have the same *area* (that of a circle of the sampled radius), so
size can be read from area alone, independent of shape.

Typical use::

    world = ShapesWorld(height=32, width=32)
    root = ensure_shapes_dataset("data/shapes", num_train=4096, num_val=256, seed=0, world=world)
    reader = AttributeReader(world)
    reader.read(frames)["colour"]          # frames: (F, H, W, 3) uint8 or float in [-1, 1]
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sora_train.data.shards import INDEX_NAME, REJECTS_NAME, ShardWriter
from sora_train.data.video_io import encode_video
from sora_train.utils.errors import SoraError
from sora_train.utils.io import file_lock, sha256_bytes

# Bump when rendering, captions or sampling change: it is part of the options stored in
# index.json, so ensure_shapes_dataset regenerates stale sets instead of reusing them.
SHAPES_VERSION = 2  # 2: every sample's json carries its per-frame `boxes`; world option `motion`

# -- vocabulary ---------------------------------------------------------------------------
# Six saturated hues plus white. As directions in RGB (what the reader compares, so overall
# brightness does not matter) every pair is >= 28 degrees apart. Channels stay inside
# 30..250, off the 0/255 rails, so H.264's limited-range YUV round trip does not clip, and
# every colour has luma Y >= ~90 of 255 so its edges survive 4:2:0 chroma subsampling
# against black (pure blue, Y ~ 29, would live mostly in the half-resolution chroma planes).
# Orange is left out: ~20 degrees from both red and yellow, too close for blurry samples.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 40, 40),
    "green": (40, 210, 60),
    "blue": (60, 80, 250),
    "yellow": (240, 220, 40),
    "cyan": (30, 220, 220),
    "magenta": (225, 40, 225),
    "white": (235, 235, 235),
}
# Four shapes that stay distinct at 32x32: they differ in how much of their bounding box
# they fill (square 1, circle pi/4, triangle and diamond 1/2) and the triangle alone is
# top-bottom asymmetric. A fifth (e.g. a cross) would blur into one of these at 6 px.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = ("straight", "varied")
# varied motion: how far a waypoint may leave the straight line, fraction of the frame across it
VARIED_OFFSET = 0.3

# Unit motion vector (x right, y down) of each direction.
_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_DENSE_PATH = {
    "left": "from right to left",
    "right": "from left to right",
    "up": "from the bottom toward the top",
    "down": "from the top toward the bottom",
}
_DENSE_SHAPE = {"circle": "circle", "square": "square", "triangle": "triangle pointing upward", "diamond": "diamond"}
_DENSE_COLOUR = {
    "red": "bright red",
    "green": "bright green",
    "blue": "vivid blue",
    "yellow": "bright yellow",
    "cyan": "bright cyan",
    "magenta": "vivid magenta",
    "white": "pure white",
}

# Shape geometry, per unit "radius" r (every shape has area pi r^2, see module docstring).
_SQUARE_HALF = math.sqrt(math.pi) / 2  # half side: (2 a)^2 = pi r^2
_TRI_SIDE = math.sqrt(2 * math.pi)  # base = height = b: b^2 / 2 = pi r^2
_DIAMOND_HALF = math.sqrt(math.pi / 2)  # half diagonal: 2 d^2 = pi r^2
# Largest half-extent over all shapes (triangle and diamond: 1.2533 r); every shape is kept
# in frame with this same bound so start positions do not depend on (and leak) the shape.
MAX_HALF_EXTENT = max(1.0, _SQUARE_HALF, _TRI_SIDE / 2, _DIAMOND_HALF)
# The upward triangle's centroid sits b/6 below its bounding-box centre (y down).
_CENTROID_OFFSET_Y = {"circle": 0.0, "square": 0.0, "triangle": _TRI_SIDE / 6, "diamond": 0.0}

# Independent random streams under one seed (numpy SeedSequence entropy words).
_ATTR_STREAM, _RENDER_STREAM, _HELDOUT_STREAM = 1, 2, 3
SPLITS = ("train", "val", "heldout")
LICENSE = "CC0-1.0, procedurally generated"
TOOL = "sora_train.data.shapes"


# -- attributes and captions ----------------------------------------------------------------
@dataclass(frozen=True)
class ShapeAttrs:
    """The facts a clip is generated from and captioned with (and that the reader measures)."""

    colour: str
    shape: str
    direction: str
    size: str

    def __post_init__(self) -> None:
        for name, vocab in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("size", SIZES)):
            value = getattr(self, name)
            if value not in vocab:
                raise SoraError(f"ShapeAttrs: unknown {name} {value!r}; choose one of {list(vocab)}")

    def caption(self) -> str:
        """Short caption, the style of a user prompt: ``a small red circle moving left``."""
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction}"

    def dense_caption(self, background: str = "black") -> str:
        """Long caption with the same facts, the style the caption re-writer produces."""
        return (
            f"A {self.size} {_DENSE_COLOUR[self.colour]} {_DENSE_SHAPE[self.shape]} glides steadily "
            f"{_DENSE_PATH[self.direction]} across a plain {background} background, "
            f"seen by a static camera."
        )

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def pair(self) -> tuple[str, str]:
        """The (colour, shape) pair that held-out splits are defined over."""
        return (self.colour, self.shape)


@dataclass(frozen=True)
class ShapeMotion:
    """Where one clip's object is: its size and the bounding-box centre at first/last frame.

    ``radius`` is the equal-area radius in pixels; positions are (x, y) in pixels.
    ``waypoints``: (t, x, y) with t in [0, 1] over the clip, increasing, first at (0, start)
    and last at (1, end): the centre moves piecewise linearly through them (turns, speed
    changes, stops); empty = constant velocity from start to end.
    """

    radius: float
    start: tuple[float, float]
    end: tuple[float, float]
    waypoints: tuple[tuple[float, float, float], ...] = ()

    def centres(self, num_frames: int) -> np.ndarray:
        """Bounding-box centre per frame -> (F, 2) as (x, y)."""
        t = np.linspace(0.0, 1.0, num_frames)  # (F,)
        if self.waypoints:
            wp = np.asarray(self.waypoints, np.float64)  # (K, 3) as (t, x, y)
            return np.stack([np.interp(t, wp[:, 0], wp[:, 1]), np.interp(t, wp[:, 0], wp[:, 2])], axis=1)  # (F, 2)
        return np.asarray(self.start) + t[:, None] * (np.asarray(self.end) - np.asarray(self.start))  # (F, 2)


def half_extent(shape: str, radius: float) -> tuple[float, float]:
    """Half width and half height of ``shape``'s bounding box at equal-area ``radius`` (px)."""
    if shape == "circle":
        return radius, radius
    if shape == "square":
        return _SQUARE_HALF * radius, _SQUARE_HALF * radius
    if shape == "triangle":
        return _TRI_SIDE * radius / 2, _TRI_SIDE * radius / 2
    if shape == "diamond":
        return _DIAMOND_HALF * radius, _DIAMOND_HALF * radius
    raise SoraError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def centroid_offset(shape: str, radius: float) -> tuple[float, float]:
    """(dx, dy) px from ``shape``'s bounding-box centre to its centroid (what the reader
    tracks): non-zero only for the upward triangle."""
    return 0.0, _CENTROID_OFFSET_Y[shape] * radius


def clip_boxes(shape: str, centres: np.ndarray, radius: float, height: int, width: int) -> np.ndarray:
    """The object's bounding box per frame, normalised [x0, y0, x1, y1] -> (F, 4), clipped to
    the frame (the world keeps objects inside it, so clipping only absorbs rounding)."""
    hx, hy = half_extent(shape, radius)
    x, y = centres[:, 0], centres[:, 1]  # (F,)
    out = np.stack([(x - hx) / width, (y - hy) / height, (x + hx) / width, (y + hy) / height], axis=1)  # (F, 4)
    return np.clip(out, 0.0, 1.0)


def boxes_json(shape: str, motion: "ShapeMotion", num_frames: int, height: int, width: int) -> dict[str, Any]:
    """The sample json's ``boxes`` (sora_train.data.boxes format): one hard box per frame."""
    boxes = clip_boxes(shape, motion.centres(num_frames), motion.radius, height, width)  # (F, 4)
    keyframes = [{"frame": i, "box": [round(float(v), 5) for v in b]} for i, b in enumerate(boxes)]
    return {"num_frames": num_frames, "objects": [{"id": 0, "mode": "hard", "keyframes": keyframes}]}


# -- the world ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapesWorld:
    """Renders shapes clips at one resolution and length.

    Args:
        height, width: frame size in pixels (H.264 wants even sizes; odd ones are padded).
        num_frames: frames per clip; 17 = 1 + 16 suits a causal VAE with 4x temporal
            compression (first frame alone, then groups of four).
        fps: frame rate written into the container and the json.
        background: RGB of the plain backdrop; must be dark so every colour contrasts.
        small_radius, large_radius: ranges of the equal-area radius, as fractions of
            min(H, W). The gap between them (0.12 -> 0.165, a factor 1.375) is what lets the
            reader tell sizes apart with margin after compression or blur.
        travel: range of the distance moved over the clip, as a fraction of the frame along
            the motion axis (speed = travel / duration, constant within a clip); >= 1/3 so
            motion is unmistakable even in a blurry sample.
        margin: gap kept between the object's extent and the frame edge, fraction of frame.
        supersample: sub-samples per pixel side for antialiased coverage (4 -> 16 per
            pixel, coverage quantised to 1/16; finer changes nothing visible after H.264).
        motion: "straight" (constant velocity, the captioned direction) or "varied": the same
            start and end (so the caption's direction is still the net motion) reached through
            one or two random waypoints off the straight line, at random times, sometimes
            pausing — turns, speed changes and stops for box control to learn from.
    """

    height: int = 32
    width: int = 32
    num_frames: int = 17
    fps: float = 8.0
    background: tuple[int, int, int] = (0, 0, 0)
    small_radius: tuple[float, float] = (0.10, 0.12)
    large_radius: tuple[float, float] = (0.165, 0.19)
    travel: tuple[float, float] = (0.35, 0.45)
    margin: float = 0.03
    supersample: int = 4
    motion: str = "straight"

    def __post_init__(self) -> None:
        # Fields may arrive as lists from a config; store tuples so the world stays hashable.
        for name in ("background", "small_radius", "large_radius", "travel"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.height < 16 or self.width < 16:
            raise SoraError(f"ShapesWorld: frames of {self.height}x{self.width} are too small; need >= 16x16 to draw a shape")
        if self.num_frames < 2:
            raise SoraError(f"ShapesWorld: num_frames={self.num_frames}; motion needs at least 2 frames")
        if self.fps <= 0:
            raise SoraError(f"ShapesWorld: fps={self.fps} must be positive")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise SoraError(f"ShapesWorld: background {self.background} must be an RGB triple in 0..255")
        if max(self.background) > 64:  # the palette's darkest channel mix is ~90 luma: keep contrast
            raise SoraError(f"ShapesWorld: background {self.background} is too bright; use black or a dark grey (<= 64)")
        for name in ("small_radius", "large_radius", "travel"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise SoraError(f"ShapesWorld: {name}={getattr(self, name)} must be an increasing range of positive fractions")
        if self.small_radius[1] >= self.large_radius[0]:
            raise SoraError(f"ShapesWorld: small_radius {self.small_radius} overlaps large_radius {self.large_radius}")
        if self.motion not in MOTIONS:
            raise SoraError(f"ShapesWorld: motion={self.motion!r} must be one of {list(MOTIONS)}")
        if not 1 <= self.supersample <= 15:  # coverage counts ss^2 sub-samples in a uint8
            raise SoraError(f"ShapesWorld: supersample={self.supersample} must be in 1..15")
        side = min(self.height, self.width)
        for axis_len in (self.height, self.width):
            need = 2 * MAX_HALF_EXTENT * self.large_radius[1] * side + (self.travel[1] + 2 * self.margin) * axis_len
            if need > axis_len:
                raise SoraError(
                    f"ShapesWorld: a large shape (radius {self.large_radius[1]}) travelling {self.travel[1]} of the frame "
                    f"does not fit in {self.height}x{self.width} with margin {self.margin}; shrink large_radius or travel"
                )

    # -- vocabulary ---------------------------------------------------------------------------
    @staticmethod
    def combos() -> list[ShapeAttrs]:
        """Every attribute combination, in a fixed order (colour, shape, direction, size)."""
        return list(_all_combos())

    @property
    def background_name(self) -> str:
        """How the dense caption names the backdrop."""
        return "black" if max(self.background) < 8 else "dark grey"  # < 8: indistinguishable from black

    def options(self) -> dict[str, Any]:
        """JSON-ready description (recorded in index.json so stale datasets are detected)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def size_threshold(self) -> float:
        """Radius (fraction of min(H, W)) that separates small from large: the geometric
        midpoint of the gap, so either side has the same relative margin."""
        return math.sqrt(self.small_radius[1] * self.large_radius[0])

    # -- sampling -----------------------------------------------------------------------------
    def attrs_for(self, index: int, seed: int, combos: Sequence[ShapeAttrs] | None = None) -> ShapeAttrs:
        """Attributes of clip ``index``: a seeded permutation of ``combos`` per block of
        len(combos) clips, so every combination appears equally often (exactly, per block)
        and the sequence does not cycle in a visible order."""
        if index < 0 or seed < 0:
            raise SoraError(f"attrs_for: index ({index}) and seed ({seed}) must be >= 0")
        combos = self.combos() if combos is None else list(combos)
        if not combos:
            raise SoraError("attrs_for: empty list of combinations")
        block, pos = divmod(index, len(combos))
        perm = np.random.default_rng([seed, _ATTR_STREAM, block]).permutation(len(combos))
        return combos[int(perm[pos])]

    def sample_motion(self, attrs: ShapeAttrs, rng: np.random.Generator) -> ShapeMotion:
        """Draw size, travel and a start point that keeps the whole object in frame."""
        side = min(self.height, self.width)
        lo, hi = self.small_radius if attrs.size == "small" else self.large_radius
        radius = rng.uniform(lo, hi) * side
        ext = MAX_HALF_EXTENT * radius
        vx, vy = _DIRECTION_VECTORS[attrs.direction]
        moving_x = vx != 0
        along_len, across_len = (self.width, self.height) if moving_x else (self.height, self.width)
        travel = rng.uniform(*self.travel) * along_len
        m_along, m_across = self.margin * along_len, self.margin * across_len
        # Start range along the motion axis: the end point (start +/- travel) must stay inside too.
        lo_a, hi_a = m_along + ext, along_len - m_along - ext - travel
        start_along = rng.uniform(lo_a, hi_a)
        sign = vx or vy
        if sign < 0:  # moving toward 0: mirror so the start is on the far side
            start_along = along_len - start_along
        across = rng.uniform(m_across + ext, across_len - m_across - ext)
        end_along = start_along + sign * travel
        xy = (lambda a, c: (float(a), float(c))) if moving_x else (lambda a, c: (float(c), float(a)))
        if self.motion == "straight":
            return ShapeMotion(float(radius), xy(start_along, across), xy(end_along, across))
        # varied: 1-2 waypoints between start and end along the axis, off the line across it,
        # at random times (uneven speed); half the time one of them is held (a stop).
        n = int(rng.integers(1, 3))
        lo_c, hi_c = m_across + ext, across_len - m_across - ext
        fracs = np.sort(rng.uniform(0.15, 0.85, n))
        times = np.sort(rng.uniform(0.1, 0.9, n))
        points = [(0.0, *xy(start_along, across))]
        for fr, tm in zip(fracs, times):
            c = float(np.clip(across + rng.uniform(-VARIED_OFFSET, VARIED_OFFSET) * across_len, lo_c, hi_c))
            points.append((float(tm), *xy(start_along + sign * fr * travel, c)))
        if rng.random() < 0.5:  # stop: hold one waypoint for a while
            j = 1 + int(rng.integers(n))
            hold = float(min(points[j][0] + rng.uniform(0.1, 0.25), 0.95))
            nxt = points[j + 1][0] if j + 1 < len(points) else 1.0
            if hold < nxt:
                points.insert(j + 1, (hold, points[j][1], points[j][2]))
        points.append((1.0, *xy(end_along, across)))
        return ShapeMotion(float(radius), xy(start_along, across), xy(end_along, across), tuple(points))

    # -- drawing ------------------------------------------------------------------------------
    def coverage(self, shape: str, centres: np.ndarray, radius: float) -> np.ndarray:
        """Antialiased coverage in [0, 1] of ``shape`` at bounding-box ``centres`` (F, 2) ->
        (F, H, W) float32, by supersampling: the same geometry the reader's templates use."""
        return _coverage(shape, centres, radius, self.height, self.width, self.supersample)  # (F, H, W)

    def draw(self, attrs: ShapeAttrs, motion: ShapeMotion) -> np.ndarray:
        """Frames of one clip -> (F, H, W, 3) uint8."""
        cov = self.coverage(attrs.shape, motion.centres(self.num_frames), motion.radius)  # (F, H, W)
        bg = np.asarray(self.background, np.float32)  # (3,)
        fg = np.asarray(COLOURS[attrs.colour], np.float32)  # (3,)
        frames = bg + cov[..., None] * (fg - bg)  # (F, H, W, 3)
        return np.rint(frames).astype(np.uint8)

    def render(self, attrs: ShapeAttrs, rng: np.random.Generator) -> np.ndarray:
        """A random clip with ``attrs`` -> (F, H, W, 3) uint8 (see :meth:`sample_motion`)."""
        return self.draw(attrs, self.sample_motion(attrs, rng))


@functools.lru_cache(maxsize=1)
def _all_combos() -> tuple[ShapeAttrs, ...]:
    return tuple(ShapeAttrs(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, SIZES))


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Point-in-shape test for offsets from the bounding-box centre (broadcasting)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        a = _SQUARE_HALF * r
        return (np.abs(dx) <= a) & (np.abs(dy) <= a)
    if shape == "triangle":  # apex up at dy = -b/2, base at dy = +b/2; half-width grows to b/2
        b = _TRI_SIDE * r
        return (np.abs(dy) <= b / 2) & (np.abs(dx) <= (dy + b / 2) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= _DIAMOND_HALF * r
    raise SoraError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


# -- held-out combinations --------------------------------------------------------------------
HELDOUT_FRACTION = 0.125  # ~1 pair in 8: enough to measure generalisation, little lost to training


def default_heldout(seed: int = 0) -> list[tuple[str, str]]:
    """A deterministic set of (colour, shape) pairs to keep out of training.

    About 12.5% of pairs, at most one per colour and one per shape, so every colour and every
    shape is still seen in training (in other pairings) and each held-out pair is a genuinely
    new composition of known parts.
    """
    rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    n = max(1, round(HELDOUT_FRACTION * len(COLOURS) * len(SHAPES)))
    n = min(n, len(SHAPES), len(COLOURS))  # each pair needs its own colour and shape
    return sorted(zip(colours[:n], shapes[:n]))


def _check_heldout(heldout: Iterable[Sequence[str]], palette: Sequence[str] = tuple(COLOURS)) -> list[tuple[str, str]]:
    pairs = sorted({(str(c), str(s)) for c, s in heldout})
    for c, s in pairs:
        if c not in COLOURS or s not in SHAPES:
            raise SoraError(
                f"held-out pair ({c!r}, {s!r}) is not in the vocabulary: colours {list(COLOURS)}, shapes {list(SHAPES)}"
            )
        if c not in palette:
            raise SoraError(f"held-out pair ({c!r}, {s!r}): colour {c!r} is not in the data set's colours {list(palette)}")
    for c in palette:
        if all((c, s) in pairs for s in SHAPES):
            raise SoraError(f"held-out pairs remove every shape of colour {c!r}; training must still see each colour")
    for s in SHAPES:
        if all((c, s) in pairs for c in palette):
            raise SoraError(f"held-out pairs remove every colour of shape {s!r}; training must still see each shape")
    return pairs


# -- writing shard sets -----------------------------------------------------------------------
def _split_seed(seed: int, split: str) -> int:
    """One seed per split, so train/val/heldout draw different clips under one user seed."""
    return seed * len(SPLITS) + SPLITS.index(split)


@dataclass(frozen=True)
class ShapesSetSpec:
    """What a generated shapes dataset holds (the options each split's index.json records).

    Args:
        num_train, num_val: clips in train and val; neither holds a held-out pair.
        seed: the user seed (each split draws from its own stream of it).
        world: the world the clips are drawn from.
        heldout: (colour, shape) pairs kept out of train and val; None: :func:`default_heldout`
            of ``seed`` (its pairs of colours in the palette); ``[]``: none.
        num_heldout: clips in the heldout split (default ``num_val``; 0 without pairs).
        clips_per_shard: samples per tar.
        container, codec, crf: how clips are encoded (codec None: the container's default).
        colours: the palette every split draws from (None: all of :data:`COLOURS`);
            ``exclude_colours`` are then removed from it. E.g. ``exclude_colours=["yellow"]``:
            no clip and no caption of any split shows yellow (a colour to fine-tune in later);
            ``colours=["yellow"], heldout=[]``: only yellow clips. index.json records the
            palette (``colours``) when it is not the full one.
        clip_shapes: native shapes, ``[(num_frames, height, width), ...]``: clip ``i`` of each
            split is drawn by ``world`` resized to shape ``i % len(clip_shapes)`` (sizes and
            travel stay fractions of the frame, see :class:`ShapesWorld`), so one set holds
            wide, tall, square, short and long clips for bucketed training (Sora's native
            shape). None: every clip at ``world``'s own shape. Recorded in index.json when set.
    """

    num_train: int
    num_val: int
    seed: int = 0
    world: ShapesWorld = ShapesWorld()
    heldout: Iterable[Sequence[str]] | None = None
    num_heldout: int | None = None
    clips_per_shard: int = 256
    container: str = "mp4"
    codec: str | None = None
    crf: int = 18
    colours: Sequence[str] | None = None
    exclude_colours: Sequence[str] = ()
    clip_shapes: Sequence[Sequence[int]] | None = None

    def __post_init__(self) -> None:
        if self.clip_shapes is not None:  # tuples: the spec stays hashable; a bad shape fails here, not mid-write
            try:
                shapes = tuple(tuple(int(v) for v in shape) for shape in self.clip_shapes)
            except (TypeError, ValueError):
                raise SoraError(f"shapes dataset: clip_shapes={self.clip_shapes!r} must be a list of [num_frames, height, width]") from None
            if not shapes or any(len(shape) != 3 for shape in shapes):
                raise SoraError(f"shapes dataset: clip_shapes={self.clip_shapes!r} must be a non-empty list of [num_frames, height, width]")
            object.__setattr__(self, "clip_shapes", shapes)
            self.worlds  # each shape's world checks that a large shape fits its frame
        if self.num_train < 0 or self.num_val < 0 or self.seed < 0:
            raise SoraError(f"shapes dataset: num_train={self.num_train}, num_val={self.num_val}, seed={self.seed} must be >= 0")
        for name in ("colours", "exclude_colours"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise SoraError(f"shapes dataset: {name}={value!r} must be a list of colour names, not one string")
            unknown = [c for c in (value or ()) if c not in COLOURS]
            if unknown:
                raise SoraError(f"shapes dataset: {name} names {unknown}, not in the vocabulary {list(COLOURS)}")
        if not self.palette:
            raise SoraError(f"shapes dataset: colours={self.colours} minus exclude_colours={list(self.exclude_colours)} leaves no colour to draw")

    @property
    def palette(self) -> tuple[str, ...]:
        """The colours clips are drawn in, in vocabulary order."""
        chosen = set(COLOURS if self.colours is None else self.colours) - set(self.exclude_colours)
        return tuple(c for c in COLOURS if c in chosen)

    @functools.cached_property
    def worlds(self) -> tuple[ShapesWorld, ...]:
        """The world of each native shape, in ``clip_shapes`` order (``(world,)`` without them)."""
        if self.clip_shapes is None:
            return (self.world,)
        out = []
        for f, h, w in self.clip_shapes:
            try:
                out.append(replace(self.world, num_frames=f, height=h, width=w))
            except SoraError as e:
                raise SoraError(f"shapes dataset: clip_shapes entry {[f, h, w]}: {e}") from None
        return tuple(out)

    def world_for(self, index: int) -> ShapesWorld:
        """The world clip ``index`` of a split is drawn in."""
        return self.worlds[index % len(self.worlds)]

    @functools.cached_property
    def pairs(self) -> list[tuple[str, str]]:
        """The held-out (colour, shape) pairs, checked."""
        if self.heldout is None:
            return _check_heldout([p for p in default_heldout(self.seed) if p[0] in self.palette], self.palette)
        return _check_heldout(self.heldout, self.palette)

    @property
    def heldout_clips(self) -> int:
        if not self.pairs:
            return 0
        return self.num_val if self.num_heldout is None else self.num_heldout

    def options(self) -> dict[str, Any]:
        return {
            "shapes_version": SHAPES_VERSION,
            "seed": self.seed,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_heldout": self.heldout_clips,
            "world": self.world.options(),
            "heldout_pairs": [list(p) for p in self.pairs],
            "container": self.container,
            "codec": self.codec,
            "crf": self.crf,
            "clips_per_shard": self.clips_per_shard,
            # recorded only when restricted, so sets written before the option stay current
            **({"colours": list(self.palette)} if self.palette != tuple(COLOURS) else {}),
            **({"clip_shapes": [list(shape) for shape in self.clip_shapes]} if self.clip_shapes is not None else {}),
        }


def _sample_meta(
    world: ShapesWorld, attrs: ShapeAttrs, motion: ShapeMotion, split: str, index: int, seed: int, data: bytes
) -> dict[str, Any]:
    short = attrs.caption()
    return {
        "caption": short,
        "captions": {"original": short, "dense": attrs.dense_caption(world.background_name)},
        "fps": world.fps,
        "num_frames": world.num_frames,
        "width": world.width,
        "height": world.height,
        "duration": world.num_frames / world.fps,
        "frame_range": [0, world.num_frames],
        "source": {"path": f"shapes://{seed}/{split}/{index}", "sha256": sha256_bytes(data)},
        "license": LICENSE,
        "attributes": attrs.as_dict(),
        "motion": {
            "radius_px": round(motion.radius, 4),
            "start_xy": [round(v, 4) for v in motion.start],
            "end_xy": [round(v, 4) for v in motion.end],
            **({"waypoints_txy": [[round(v, 4) for v in p] for p in motion.waypoints]} if motion.waypoints else {}),
        },
        "boxes": boxes_json(attrs.shape, motion, world.num_frames, world.height, world.width),
    }


def generate_shards(out_dir: str | os.PathLike, num_train: int, num_val: int, progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Write ``out_dir/{train,val,heldout}/`` shard sets of encoded shapes clips.

    ``settings``: the rest of :class:`ShapesSetSpec` (seed, world, heldout, num_heldout,
    clips_per_shard, container, codec, crf, colours, exclude_colours). train and val never
    contain a held-out (colour, shape) pair; heldout holds only those pairs; no split holds a
    colour outside the palette. The same arguments give identical
    frames everywhere and byte-identical mp4s with the same libx264 build (x264 is
    deterministic for a fixed input and settings). Encoding dominates the cost (~7 ms a
    32x32 clip), ~100-150 clips/s on one core, so there is no worker pool.

    Returns:
        {"train": index, "val": index, "heldout": index, "heldout_pairs": [...],
         "seconds": wall time, "clips_per_second": throughput}.
    """
    spec = ShapesSetSpec(num_train, num_val, **settings)
    world, seed, pairs, options = spec.world, spec.seed, spec.pairs, spec.options()
    all_combos = [a for a in world.combos() if a.colour in spec.palette]
    seen = [a for a in all_combos if a.pair not in pairs]
    unseen = [a for a in all_combos if a.pair in pairs]
    plan = [("val", num_val, seen), ("heldout", spec.heldout_clips, unseen), ("train", num_train, seen)]

    out_dir = Path(out_dir)
    total = sum(n for _, n, _ in plan)
    bar, task = _progress(progress, total)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"heldout_pairs": [list(p) for p in pairs]}
    try:
        # train goes last, so a train/index.json is the last thing a completed run writes.
        for split, count, combos in plan:
            sseed = _split_seed(seed, split)
            _clear_split(out_dir / split)  # a rewrite must not leave an older, longer set's shards
            writer = ShardWriter(out_dir / split, max_count=spec.clips_per_shard, tool=TOOL, options={**options, "split": split})
            with writer:
                for i in range(count):
                    attrs = world.attrs_for(i, sseed, combos)
                    clip_world = spec.world_for(i)  # world itself unless clip_shapes are set
                    motion = clip_world.sample_motion(attrs, np.random.default_rng([sseed, _RENDER_STREAM, i]))
                    frames = clip_world.draw(attrs, motion)  # (F, H, W, 3) uint8
                    data = encode_video(frames, clip_world.fps, container=spec.container, codec=spec.codec, crf=spec.crf)
                    meta = _sample_meta(clip_world, attrs, motion, split, i, seed, data)
                    writer.write(f"shapes_{split}_{i:06d}", {spec.container: data}, meta)
                    if bar is not None:
                        bar.advance(task)
            result[split] = _read_json(out_dir / split / INDEX_NAME)  # written by writer.__exit__
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - t0
    result["seconds"] = seconds
    result["clips_per_second"] = total / seconds if seconds > 0 else float("inf")
    return result


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _progress(enabled: bool, total: int):
    """A rich progress bar (lazy import: rich is only needed when someone is watching)."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("shapes"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task = bar.add_task("generate", total=total)
    bar.start()
    return bar, task


def _clear_split(split_dir: Path) -> None:
    """Remove only what a ShardWriter wrote, so a regenerated set has no stale shards."""
    if not split_dir.is_dir():
        return
    for p in split_dir.iterdir():
        shard = p.name.startswith("shard-") and p.name.endswith(".tar")
        partial = p.name.startswith(".shard-") and p.name.endswith(".tmp")
        if shard or partial or p.name in (INDEX_NAME, REJECTS_NAME):
            p.unlink()


PREPARE_LOCK = ".prepare.lock"  # under a shapes root: held while one process generates it


def ensure_shapes_dataset(root: str | os.PathLike, num_train: int, num_val: int, progress: bool = False, **settings: Any) -> Path:
    """Generate the shapes dataset under ``root`` (as :func:`generate_shards`) unless an
    identical one is already there.

    "Identical" means every split's index.json records the same options (counts, seed,
    world, held-out pairs, codec, generator version); anything else is cleared and
    regenerated, so a changed config never silently trains on stale clips.

    Any number of processes (sweep trials, ranks, nodes on a shared filesystem) may call this
    at once on a missing or half-written set: the check and the generation happen under one
    lock file, ``<root>/.prepare.lock``, so exactly one generates and the others wait, then
    find the set complete. A generator killed half-way releases the lock with its process;
    the next caller sees no matching index and generates again.
    """
    root = Path(root)
    expected = ShapesSetSpec(num_train, num_val, **settings).options()

    def complete() -> bool:
        return all(_index_options(root / s) == {**expected, "split": s} for s in SPLITS)

    if complete():  # the common case takes no lock (a finished set is only ever read)
        return root
    with file_lock(root / PREPARE_LOCK, what=f"writing the shapes data set {root}"):
        if not complete():
            generate_shards(root, num_train, num_val, progress=progress, **settings)
    return root


def _index_options(split_dir: Path) -> dict[str, Any] | None:
    try:
        return _read_json(split_dir / INDEX_NAME).get("options")
    except (OSError, json.JSONDecodeError):
        return None


# -- reading attributes back from pixels ----------------------------------------------------
def _coverage(shape: str, centres: np.ndarray, radius: np.ndarray | float, height: int, width: int, ss: int) -> np.ndarray:
    """Supersampled coverage of ``shape`` -> (K, H, W) float32; ``radius`` scalar or (K,)."""
    sub = (np.arange(ss) + 0.5) / ss  # sample offsets inside a pixel
    xs = (np.arange(width)[:, None] + sub[None]).reshape(-1)  # (W*ss,)
    ys = (np.arange(height)[:, None] + sub[None]).reshape(-1)  # (H*ss,)
    dx = xs[None, None, :] - centres[:, 0, None, None]  # (K, 1, W*ss)
    dy = ys[None, :, None] - centres[:, 1, None, None]  # (K, H*ss, 1)
    r = np.broadcast_to(np.asarray(radius, np.float64), (len(centres),))[:, None, None]  # (K, 1, 1)
    inside = _inside(shape, dx, dy, r).view(np.uint8)  # (K, H*ss, W*ss) 0/1
    sub_px = inside.reshape(len(centres), height, ss, width, ss)  # (K, H, ss, W, ss)
    # Explicit slice sums: ~10x faster than .mean(axis=(2, 4)) on this strided layout.
    counts = sum(sub_px[..., i] for i in range(ss))  # (K, H, ss, W)
    counts = sum(counts[:, :, j] for j in range(ss))  # (K, H, W), at most ss^2 <= 225 fits uint8
    return counts.astype(np.float32) / (ss * ss)


def _shift_max(x: np.ndarray) -> np.ndarray:
    """3x3 maximum filter over the last two axes (zero padding), done separably (W then H)."""
    row = x.copy()
    np.maximum(row[..., 1:], x[..., :-1], out=row[..., 1:])  # left neighbour
    np.maximum(row[..., :-1], x[..., 1:], out=row[..., :-1])  # right neighbour
    out = row.copy()
    np.maximum(out[..., 1:, :], row[..., :-1, :], out=out[..., 1:, :])  # neighbour above
    np.maximum(out[..., :-1, :], row[..., 1:, :], out=out[..., :-1, :])  # neighbour below
    return out


def _component_labels(mask: np.ndarray) -> np.ndarray:
    """8-connected components of each frame's mask (F, H, W) bool -> (F, H, W) int64 labels,
    0 outside the mask; pixels of one component share one label.

    Label propagation with pointer jumping: every pixel's label is the flat index (+1) of a
    pixel in its own component; each step takes the neighbourhood maximum and then follows
    the label to that pixel's label, so information travels exponentially fast and a few
    steps suffice. (scipy.ndimage.label would do, but the package does not depend on scipy.)
    """
    labels = np.where(mask, np.arange(1, mask.size + 1, dtype=np.int64).reshape(mask.shape), 0)  # (F, H, W)
    where = np.flatnonzero(mask)
    for _ in range(mask.size):  # bound only; converges in a few dozen steps at most
        grown = np.where(mask, _shift_max(labels), 0).reshape(-1)  # (F*H*W,)
        grown[where] = grown[grown[where] - 1]  # jump: adopt the label of the pixel we point to
        grown = grown.reshape(mask.shape)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of each frame's mask (F, H, W) bool -> same shape."""
    labels = _component_labels(mask)
    out = np.zeros_like(mask)
    for f in range(mask.shape[0]):
        lab = labels[f][mask[f]]
        if lab.size:
            values, counts = np.unique(lab, return_counts=True)
            out[f] = labels[f] == values[np.argmax(counts)]
    return out


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur as a matrix (zero padding): blurring a window is two matmuls."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n) offsets
    rad = int(math.ceil(3 * sigma))  # truncate at 3 sigma: 99.7% of the kernel's mass
    g = np.where(np.abs(d) <= rad, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    return (g / np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2).sum()).astype(np.float32)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes of (..., H, W) (zero padding)."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    return _blur_matrix(h, float(sigma)) @ x @ _blur_matrix(w, float(sigma)).T  # (..., H, W)


@dataclass
class _Track:
    """Per-frame measurements of the one object (internal to the reader)."""

    present: np.ndarray  # (F,) bool: an object was found in the frame
    interior: np.ndarray  # (F,) bool: found and not touching the frame border
    alpha: np.ndarray  # (F, H, W) estimated coverage (~0..1, noise kept), zero away from the object
    centroids: np.ndarray  # (F, 2) coverage-weighted (x, y) in pixels; nan where absent
    areas: np.ndarray  # (F,) coverage sum in pixels; nan where absent
    colours: np.ndarray  # (F, 3) median RGB of the object's core; nan where absent
    colour: np.ndarray  # (3,) median RGB of the object's core over all frames
    background: np.ndarray  # (3,) estimated backdrop RGB
    contrast: float  # robust peak distance from the backdrop, 0..~441


@dataclass
class AttributeReader:
    """Measures a clip's colour, shape, direction and size from pixels, analytically.

    It scores *generated* videos, so it must not need the clip to be clean: the backdrop is
    estimated (median pixel), the object is the largest blob far from it (threshold at half
    the object's contrast, so the mask matches 50% coverage like the renderer's geometry),
    and every decision aggregates over frames. When nothing stands out from the backdrop the
    attributes are ``"none"`` — a failure to count, not an exception.

    - colour: nearest palette entry by angle of (object - backdrop) in RGB, which ignores
      overall brightness (generated samples are often dimmer or brighter) but keeps hue and
      whiteness;
    - size: equal-area radius from the coverage sum (every shape of one size has the same
      area by construction), compared with the world's small/large threshold;
    - shape: the template (rendered with the renderer's own geometry at the measured
      centroid and area) that best matches the coverage map, allowing for some blur;
    - direction: dominant axis and sign of a straight-line fit to the centroid track.

    Args:
        world: the world the clips come from: its small/large threshold and supersampling
            are used (the palette is :data:`COLOURS`; the backdrop is estimated per clip).
        min_contrast: least peak distance from the backdrop, as a fraction of the full
            range (255), for an object to count; below it the clip reads as empty.
        min_motion: least fitted displacement over the clip, as a fraction of the frame, to
            call a direction (the world moves >= travel[0] = 0.35, so 0.1 is far below).
        max_shape_frames: at most this many frames (evenly spaced) vote on the shape; the
            template match is the reader's most expensive step.
        blur_sigmas: Gaussian blurs (pixels) tried on each template; the best one counts, so
            a soft generated edge does not favour the roundest shape.
        rim_px: how far beyond the thresholded mask coverage is summed. The antialiased
            edge needs 1 px; a blurred edge's tails need more, or a blurred square loses its
            corners and reads as a circle (measured on 32x32 clips blurred by sigma 1 px plus
            noise 20/255: rim 2 misreads 1% of shapes, rim 3 none).

    Limits: blur much wider than the object's features makes any small shape a blob, and a
    blob reads as a circle (32x32, sigma 1.4 px: ~13% of shapes misread, all small ones).
    """

    world: ShapesWorld = field(default_factory=ShapesWorld)
    min_contrast: float = 0.1
    min_motion: float = 0.1
    max_shape_frames: int = 9
    blur_sigmas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    rim_px: int = 3

    # -- input ----------------------------------------------------------------------------
    @staticmethod
    def as_pixels(frames: Any, layout: str = "FHWC") -> np.ndarray:
        """numpy or torch video -> float32 (F, H, W, 3) in [0, 255].

        uint8 (or other integer) input is taken as 0..255; float input as [-1, 1], the range
        the models work in (a float video in [0, 1] cannot be told apart: convert it first).
        ``layout="CFHW"`` accepts one sample of a (B, C, F, H, W) batch.
        """
        if hasattr(frames, "detach"):  # torch tensor, without importing torch here
            frames = frames.detach().cpu()
            frames = frames.float().numpy() if frames.is_floating_point() else frames.numpy()
        x = np.asarray(frames)
        if layout == "CFHW":
            x = np.moveaxis(x, 0, -1)  # (C, F, H, W) -> (F, H, W, C)
        elif layout != "FHWC":
            raise SoraError(f"AttributeReader: layout {layout!r} must be 'FHWC' or 'CFHW'")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise SoraError(f"AttributeReader: expected a video (F, H, W, 3) ({layout}), got shape {x.shape}")
        if np.issubdtype(x.dtype, np.floating):
            if x.size and float(np.abs(x).max()) > 2.0:  # a sample may overshoot [-1, 1] a little, not 100x
                raise SoraError("AttributeReader: float video must be in [-1, 1] (the models' range); "
                                f"got values up to {float(np.abs(x).max()):.3g} — pass uint8 0..255 frames instead")
            return np.clip((x.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)  # [-1, 1] -> [0, 255]
        return x.astype(np.float32)

    # -- measurement --------------------------------------------------------------------------
    def _track(self, x: np.ndarray) -> _Track | None:
        """Find the object in every frame of (F, H, W, 3) float [0, 255]; None if there is none."""
        n_frames, height, width, _ = x.shape
        bg = np.median(x.reshape(-1, 3), axis=0)  # (3,) the object covers well under half the frame
        dist = np.linalg.norm(x - bg, axis=-1)  # (F, H, W)
        # 99.5th percentile: inside even a small object's core (>= ~3% of pixels), yet
        # immune to a handful of hot pixels in a noisy sample.
        peak = float(np.percentile(dist, 99.5))
        med = float(np.median(dist))
        noise = med + 4 * 1.4826 * float(np.median(np.abs(dist - med)))  # robust backdrop level (MAD)
        if peak < self.min_contrast * 255 or peak < 2 * noise:
            return None
        mask = _largest_component(dist > max(0.5 * peak, noise))  # (F, H, W)
        present = mask.sum(axis=(1, 2)) >= 3  # fewer than 3 pixels is speckle, not an object
        if not present.any():
            return None
        mask &= present[:, None, None]
        core = mask & (dist > 0.75 * peak)  # away from edges blended with the backdrop
        colour = np.median(x[core] if core.any() else x[mask], axis=0)  # (3,)
        v = colour - bg  # (3,)
        alpha = (x - bg) @ v / max(float(v @ v), 1e-6)  # (F, H, W) linear unmixing
        # Unclipped within [-0.5, 1.5]: zero-mean noise and the dim tails of a blurred edge
        # must keep their sign and size for area and centroid to stay unbiased; the bounds
        # only stop outliers (codec ringing, hot pixels) from dominating.
        alpha = np.clip(alpha, -0.5, 1.5)
        region = mask
        for _ in range(self.rim_px):
            region = _shift_max(region)
        alpha *= region
        areas = np.maximum(alpha.sum(axis=(1, 2)), 1.0)  # (F,) >= 1 px: noise cannot make it vanish
        ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres, as the renderer samples them
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (alpha * xs).sum(axis=(1, 2)) / areas
            cy = (alpha * ys).sum(axis=(1, 2)) / areas
        centroids = np.where(present[:, None], np.stack([cx, cy], axis=1), np.nan)  # (F, 2)
        colours = np.full((n_frames, 3), np.nan, np.float32)
        for f in np.flatnonzero(present):
            sel = core[f] if core[f].any() else mask[f]
            colours[f] = np.median(x[f][sel], axis=0)
        border = mask[:, 0, :].any(1) | mask[:, -1, :].any(1) | mask[:, :, 0].any(1) | mask[:, :, -1].any(1)  # (F,)
        return _Track(
            present=present, interior=present & ~border, alpha=alpha, centroids=centroids,
            areas=np.where(present, areas, np.nan), colours=colours, colour=colour, background=bg, contrast=peak,
        )

    def _shape_scores(self, tr: _Track) -> dict[str, float]:
        """Mean L1 between coverage and each shape's template, per unit of object area.

        Compared in a window around the object in each frame (the templates cost ~all of the
        reader's time, and nothing outside the measured region carries signal)."""
        frames = np.flatnonzero(tr.interior if tr.interior.any() else tr.present)
        if len(frames) > self.max_shape_frames:
            frames = frames[np.linspace(0, len(frames) - 1, self.max_shape_frames).round().astype(int)]
        radius = np.sqrt(tr.areas[frames] / math.pi)  # (K,) equal-area radius
        # Window: the largest shape's half-extent plus the rim, plus the widest blur's tails.
        half = int(math.ceil(MAX_HALF_EXTENT * radius.max() + self.rim_px + 2 * max(self.blur_sigmas))) + 1
        size = 2 * half
        origin = np.floor(tr.centroids[frames]).astype(int) - half  # (K, 2) window top-left (x, y)
        padded = np.pad(tr.alpha[frames], ((0, 0), (size, size), (size, size)))  # (K, H+2S, W+2S)
        alpha = np.stack(
            [padded[k, oy + size : oy + 2 * size, ox + size : ox + 2 * size] for k, (ox, oy) in enumerate(origin)]
        )  # (K, S, S)
        scores = {}
        for shape in SHAPES:
            centres = tr.centroids[frames] - origin  # (K, 2) in window coordinates
            centres[:, 1] -= _CENTROID_OFFSET_Y[shape] * radius  # centroid -> bounding-box centre
            tmpl = _coverage(shape, centres, radius, size, size, self.world.supersample)  # (K, S, S)
            err = min(float(np.abs(alpha - _gaussian_blur(tmpl, s)).sum()) for s in self.blur_sigmas)
            scores[shape] = err / float(tr.areas[frames].sum())
        return scores

    def count_objects(self, frames: Any, layout: str = "FHWC", min_pixels: int = 3) -> np.ndarray:
        """(F,) the number of separate objects in each frame: 8-connected blobs of at least
        ``min_pixels`` pixels that stand out from the backdrop by the same rule as the object
        the reader tracks. A shapes clip shows one; a cross-fade, a duplicated or an invented
        object shows more, an empty frame none."""
        x = self.as_pixels(frames, layout)  # (F, H, W, 3)
        bg = np.median(x.reshape(-1, 3), axis=0)  # (3,)
        dist = np.linalg.norm(x - bg, axis=-1)  # (F, H, W)
        peak = float(np.percentile(dist, 99.5))
        med = float(np.median(dist))
        noise = med + 4 * 1.4826 * float(np.median(np.abs(dist - med)))
        if peak < self.min_contrast * 255 or peak < 2 * noise:
            return np.zeros(x.shape[0], dtype=np.int64)
        labels = _component_labels(dist > max(0.5 * peak, noise))  # (F, H, W)
        counts = np.zeros(x.shape[0], dtype=np.int64)
        for f in range(x.shape[0]):
            _, sizes = np.unique(labels[f][labels[f] > 0], return_counts=True)
            counts[f] = int((sizes >= min_pixels).sum())
        return counts

    def read(self, frames: Any, layout: str = "FHWC") -> dict[str, Any]:
        """Attributes of one clip (see the class docstring for how each is measured).

        Returns:
            colour, shape, direction, size: vocabulary names, or "none" when no object (or,
                for direction, no clear motion) is found;
            present: whether an object was found; confidence: per-attribute margins
                (colour: cosine gap to the runner-up; shape: relative L1 gap to the
                runner-up; direction: share of motion on the dominant axis; size: |log| of
                radius over threshold);
            diagnostics: centroids (F, 2) px, areas (F,) fraction of frame, colours (F, 3)
                RGB, displacement (dx, dy) fraction of frame, radius (fraction of min(H, W)),
                colour_rgb, background, shape_scores, colour_scores.
        """
        x = self.as_pixels(frames, layout)  # (F, H, W, 3)
        n_frames, height, width, _ = x.shape
        tr = self._track(x)
        if tr is None:
            return {
                "colour": "none", "shape": "none", "direction": "none", "size": "none", "present": False,
                "confidence": {"colour": 0.0, "shape": 0.0, "direction": 0.0, "size": 0.0},
                "centroids": np.full((n_frames, 2), np.nan), "areas": np.full(n_frames, np.nan),
                "colours": np.full((n_frames, 3), np.nan), "displacement": (0.0, 0.0), "radius": 0.0,
                "colour_rgb": None, "background": np.median(x.reshape(-1, 3), axis=0).tolist(),
                "shape_scores": {}, "colour_scores": {},
            }
        # colour: angle between (object - backdrop) and (palette - backdrop)
        v = tr.colour - tr.background
        colour_scores = {}
        for name, rgb in COLOURS.items():
            p = np.asarray(rgb, np.float64) - tr.background
            colour_scores[name] = float(v @ p / (np.linalg.norm(v) * np.linalg.norm(p) + 1e-9))
        ranked = sorted(colour_scores, key=colour_scores.get, reverse=True)
        colour = ranked[0]
        # size: equal-area radius over the frames where the object is whole
        use = tr.interior if tr.interior.any() else tr.present
        radius = math.sqrt(float(np.median(tr.areas[use])) / math.pi) / min(height, width)
        threshold = self.world.size_threshold()
        size = "large" if radius > threshold else "small"
        # shape: best-matching template
        shape_scores = self._shape_scores(tr)
        by_score = sorted(shape_scores, key=shape_scores.get)
        shape = by_score[0]
        # direction: straight-line fit of the centroid track
        t = np.flatnonzero(tr.present)
        if len(t) >= 2:
            slope = np.polyfit(t.astype(np.float64), tr.centroids[t], 1)[0]  # (2,) px per frame
            dx, dy = slope[0] * (n_frames - 1) / width, slope[1] * (n_frames - 1) / height
        else:
            dx = dy = 0.0
        if max(abs(dx), abs(dy)) < self.min_motion:
            direction = "none"
        elif abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
        return {
            "colour": colour, "shape": shape, "direction": direction, "size": size, "present": True,
            "confidence": {
                "colour": colour_scores[ranked[0]] - colour_scores[ranked[1]],
                "shape": (shape_scores[by_score[1]] - shape_scores[by_score[0]]) / max(shape_scores[by_score[1]], 1e-9),
                "direction": max(abs(dx), abs(dy)) / max(abs(dx) + abs(dy), 1e-9),
                "size": abs(math.log(max(radius, 1e-9) / threshold)),
            },
            "centroids": tr.centroids, "areas": tr.areas / (height * width), "colours": tr.colours,
            "displacement": (float(dx), float(dy)), "radius": radius, "colour_rgb": tr.colour.tolist(),
            "background": tr.background.tolist(), "shape_scores": shape_scores, "colour_scores": colour_scores,
        }

    def score(self, frames: Any, expected: ShapeAttrs, layout: str = "FHWC") -> dict[str, bool]:
        """Per-attribute agreement of a (generated) clip with the attributes it was asked for,
        plus ``all``: the adherence numbers an evaluation reports."""
        got = self.read(frames, layout)
        hits = {k: got[k] == getattr(expected, k) for k in ("colour", "shape", "direction", "size")}
        hits["all"] = all(hits.values())
        return hits

    def temporal_consistency(self, frames: Any, layout: str = "FHWC") -> dict[str, float]:
        """How stable the object is over time — a generated object should not flicker, morph
        or jitter. Returns present_fraction (share of frames with the object), area_rel_std
        (std / mean of area), colour_rel_std (RMS deviation of per-frame colour over the
        object's contrast with the backdrop) and track_rmse (RMS residual of the straight-line
        centroid fit, fraction of min(H, W)); nan where undefined."""
        x = self.as_pixels(frames, layout)  # (F, H, W, 3)
        tr = self._track(x)
        nan = float("nan")
        if tr is None:
            return {"present_fraction": 0.0, "area_rel_std": nan, "colour_rel_std": nan, "track_rmse": nan}
        areas = tr.areas[tr.present]
        cols = tr.colours[tr.present]  # (P, 3)
        t = np.flatnonzero(tr.present)
        if len(t) >= 2:
            pts = tr.centroids[t]  # (P, 2)
            coef = np.polyfit(t.astype(np.float64), pts, 1)  # (2, 2)
            resid = pts - (t[:, None] * coef[0] + coef[1])
            track_rmse = float(np.sqrt((resid**2).sum(axis=1).mean())) / min(x.shape[1:3])
        else:
            track_rmse = nan
        contrast = float(np.linalg.norm(tr.colour - tr.background))
        return {
            "present_fraction": float(tr.present.mean()),
            "area_rel_std": float(areas.std() / areas.mean()),
            "colour_rel_std": float(np.sqrt(((cols - cols.mean(axis=0)) ** 2).sum(axis=1).mean()) / max(contrast, 1e-6)),
            "track_rmse": track_rmse,
        }
