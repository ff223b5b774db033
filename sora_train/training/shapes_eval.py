"""Does the model really learn? ``sora-eval shapes``: caption adherence, prompting modes and
temporal consistency of a shapes-world DiT export, measured from pixels.

Every number comes from the analytic :class:`~sora_train.data.shapes.AttributeReader` (no
learned judge to fool) on videos the checkpoint generates:

- **text-to-video**, for every caption combination (colour, shape, direction, size) seen in
  training and, separately, those whose (colour, shape) pair was held out of training:
  per-attribute accuracy, joint accuracy (all four right), and temporal consistency (the
  object's presence, area and colour stable over frames, its track straight);
- **image-to-video** from a ground-truth frame 0: PSNR of generated frame 0 against the given
  image, and whether the object then moves the way the caption says;
- **extension** (forward) from the first frames of a ground-truth clip: the seam error, i.e.
  distance in pixels between the first new frame's object and where the given frames'
  motion puts it (last given position + per-frame velocity);
- **interpolation** between two ground-truth frames: the mid frame's distance from the point
  the straight, constant-speed path between the two given frames passes at that time, as a
  fraction of the path's length;
- **VAE reconstruction** PSNR of ground-truth clips through the export's VAE;
- **ground truth**: the same scoring on rendered clips (no model): the metric's ceiling —
  ~100% accuracy, ~0 px seam error, ~0 interpolation error, or the metric code is wrong.

Ground-truth clips are rendered by :class:`ShapesWorld` and passed through the dataset's own
H.264 encode/decode (:class:`Codec`, from its index.json options), so prompts and references
are what the model was trained on.

Outputs in ``--out``: ``report.json`` (all numbers), ``samples.png`` (generated clips with
their captions and what was read back), ``accuracy.png`` (per-attribute accuracy, seen vs
held out, with the targets) and, when the export's run directory has
``plots/loss_history.json``, ``val_loss_by_t.png`` (validation loss per timestep bin).

Held-out pairs come from, in order: the export's metadata (``train_data.heldout_pairs``,
recorded by sora-train), ``--data DIR`` (a shapes dataset root or one of its splits), the
run's ``.hydra/config.yaml`` (its ``data.train_shards`` index), else ``default_heldout(seed)``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sora_train.data.boxes import Boxes, BoxTrack
from sora_train.data.shapes import MAX_HALF_EXTENT, AttributeReader, ShapeAttrs, ShapesWorld, centroid_offset, default_heldout, half_extent
from sora_train.provenance import mark_image_file
from sora_train.training.shapes_native import evaluate_native, native_targets, parse_shape, shape_name, write_native_grid
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json

ATTRIBUTES = ("colour", "shape", "direction", "size")
# The bar for "the model really learns" (docs: conf/experiment/shapes_quality.yaml).
# name -> (report path, comparison, threshold)
TARGETS: dict[str, tuple[str, str, float]] = {
    "seen colour accuracy": ("t2v.seen.accuracy.colour", ">=", 0.95),
    "seen direction accuracy": ("t2v.seen.accuracy.direction", ">=", 0.90),
    "seen shape accuracy": ("t2v.seen.accuracy.shape", ">=", 0.85),
    "held-out joint accuracy": ("t2v.heldout.accuracy.joint", ">=", 0.70),
    # Image-to-video scored for what it must do (frame-0 PSNR only measures the VAE round trip:
    # latent frame 0 is the image's own encoding and the decoder is causal; it stays in the
    # report as a sanity figure): the image's subject is what the last frames show, it moves as
    # the caption says, and no object appears that was not there.
    "i2v subject kept to the last frames": ("i2v.subject_kept_last", ">=", 0.90),
    "i2v direction accuracy": ("i2v.direction_accuracy", ">=", 0.80),
    "one object per frame (i2v, extension, interpolation)": ("modes.one_object_frac", ">=", 0.95),
    "extension seam error (px)": ("extend.seam_error_px", "<=", 2.0),
    "interpolation mid-frame error (x path)": ("interpolate.mid_error_frac", "<=", 0.10),
    "VAE reconstruction PSNR (dB)": ("vae.recon_psnr_db", ">=", 32.0),
}
# `make demo`'s bar (a few minutes of training on 2 CPU cores): caption adherence on seen
# captions; held-out pairs are reported, not targeted.
DEMO_TARGETS: dict[str, tuple[str, str, float]] = {
    "seen colour accuracy": ("t2v.seen.accuracy.colour", ">=", 0.95),
    "seen shape accuracy": ("t2v.seen.accuracy.shape", ">=", 0.75),
    "seen direction accuracy": ("t2v.seen.accuracy.direction", ">=", 0.75),
}
TARGET_SETS = {"quality": TARGETS, "demo": DEMO_TARGETS}
# Box motion control (issue 19), checked when the export has it (DiT max_boxes > 0).
CONTROL_TARGETS: dict[str, tuple[str, str, float]] = {
    "control: mean centre error (frame widths)": ("control.centre_error", "<=", 1 / 16),
    "control: object inside its soft box": ("control.inside_soft", ">=", 0.90),
    "control: colour accuracy, boxes vs none (points lost)": ("control.colour_drop_points", "<=", 5.0),
    "control: shape accuracy, boxes vs none (points lost)": ("control.shape_drop_points", "<=", 5.0),
}
# Requested paths of kinds no training clip follows (training: straight or 1-2 waypoints).
TRAJECTORY_KINDS = ("curve", "zigzag", "stop_and_go")
# How much a soft box grows beyond the object's own box, per side, as a fraction of the frame.
SOFT_REQUEST_MARGIN = 0.08
# PSNR of identical frames is infinite; report this instead so report.json stays valid JSON.
PSNR_CAP_DB = 100.0
# Independent seeded streams for the ground-truth clips of each prompting mode.
_MODE_STREAMS = {"i2v": 11, "extend": 12, "interpolate": 13, "vae": 14, "combos": 15, "control": 16}


@dataclass
class ShapesEvalSettings:
    """What ``sora-eval shapes`` generates.

    Args:
        num_per_combo: text-to-video samples per caption combination.
        max_combos: at most this many combinations per group (seen / held out), a seeded
            spread over all of them (None: every combination).
        clips_per_mode: ground-truth clips prompted per mode (i2v, extension, interpolation).
        steps, guidance_scale, shift: sampler settings (None: the export's defaults).
        seed: noise and clip seed; the same seed and settings give the same report.
        batch_size: text-to-video prompts per generate call.
        fast: a quick check that everything runs (2 sampler steps, 4 combos per group, one
            clip per mode).
        control_clips: requested trajectories per kind (curve, zig-zag, stop-and-go) when the
            export has box control.
        targets: which bar the report is checked against: "quality" (the shapes recipe's,
            every mode) or "demo" (``make demo``'s, text-to-video on seen captions).
        modes: also score image-to-video, extension and interpolation (False: text-to-video
            only; their targets are then not checked).
        colours: also prompt every combination of each of these colours (capped like the
            groups), scored as its own group ``t2v.colours.<name>`` (e.g. a colour a
            fine-tune taught; ``--fast`` alone might draw none of its combinations).
        shapes: also generate at these clip shapes ("FxHxW", e.g. "17x32x64"; "1xHxW" an
            image), seen in training or not, and score each against the export's train shape
            (:mod:`sora_train.training.shapes_native`: one object per frame, points lost).
    """

    num_per_combo: int = 1
    max_combos: int | None = None
    clips_per_mode: int = 16
    steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    seed: int = 0
    batch_size: int = 32
    fast: bool = False
    control_clips: int = 8
    targets: str = "quality"
    modes: bool = True
    colours: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.shapes = tuple(dict.fromkeys(shape_name(parse_shape(x)) for x in self.shapes))
        if self.targets not in TARGET_SETS:
            raise SoraError(f"sora-eval shapes: targets={self.targets!r} must be one of {sorted(TARGET_SETS)}")
        self.colours = _check_colours(self.colours)
        if self.fast:
            self.steps = self.steps or 2
            self.max_combos = min(self.max_combos or 4, 4)
            self.clips_per_mode = 1
            self.control_clips = 1
        for name in ("num_per_combo", "clips_per_mode", "batch_size", "control_clips"):
            if int(getattr(self, name)) < 1:
                raise SoraError(f"sora-eval shapes: {name}={getattr(self, name)} must be >= 1")
        if self.max_combos is not None and self.max_combos < 1:
            raise SoraError(f"sora-eval shapes: max_combos={self.max_combos} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise SoraError(f"sora-eval shapes: steps={self.steps} must be >= 1")
        if self.shift is not None and not self.shift > 0:
            raise SoraError(f"sora-eval shapes: shift={self.shift} must be > 0")


# -- scoring (model-free: the same functions score generated and ground-truth videos) -------
def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images/videos (peak 255), capped at PSNR_CAP_DB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse <= 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def score_caption(reader: AttributeReader, video: np.ndarray, attrs: ShapeAttrs) -> dict[str, Any]:
    """One text-to-video sample (F, H, W, 3) uint8 against the attributes it was asked for:
    what was read, per-attribute hits, joint hit and temporal consistency."""
    got = reader.read(video)
    hits = {k: got[k] == getattr(attrs, k) for k in ATTRIBUTES}
    return {
        "caption": attrs.caption(),
        "expected": attrs.as_dict(),
        "read": {k: got[k] for k in ATTRIBUTES},
        "hits": {**hits, "joint": all(hits.values())},
        "present": bool(got["present"]),
        "temporal": reader.temporal_consistency(video),
    }


def summarize_captions(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per attribute and joint, presence, mean temporal consistency, and the
    confusions: per attribute, {asked: {read: count}} (read None = nothing readable)."""
    n = len(records)
    if n == 0:
        return {"n": 0, "accuracy": {k: None for k in (*ATTRIBUTES, "joint")}, "present": None, "temporal": {}, "confusion": {}}
    acc = {k: float(np.mean([r["hits"][k] for r in records])) for k in (*ATTRIBUTES, "joint")}
    keys = records[0]["temporal"].keys()
    temporal = {k: _nanmean([r["temporal"][k] for r in records]) for k in keys}
    confusion: dict[str, dict[str, dict[str, int]]] = {k: {} for k in ATTRIBUTES}
    for r in records:
        for k in ATTRIBUTES:
            row = confusion[k].setdefault(r["expected"][k], {})
            read = str(r["read"][k])  # "None" when the reader found nothing: JSON keys are strings
            row[read] = row.get(read, 0) + 1
    return {"n": n, "accuracy": acc, "present": float(np.mean([r["present"] for r in records])), "temporal": temporal,
            "confusion": confusion}


def top_confusions(confusion: dict[str, dict[str, dict[str, int]]], k: int = 4) -> list[tuple[str, str, str, int]]:
    """The k most frequent misreads across attributes: (attribute, asked, read, count)."""
    misses = [(attr, asked, read, c) for attr, rows in confusion.items() for asked, row in rows.items()
              for read, c in row.items() if read != asked]
    return sorted(misses, key=lambda m: -m[3])[:k]


def centroids(reader: AttributeReader, video: np.ndarray) -> np.ndarray:
    """Object centroid (x, y) px per frame of (F, H, W, 3) -> (F, 2), nan where absent."""
    return np.asarray(reader.read(video)["centroids"], np.float64)


def seam_error_px(reader: AttributeReader, video: np.ndarray, num_given: int) -> float:
    """Extension continuity: ``video`` is the given frames followed by the new ones. The
    given frames' straight-line motion (centroid fit) predicts where the object is in the
    first new frame; the error is the distance from there to where it is (px; nan when the
    object is missing from the frames needed)."""
    if not 2 <= num_given < len(video):
        raise SoraError(f"seam_error_px: need >= 2 given frames and at least one new frame, got {num_given} of {len(video)}")
    c = centroids(reader, video)  # (F, 2)
    given = c[:num_given]
    t = np.flatnonzero(np.isfinite(given).all(axis=1))
    if len(t) < 2 or not np.isfinite(c[num_given]).all() or not np.isfinite(given[-1]).all():
        return float("nan")
    velocity = np.polyfit(t.astype(np.float64), given[t], 1)[0]  # (2,) px per frame
    predicted = given[-1] + velocity
    return float(np.linalg.norm(c[num_given] - predicted))


def interpolation_error(reader: AttributeReader, video: np.ndarray, start_xy: Sequence[float], end_xy: Sequence[float], end_frame: int, mid_frame: int | None = None) -> float:
    """Interpolation quality: distance of the object in ``mid_frame`` (default end_frame // 2)
    from the point of the straight, constant-speed path start (frame 0) -> end (``end_frame``)
    at that time, as a fraction of the path's length (nan when the object is missing)."""
    start, end = np.asarray(start_xy, np.float64), np.asarray(end_xy, np.float64)
    length = float(np.linalg.norm(end - start))
    if not (np.isfinite(length) and length > 0):
        return float("nan")
    mid = end_frame // 2 if mid_frame is None else mid_frame
    c = centroids(reader, video)[mid]
    if not np.isfinite(c).all():
        return float("nan")
    expected = start + (end - start) * (mid / end_frame)
    return float(np.linalg.norm(c - expected) / length)


def _nanmean(values: Sequence[float]) -> float | None:
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _summary(values: Sequence[float]) -> dict[str, Any]:
    """mean / median over measured values, and the fraction that could be measured at all."""
    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    return {
        "mean": float(ok.mean()) if ok.size else None,
        "median": float(np.median(ok)) if ok.size else None,
        "measured_fraction": float(ok.size / v.size) if v.size else None,
        "n": int(v.size),
    }


# -- ground-truth clips ------------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    """How the dataset's clips were encoded (index.json options). Ground-truth clips go
    through the same encode/decode, so the model is prompted with (and compared against) what
    it trained on: H.264's 4:2:0 chroma halves the resolution of colour edges, and a VAE that
    learned those edges scores ~4 dB lower against the renderer's sharp frames."""

    container: str = "mp4"
    codec: str | None = None
    crf: int = 18


def render_clip(world: ShapesWorld, attrs: ShapeAttrs, seed: int, stream: int, index: int, codec: Codec | None = None) -> np.ndarray:
    """A ground-truth clip (F, H, W, 3) uint8, reproducible from (seed, stream, index);
    through ``codec``'s encode/decode round trip when given, as the dataset's clips are."""
    rng = np.random.default_rng([seed, stream, index])
    frames = world.draw(attrs, world.sample_motion(attrs, rng))  # (F, H, W, 3)
    if codec is None:
        return frames
    from sora_train.data.video_io import decode_video, encode_video

    return decode_video(encode_video(frames, world.fps, container=codec.container, codec=codec.codec, crf=codec.crf))


def split_combos(heldout: Sequence[Sequence[str]], max_combos: int | None = None, seed: int = 0) -> tuple[list[ShapeAttrs], list[ShapeAttrs]]:
    """All caption combinations -> (seen in training, held out), each capped at
    ``max_combos`` by a seeded spread (stratified over the fixed combo order)."""
    pairs = {(str(c), str(s)) for c, s in heldout}
    combos = ShapesWorld.combos()
    seen = [a for a in combos if a.pair not in pairs]
    held = [a for a in combos if a.pair in pairs]

    def cap(group: list[ShapeAttrs], salt: int) -> list[ShapeAttrs]:
        if max_combos is None or len(group) <= max_combos:
            return group
        perm = np.random.default_rng([seed, _MODE_STREAMS["combos"], salt]).permutation(len(group))
        return [group[i] for i in sorted(perm[:max_combos])]

    return cap(seen, 0), cap(held, 1)


def mode_combos(seen: Sequence[ShapeAttrs], n: int, seed: int, stream: int) -> list[ShapeAttrs]:
    """``n`` seen combinations for one prompting mode's clips (seeded, repeating if needed)."""
    if not seen:
        raise SoraError("sora-eval shapes: no seen combinations to prompt the modes with (every pair held out?)")
    rng = np.random.default_rng([seed, stream])
    order = np.concatenate([rng.permutation(len(seen)) for _ in range(n // len(seen) + 1)])
    return [seen[int(i)] for i in order[:n]]


def ground_truth_check(world: ShapesWorld, reader: AttributeReader | None = None, num_clips: int = 32, seed: int = 0, num_given: int = 3, codec: Codec | None = None) -> dict[str, Any]:
    """The scoring functions on rendered clips (no model; through ``codec`` when given, like
    the dataset's): what a perfect model would score.

    Returns caption accuracy (t2v section's format), seam error (px) of continuing the first
    ``num_given`` frames with the true ones, and interpolation error of the true mid frame."""
    reader = reader or AttributeReader(world)
    combos = mode_combos(ShapesWorld.combos(), num_clips, seed, _MODE_STREAMS["combos"])
    records, seams, interps = [], [], []
    F = world.num_frames
    for i, attrs in enumerate(combos):
        clip = render_clip(world, attrs, seed, _MODE_STREAMS["extend"], i, codec)
        records.append(score_caption(reader, clip, attrs))
        seams.append(seam_error_px(reader, clip, num_given))
        c = centroids(reader, clip)
        interps.append(interpolation_error(reader, clip, c[0], c[F - 1], F - 1))
    return {"codec": None if codec is None else asdict(codec), "t2v": summarize_captions(records),
            "seam_error_px": _summary(seams), "mid_error_frac": _summary(interps)}


# -- where the run's data facts live ---------------------------------------------------------------
def _index_options(path: Path) -> dict[str, Any] | None:
    """Options recorded in a shapes dataset's index.json: ``path`` is the root or a split."""
    for candidate in (path / "index.json", path / "train" / "index.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()).get("options") or None
            except json.JSONDecodeError as e:
                raise SoraError(f"{candidate}: not valid JSON ({e.msg})") from e
    return None


def _hydra_train_shards(run_dir: Path) -> Path | None:
    """data.train_shards of the run that wrote the export, from its saved Hydra config."""
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(cfg_file)
        spec = OmegaConf.select(cfg, "data.train_shards")
        return Path(spec) if isinstance(spec, str) else None
    except Exception:  # an unresolvable interpolation or an odd config: fall back to the next source
        return None


def data_facts(export_dir: Path, meta: dict[str, Any], data_dir: str | Path | None, seed: int) -> dict[str, Any]:
    """-> {"heldout_pairs", "heldout_source", "world" (options or None), "codec" (Codec)}."""
    facts = _data_facts(export_dir, meta, data_dir, seed)
    opts = facts.pop("options", None) or {}
    facts["codec"] = Codec(str(opts.get("container", "mp4")), opts.get("codec"), int(opts.get("crf", 18)))
    return facts


def _data_facts(export_dir: Path, meta: dict[str, Any], data_dir: str | Path | None, seed: int) -> dict[str, Any]:
    if data_dir is not None:
        opts = _index_options(Path(data_dir))
        if opts is None or "heldout_pairs" not in opts:
            raise SoraError(f"--data {data_dir}: no shapes dataset index.json with heldout_pairs there (or in its train/)")
        return {"heldout_pairs": opts["heldout_pairs"], "heldout_source": f"--data {data_dir}", "world": opts.get("world"), "options": opts}
    recorded = meta.get("train_data") or {}
    if "heldout_pairs" in recorded:
        return {"heldout_pairs": recorded["heldout_pairs"], "heldout_source": "export metadata", "world": recorded.get("world"), "options": recorded}
    shards = _hydra_train_shards(export_dir.parent)
    if shards is not None:
        opts = _index_options(shards)
        if opts and "heldout_pairs" in opts:
            return {"heldout_pairs": opts["heldout_pairs"], "heldout_source": f"{shards}/index.json", "world": opts.get("world"), "options": opts}
    return {"heldout_pairs": [list(p) for p in default_heldout(seed)], "heldout_source": f"default_heldout({seed})", "world": None}


def make_world(facts: dict[str, Any], meta: dict[str, Any]) -> ShapesWorld:
    """The world the model was trained on (its options when known, else the train shape)."""
    shape = meta.get("train_shape") or {}
    if facts.get("world"):
        # straight motion: the mode scores (i2v direction, extension seam, interpolation along
        # the path) are defined on constant-velocity clips; a box-control model trained on
        # varied motion is scored on those, and on its own requested paths (evaluate_control).
        # The clip shape is the one the model trained on, not the source clips' own: make
        # demo's DiT learns 5 frames at 2 fps of the 17-frame clips (the whole motion in 5
        # frames), and a 5-frame world moves the object over the same path.
        trained = {k: int(shape[k]) for k in ("num_frames", "height", "width") if k in shape}
        return ShapesWorld(**{**facts["world"], **trained, "motion": "straight"})
    return ShapesWorld(
        height=int(shape.get("height", 32)), width=int(shape.get("width", 32)), num_frames=int(shape.get("num_frames", 17))
    )


# -- the evaluation ------------------------------------------------------------------------------------
def _to_uint8(video) -> np.ndarray:
    from sora_train.training.pipeline import to_uint8

    return to_uint8(video)  # (B, F, H, W, 3)


def evaluate_t2v(pipe, reader: AttributeReader, world: ShapesWorld, combos: Sequence[ShapeAttrs], s: ShapesEvalSettings, advance: Callable[[int], None], salt: int = 0) -> tuple[list[dict], list[np.ndarray]]:
    """Generate ``num_per_combo`` videos per combination in batches and score each."""
    jobs = [a for a in combos for _ in range(s.num_per_combo)]
    records, videos = [], []
    for b in range(0, len(jobs), s.batch_size):
        batch = jobs[b : b + s.batch_size]
        gen = pipe.generate([a.caption() for a in batch], world.num_frames, world.height, world.width, mode="t2v",
                            steps=s.steps, guidance_scale=s.guidance_scale, shift=s.shift, seed=s.seed + 7919 * salt + b)
        for video, attrs in zip(_to_uint8(gen.video), batch):
            records.append(score_caption(reader, video, attrs))
            videos.append(video)
        advance(len(batch))
    return records, videos


def evaluate_modes(pipe, reader: AttributeReader, world: ShapesWorld, seen: Sequence[ShapeAttrs], s: ShapesEvalSettings, advance: Callable[[int], None], codec: Codec | None = None) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """i2v, forward extension and interpolation from ground-truth clips of seen combinations."""
    F, H, W = world.num_frames, world.height, world.width
    f = pipe.latent_shape(F, H, W)[0]
    tf = pipe.vae.temporal_factor
    # Context latent frames for extension: the pipeline's default (a quarter of the clip), but
    # >= 2 so the given pixel frames (frame 0 alone, then groups of tf) show some motion.
    k = max(2, f // 4)
    if k >= f:
        raise SoraError(f"sora-eval shapes: {F} frames give {f} latent frames, too few to test extension")
    num_given = 1 + (k - 1) * tf
    end_frame = F - max(1, tf)  # interpolation pins image B to the last `tf` frames: B's time
    n = s.clips_per_mode
    kw = dict(steps=s.steps, guidance_scale=s.guidance_scale, shift=s.shift)
    samples: list[tuple[str, np.ndarray]] = []

    tail = max(3, F // 4)  # "the last frames": enough for the reader's per-clip votes
    one_object: dict[str, list[float]] = {"i2v": [], "extend": [], "interpolate": []}

    def subject_kept(frames: np.ndarray, attrs: ShapeAttrs) -> bool:
        got = reader.read(frames)
        return got["colour"] == attrs.colour and got["shape"] == attrs.shape and got["size"] == attrs.size

    psnrs, i2v_dir, i2v_keep, i2v_last = [], [], [], []
    for i, attrs in enumerate(mode_combos(seen, n, s.seed, _MODE_STREAMS["i2v"])):
        clip = render_clip(world, attrs, s.seed, _MODE_STREAMS["i2v"], i, codec)
        out = _to_uint8(pipe.generate([attrs.caption()], F, H, W, mode="i2v", image=clip[0], seed=s.seed + i, **kw).video)[0]
        psnrs.append(psnr_db(out[0], clip[0]))
        got = reader.read(out)
        i2v_dir.append(got["direction"] == attrs.direction)
        i2v_keep.append(got["colour"] == attrs.colour and got["shape"] == attrs.shape)
        i2v_last.append(subject_kept(out[-tail:], attrs))
        one_object["i2v"].append(float(np.mean(reader.count_objects(out) == 1)))
        samples.append((f"i2v: {attrs.caption()}", out))
        advance(1)

    seams, ext_dir, ext_last = [], [], []
    for i, attrs in enumerate(mode_combos(seen, n, s.seed, _MODE_STREAMS["extend"])):
        clip = render_clip(world, attrs, s.seed, _MODE_STREAMS["extend"], i, codec)
        out = _to_uint8(pipe.generate([attrs.caption()], F, H, W, mode="extend_forward", video=clip[:num_given],
                                      context_latents=k, seed=s.seed + i, **kw).video)[0]
        seams.append(seam_error_px(reader, out, num_given))
        ext_dir.append(reader.read(out)["direction"] == attrs.direction)
        ext_last.append(subject_kept(out[-tail:], attrs))
        one_object["extend"].append(float(np.mean(reader.count_objects(out[num_given:]) == 1)))  # the generated frames
        samples.append((f"extend ({num_given} given): {attrs.caption()}", out))
        advance(1)

    interps = []
    for i, attrs in enumerate(mode_combos(seen, n, s.seed, _MODE_STREAMS["interpolate"])):
        clip = render_clip(world, attrs, s.seed, _MODE_STREAMS["interpolate"], i, codec)
        ends = centroids(reader, clip)  # the given frames' object positions
        out = _to_uint8(pipe.generate([attrs.caption()], F, H, W, mode="interpolate", image=clip[0], last_image=clip[-1],
                                      seed=s.seed + i, **kw).video)[0]
        interps.append(interpolation_error(reader, out, ends[0], ends[-1], end_frame))
        one_object["interpolate"].append(float(np.mean(reader.count_objects(out) == 1)))  # a cross-fade shows two
        samples.append((f"interpolate: {attrs.caption()}", out))
        advance(1)

    seam = _summary(seams)
    interp = _summary(interps)
    result = {
        "i2v": {"n": n, "frame0_psnr_db": float(np.mean(psnrs)), "frame0_psnr_db_min": float(np.min(psnrs)),
                "direction_accuracy": float(np.mean(i2v_dir)), "colour_shape_kept": float(np.mean(i2v_keep)),
                "subject_kept_last": float(np.mean(i2v_last)), "last_frames": tail, "one_object_frac": float(np.mean(one_object["i2v"]))},
        "extend": {"n": n, "num_given_frames": num_given, "seam_error_px": seam["mean"], "seam_error_px_median": seam["median"],
                   "measured_fraction": seam["measured_fraction"], "direction_accuracy": float(np.mean(ext_dir)),
                   "subject_kept_last": float(np.mean(ext_last)), "one_object_frac": float(np.mean(one_object["extend"]))},
        "interpolate": {"n": n, "end_frame": end_frame, "mid_frame": end_frame // 2, "mid_error_frac": interp["mean"],
                        "mid_error_frac_median": interp["median"], "measured_fraction": interp["measured_fraction"],
                        "one_object_frac": float(np.mean(one_object["interpolate"]))},
        # every generated frame of every mode: one object, as in every training clip
        "modes": {"one_object_frac": float(np.mean([v for vs in one_object.values() for v in vs]))},
    }
    return result, samples


def evaluate_vae(vae, world: ShapesWorld, num_clips: int, seed: int, codec: Codec | None = None, reader: AttributeReader | None = None) -> dict[str, Any]:
    """Reconstruction PSNR (dB, uint8 frames) of ground-truth clips (as the dataset encodes
    them, with ``codec``) through the VAE; with a ``reader``, also the attributes read back
    from the reconstructions: the ceiling of any DiT that generates in this latent space (a
    VAE that rounds the corners of small squares caps shape accuracy, whatever the DiT)."""
    import torch

    combos = mode_combos(ShapesWorld.combos(), num_clips, seed, _MODE_STREAMS["vae"])
    clips = np.stack([render_clip(world, a, seed, _MODE_STREAMS["vae"], i, codec) for i, a in enumerate(combos)])  # (B, F, H, W, 3)
    x = torch.from_numpy(clips).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)  # (B, 3, F, H, W)
    out = _to_uint8(recon)
    values = [psnr_db(o, c) for o, c in zip(out, clips)]
    result = {"n": len(values), "num_frames": world.num_frames, "recon_psnr_db": float(np.mean(values)), "recon_psnr_db_min": float(np.min(values))}
    if reader is not None:
        result["recon_read"] = summarize_captions([score_caption(reader, o, a) for o, a in zip(out, combos)])["accuracy"]
    return result


def check_targets(report: dict[str, Any], target_set: str = "quality") -> dict[str, dict[str, Any]]:
    """Each target: its value in the report, the threshold, and whether it is met. Targets of
    modes the report did not score (``modes=False``) are left out, not failed."""
    out = {}
    targets = {**TARGET_SETS[target_set], **(CONTROL_TARGETS if "control" in report else {}), **native_targets(report)}
    scored_modes = "modes" in report
    for name, (path, op, threshold) in targets.items():
        if not scored_modes and path.split(".")[0] in ("i2v", "modes", "extend", "interpolate"):
            continue
        node: Any = report
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        value = node if isinstance(node, (int, float)) and math.isfinite(node) else None
        ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": value, "target": f"{op} {threshold:g}", "pass": bool(ok)}
    return out


def run_shapes_eval(ckpt: str | Path, out_dir: str | Path, settings: ShapesEvalSettings | None = None, data_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a DiT export on the shapes world; writes report.json and the figures."""
    import torch

    from sora_train.training.pipeline import VideoPipeline

    s = settings or ShapesEvalSettings()
    t0 = time.perf_counter()
    export = Path(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = VideoPipeline.from_export(export)
    facts = data_facts(export, pipe.meta, data_dir, s.seed)
    world = make_world(facts, pipe.meta)
    reader = AttributeReader(world)
    seen, held = split_combos(facts["heldout_pairs"], s.max_combos, s.seed)
    torch.manual_seed(s.seed)

    n_t2v = (len(seen) + len(held) + len(colour_combos(s.colours, s.max_combos, s.seed))) * s.num_per_combo
    reference = (world.num_frames, world.height, world.width)  # the train shape: what the other shapes are held to
    n_native = len({reference, *(parse_shape(x) for x in s.shapes)}) * len(seen) if s.shapes else 0
    bar = _Progress(progress, {"text-to-video": n_t2v, **({"prompting modes": 3 * s.clips_per_mode} if s.modes else {}),
                               **({"native shapes": n_native} if n_native else {})})
    timings = {}
    try:
        t = time.perf_counter()
        seen_records, seen_videos = evaluate_t2v(pipe, reader, world, seen, s, bar.advancer("text-to-video"), salt=0)
        held_records, held_videos = evaluate_t2v(pipe, reader, world, held, s, bar.advancer("text-to-video"), salt=1)
        colour_groups = evaluate_colour_groups(pipe, reader, world, s, bar.advancer("text-to-video"))
        timings["t2v_s"] = time.perf_counter() - t
        modes: dict[str, Any] = {}
        mode_samples: list[tuple[str, np.ndarray]] = []
        if s.modes:
            t = time.perf_counter()
            modes, mode_samples = evaluate_modes(pipe, reader, world, seen, s, bar.advancer("prompting modes"), facts["codec"])
            timings["modes_s"] = time.perf_counter() - t
        native: dict[str, Any] = {}
        if s.shapes:
            t = time.perf_counter()
            trained = pipe.meta.get("train_buckets") or [shape_name(reference)]
            native, native_samples = evaluate_native(pipe, world, seen, [parse_shape(x) for x in s.shapes], reference, trained, s,
                                                     bar.advancer("native shapes"))
            timings["native_s"] = time.perf_counter() - t
    finally:
        bar.stop()
    t = time.perf_counter()
    vae = evaluate_vae(pipe.vae, world, num_clips=max(4, 4 * s.clips_per_mode), seed=s.seed, codec=facts["codec"], reader=reader)
    gt = ground_truth_check(world, reader, num_clips=max(8, s.clips_per_mode), seed=s.seed, codec=facts["codec"])
    timings["vae_and_ground_truth_s"] = time.perf_counter() - t

    report: dict[str, Any] = {
        "export": str(export),
        "weights": pipe.meta.get("weights"),
        "weights_sha256": pipe.meta.get("weights_sha256"),
        "train_step": pipe.meta.get("step"),
        "settings": {**asdict(s), "num_frames": world.num_frames, "height": world.height, "width": world.width,
                     "world": world.options(),  # the world prompted and read: object sizes, travel, ...
                     "sampler": {**pipe.flow.sampler_defaults, **({"steps": s.steps} if s.steps else {}),
                                 **({"guidance_scale": s.guidance_scale} if s.guidance_scale is not None else {}),
                                 **({"shift": s.shift} if s.shift is not None else {})}},
        "heldout_pairs": [list(p) for p in facts["heldout_pairs"]],
        "heldout_source": facts["heldout_source"],
        "ground_truth_codec": asdict(facts["codec"]),
        "t2v": {"seen": summarize_captions(seen_records), "heldout": summarize_captions(held_records),
                "all": summarize_captions(seen_records + held_records),
                "by_colour": by_colour(seen_records + held_records),
                **({"colours": colour_groups} if s.colours else {})},
        **modes,
        **({"native": native} if native else {}),
        "vae": vae,
        "ground_truth": gt,
    }
    if getattr(pipe, "max_boxes", 0):
        t = time.perf_counter()
        report["control"] = evaluate_control(pipe, reader, world, seen, s)
        timings["control_s"] = time.perf_counter() - t
    report["targets"] = check_targets(report, s.targets)
    history = export.parent / "plots" / "loss_history.json"
    files = {"report": "report.json", "samples": "samples.png", "accuracy": "accuracy.png"}
    if history.is_file():
        by_t = val_loss_by_timestep(json.loads(history.read_text()))
        report["val_loss_by_t"] = {name: series[-1][1] for name, series in by_t.items()}
        if by_t:
            write_val_loss_plot(by_t, out / "val_loss_by_t.png")
            files["val_loss_by_t"] = "val_loss_by_t.png"
    rows = _pick_rows(seen_records, seen_videos, held_records, held_videos) + mode_samples[:: max(1, len(mode_samples) // 6)][:6]
    write_sample_grid(rows, out / "samples.png")
    mark_image_file(out / "samples.png", {"prompt": "", "content": "sora-eval shapes: generated clips", "model_sha256": pipe.meta.get("weights_sha256")})
    write_accuracy_plot(report, out / "accuracy.png")
    if native:  # one generated clip per shape, each at its own frame size
        write_native_grid(native_samples, out / "native.png")
        mark_image_file(out / "native.png", {"prompt": "", "content": "sora-eval shapes --shapes: generated clips", "model_sha256": pipe.meta.get("weights_sha256")})
        files["native"] = "native.png"
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = timings
    report["files"] = files
    atomic_write_json(out / "report.json", _finite(report))
    return report


# -- per colour (fine-tuning measured, issue 18; sora-eval shapes-compare reads these) -------------
def _check_colours(colours: Sequence[str] | str | None) -> tuple[str, ...]:
    """``colours`` as a tuple of palette names; a one-line SoraError names an unknown one."""
    from sora_train.data.shapes import COLOURS

    names = (colours,) if isinstance(colours, str) else tuple(colours or ())
    unknown = [c for c in names if c not in COLOURS]
    if unknown:
        raise SoraError(f"sora-eval shapes: colours {unknown} are not in the palette {list(COLOURS)}")
    return tuple(dict.fromkeys(names))


def colour_combos(colours: Sequence[str], max_combos: int | None = None, seed: int = 0) -> list[ShapeAttrs]:
    """Every caption combination of each colour in ``colours``, each colour's capped at
    ``max_combos`` by a seeded spread (the same for every export under one seed)."""
    out: list[ShapeAttrs] = []
    for i, colour in enumerate(colours):
        group = [a for a in ShapesWorld.combos() if a.colour == colour]
        if max_combos is not None and len(group) > max_combos:
            perm = np.random.default_rng([seed, _MODE_STREAMS["combos"], 100 + i]).permutation(len(group))
            group = [group[j] for j in sorted(perm[:max_combos])]
        out.extend(group)
    return out


def evaluate_colour_groups(pipe, reader: AttributeReader, world: ShapesWorld, s: ShapesEvalSettings, advance: Callable[[int], None]) -> dict[str, Any]:
    """Text-to-video on every combination of each of ``s.colours``: {colour: summary}."""
    groups: dict[str, Any] = {}
    for i, colour in enumerate(s.colours):
        combos = colour_combos([colour], s.max_combos, s.seed)
        records, _ = evaluate_t2v(pipe, reader, world, combos, s, advance, salt=2 + i)
        groups[colour] = summarize_captions(records)
    return groups


def by_colour(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per asked colour: n and accuracy per attribute and joint (what forgetting is read from)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["expected"]["colour"], []).append(r)
    return {c: {"n": len(rs), "accuracy": summarize_captions(rs)["accuracy"]} for c, rs in sorted(groups.items())}


# -- box motion control ------------------------------------------------------------------------
def trajectory(kind: str, world: ShapesWorld, attrs: ShapeAttrs, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A requested path of ``kind`` for an object of ``attrs`` -> (bounding-box centres (F, 2)
    px, equal-area radius px). Its net motion follows ``attrs.direction`` (so the caption stays
    true), and it keeps the object inside the frame:

    - curve: a smooth arc across the motion axis (a half to one and a half sine periods);
    - zigzag: three to four straight legs alternating across the axis (sharp turns);
    - stop_and_go: moves, holds still, moves again, holds (uneven speed along a line).
    """
    F, H, W = world.num_frames, world.height, world.width
    side = min(H, W)
    lo, hi = world.small_radius if attrs.size == "small" else world.large_radius
    radius = float(np.mean([lo, hi])) * side
    ext = MAX_HALF_EXTENT * radius
    horizontal = attrs.direction in ("left", "right")
    along_len, across_len = (W, H) if horizontal else (H, W)
    m_a, m_c = world.margin * along_len + ext, world.margin * across_len + ext
    travel = float(np.mean(world.travel)) * along_len
    a0 = rng.uniform(m_a, along_len - m_a - travel)
    c_mid = across_len / 2
    amp = min(c_mid - m_c, 0.25 * across_len)
    t = np.linspace(0.0, 1.0, F)
    if kind == "curve":
        periods = rng.choice([0.5, 1.0, 1.5])
        along = a0 + travel * t
        across = c_mid + amp * rng.choice([-1, 1]) * np.sin(np.pi * 2 * periods * t)
    elif kind == "zigzag":
        legs = int(rng.integers(3, 5))
        knots = np.linspace(0, 1, legs + 1)
        levels = c_mid + amp * np.array([(-1) ** i for i in range(legs + 1)]) * rng.choice([-1, 1])
        along = a0 + travel * t
        across = np.interp(t, knots, levels)
    elif kind == "stop_and_go":
        # progress along the line: move 0 -> 0.5 by t1, hold to t2, move to 1 by t3, hold
        t1, t2, t3 = 0.3, 0.5, 0.8
        prog = np.interp(t, [0, t1, t2, t3, 1], [0, 0.5, 0.5, 1, 1])
        along = a0 + travel * prog
        across = np.full(F, c_mid + rng.uniform(-amp, amp))
    else:
        raise SoraError(f"trajectory kind {kind!r}: choose one of {list(TRAJECTORY_KINDS)}")
    if attrs.direction in ("left", "up"):  # mirror so the net motion points the asked way
        along = along_len - along
    across = np.clip(across, m_c, across_len - m_c)
    xy = np.stack([along, across], 1) if horizontal else np.stack([across, along], 1)  # (F, 2)
    return xy, radius


def requested_boxes(attrs: ShapeAttrs, centres: np.ndarray, radius: float, world: ShapesWorld, soft_margin: float = 0.0) -> Boxes:
    """Per-frame boxes for a path: the object's own box (hard), or grown by ``soft_margin`` of
    the frame per side (soft)."""
    hx, hy = half_extent(attrs.shape, radius)
    W, H = world.width, world.height
    b = np.stack([(centres[:, 0] - hx) / W - soft_margin, (centres[:, 1] - hy) / H - soft_margin,
                  (centres[:, 0] + hx) / W + soft_margin, (centres[:, 1] + hy) / H + soft_margin], 1).clip(0.0, 1.0)  # (F, 4)
    mode = "soft" if soft_margin > 0 else "hard"
    return Boxes((BoxTrack(0, mode, tuple(range(len(b))), tuple(tuple(float(v) for v in r) for r in b)),), len(b))  # type: ignore[arg-type]


def control_scores(reader: AttributeReader, video: np.ndarray, attrs: ShapeAttrs, boxes: Boxes, world: ShapesWorld, centres: np.ndarray, radius: float) -> dict[str, Any]:
    """One box-controlled sample against what was requested: per frame, the distance between
    the reader's centroid and the requested object's centroid (the path's box centre shifted
    to the shape's centroid), as a fraction of the frame width; and whether the object's
    extent (measured centroid +- the shape's half extent at the measured size, 0.5 px of
    antialiasing allowed) lies inside the requested box. Frames without an object count as
    outside and are left out of the error (their share is ``absent``)."""
    got = reader.read(video)
    bx, _, _ = boxes.dense(world.num_frames)  # (1, F, 4)
    W, H = world.width, world.height
    box = bx[0] * np.array([W, H, W, H], np.float32)  # (F, 4) px
    cen = np.asarray(got["centroids"], np.float64)  # (F, 2) px, nan where absent
    present = np.isfinite(cen).all(axis=1)  # (F,)
    hx_unit, hy_unit = half_extent(attrs.shape, 1.0)
    dx_c, dy_c = centroid_offset(attrs.shape, 1.0)
    want = centres + np.array([dx_c, dy_c]) * radius  # (F, 2) requested centroid
    err = np.linalg.norm(cen - want, axis=1) / W  # (F,) nan where absent
    areas = np.nan_to_num(np.asarray(got["areas"], np.float64)) * H * W  # (F,) px
    r_got = np.sqrt(areas / math.pi)  # (F,)
    cx, cy = cen[:, 0] - dx_c * r_got, cen[:, 1] - dy_c * r_got  # back to the bounding-box centre
    tol = 0.5
    with np.errstate(invalid="ignore"):
        inside = present & (cx - hx_unit * r_got >= box[:, 0] - tol) & (cx + hx_unit * r_got <= box[:, 2] + tol) \
            & (cy - hy_unit * r_got >= box[:, 1] - tol) & (cy + hy_unit * r_got <= box[:, 3] + tol)
    return {"centre_error": _nanmean(err.tolist()), "inside": float(inside.mean()), "absent": float(1 - present.mean()),
            "colour": got["colour"] == attrs.colour, "shape": got["shape"] == attrs.shape}


def evaluate_control(pipe, reader: AttributeReader, world: ShapesWorld, seen: Sequence[ShapeAttrs], s: ShapesEvalSettings) -> dict[str, Any]:
    """Box motion control on requested paths of kinds no training clip followed (curve,
    zig-zag, stop-and-go): hard boxes -> centre error; soft boxes (the object's box grown by
    SOFT_REQUEST_MARGIN per side) -> inside-box fraction; the same prompts and seeds without
    boxes -> colour / shape accuracy lost to the boxes."""
    F, H, W = world.num_frames, world.height, world.width
    kw = dict(steps=s.steps, guidance_scale=s.guidance_scale, shift=s.shift)
    rng = np.random.default_rng([s.seed, _MODE_STREAMS["control"]])
    by_kind: dict[str, Any] = {}
    all_hard, all_soft, plain_hits = [], [], []
    for k_i, kind in enumerate(TRAJECTORY_KINDS):
        hard_rows, soft_rows, plain_rows = [], [], []
        for i in range(s.control_clips):
            attrs = seen[int(rng.integers(len(seen)))]
            centres, radius = trajectory(kind, world, attrs, rng)
            seed = s.seed + 1000 * k_i + i
            for margin, rows in ((0.0, hard_rows), (SOFT_REQUEST_MARGIN, soft_rows)):
                boxes = requested_boxes(attrs, centres, radius, world, margin)
                gen = pipe.generate([attrs.caption()], F, H, W, mode="t2v", seed=seed, boxes=boxes, **kw)
                rows.append(control_scores(reader, _to_uint8(gen.video)[0], attrs, boxes, world, centres, radius))
            gen = pipe.generate([attrs.caption()], F, H, W, mode="t2v", seed=seed, **kw)
            got = reader.read(_to_uint8(gen.video)[0])
            plain_rows.append({"colour": got["colour"] == attrs.colour, "shape": got["shape"] == attrs.shape})
        by_kind[kind] = {"centre_error": _nanmean([r["centre_error"] for r in hard_rows]),
                         "inside_soft": float(np.mean([r["inside"] for r in soft_rows])),
                         "absent": float(np.mean([r["absent"] for r in hard_rows + soft_rows])), "n": len(hard_rows)}
        all_hard += hard_rows
        all_soft += soft_rows
        plain_hits += plain_rows
    with_boxes = all_hard + all_soft
    acc_boxes = {a: float(np.mean([r[a] for r in with_boxes])) for a in ("colour", "shape")}
    acc_plain = {a: float(np.mean([r[a] for r in plain_hits])) for a in ("colour", "shape")}
    return {
        "kinds": by_kind,
        "centre_error": _nanmean([r["centre_error"] for r in all_hard]),
        "inside_soft": float(np.mean([r["inside"] for r in all_soft])),
        "inside_hard_box": float(np.mean([r["inside"] for r in all_hard])),
        "absent": float(np.mean([r["absent"] for r in with_boxes])),
        "accuracy_with_boxes": acc_boxes,
        "accuracy_without_boxes": acc_plain,
        "colour_drop_points": 100 * (acc_plain["colour"] - acc_boxes["colour"]),
        "shape_drop_points": 100 * (acc_plain["shape"] - acc_boxes["shape"]),
        "soft_margin": SOFT_REQUEST_MARGIN,
        "n": len(all_hard),
    }


def _pick_rows(seen_r, seen_v, held_r, held_v, n_seen: int = 10, n_held: int = 6) -> list[tuple[str, np.ndarray]]:
    def label(r: dict, tag: str) -> str:
        got = " ".join(r["read"][k] for k in ATTRIBUTES)
        return f"{tag}{r['caption']}  | read: {got}  {'OK' if r['hits']['joint'] else 'X'}"

    idx_s = np.linspace(0, len(seen_r) - 1, min(n_seen, len(seen_r))).round().astype(int) if seen_r else []
    idx_h = np.linspace(0, len(held_r) - 1, min(n_held, len(held_r))).round().astype(int) if held_r else []
    return [(label(seen_r[i], ""), seen_v[i]) for i in idx_s] + [(label(held_r[i], "[held out] "), held_v[i]) for i in idx_h]


def _finite(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so report.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# -- figures and the table ---------------------------------------------------------------------------
def val_loss_by_timestep(history: dict[str, list]) -> dict[str, list[tuple[int, float]]]:
    """``val/loss_t{a}-{b}`` series of a LossPlot history, ordered by bin."""
    names = [n for n in history if n.startswith("val/loss_t") and history[n]]
    return {n: [tuple(x) for x in history[n]] for n in sorted(names, key=lambda n: float(n[len("val/loss_t"):].split("-")[0]))}


def write_val_loss_plot(by_t: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Left: the last validation loss per timestep bin; right: each bin over training."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [n[len("val/loss_t"):] for n in by_t]
    a.bar(range(len(by_t)), [s[-1][1] for s in by_t.values()], color="tab:blue")
    a.set_xticks(range(len(by_t)), labels, rotation=45, fontsize=8)
    a.set_xlabel("timestep bin (t = 1: pure noise)")
    a.set_ylabel("val loss")
    a.set_title(f"val loss by timestep, step {next(iter(by_t.values()))[-1][0]}")
    cmap = plt.get_cmap("viridis")
    for i, (name, series) in enumerate(by_t.items()):
        steps, values = zip(*series)
        b.plot(steps, values, color=cmap(i / max(1, len(by_t) - 1)), label=labels[i], marker="." if len(steps) < 30 else None)
    b.set_xlabel("step")
    b.set_yscale("log")
    b.set_title("val loss by timestep over training")
    b.legend(fontsize=7, ncol=2)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_accuracy_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: per-attribute and joint accuracy, seen vs held-out combinations."""
    plt = _pyplot()
    keys = (*ATTRIBUTES, "joint")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for j, (group, colour) in enumerate((("seen", "tab:blue"), ("heldout", "tab:orange"))):
        acc = report["t2v"][group]["accuracy"]
        vals = [acc[k] if acc[k] is not None else 0.0 for k in keys]
        bars = ax.bar(np.arange(len(keys)) + (j - 0.5) * width, vals, width, label=f"{group} (n={report['t2v'][group]['n']})", color=colour)
        for rect, v in zip(bars, vals):
            ax.text(rect.get_x() + rect.get_width() / 2, v + 0.01, f"{v:.0%}", ha="center", fontsize=7)
    # dashed: the targets the report was checked against (seen: left bar; held-out joint: right)
    checked = TARGET_SETS[report.get("settings", {}).get("targets", "quality")]
    for where, _op, threshold in checked.values():
        parts = where.split(".")
        if parts[:2] == ["t2v", "seen"] and parts[-1] in keys:
            i = keys.index(parts[-1])
            ax.hlines(threshold, i - 0.45, i + 0.05, colors="k", linestyles="--", linewidth=1)
        elif parts[:2] == ["t2v", "heldout"] and parts[-1] in keys:
            i = keys.index(parts[-1])
            ax.hlines(threshold, i - 0.05, i + 0.45, colors="k", linestyles="--", linewidth=1)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (read back from pixels)")
    ax.set_title("text-to-video caption adherence (dashed: targets)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_sample_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, max_frames: int = 9) -> Path:
    """One row per clip: its label above evenly spaced frames, scaled up for small videos."""
    from PIL import Image, ImageDraw

    if not rows:
        raise SoraError("write_sample_grid: no samples to draw")
    H, W = rows[0][1].shape[1:3]
    scale = max(1, 64 // H)
    label_h, gap = 12, 4
    n_frames = min(max_frames, rows[0][1].shape[0])
    width = max(n_frames * W * scale, 480)
    canvas = Image.new("RGB", (width, len(rows) * (label_h + H * scale + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, frames in rows:
        idx = np.linspace(0, len(frames) - 1, min(n_frames, len(frames))).round().astype(int)
        strip = np.concatenate([frames[i] for i in idx], axis=1)  # (H, n*W, 3)
        img = Image.fromarray(strip).resize((strip.shape[1] * scale, H * scale), Image.NEAREST)
        draw.text((2, y), label[:110], fill=(0, 0, 0))
        canvas.paste(img, (0, y + label_h))
        y += label_h + H * scale + gap
    canvas.save(path)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class _Progress:
    """A rich progress bar with one task per phase (a no-op when disabled)."""

    def __init__(self, enabled: bool, totals: dict[str, int]) -> None:
        self.bar, self.tasks = None, {}
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
            self.tasks = {name: self.bar.add_task(name, total=total) for name, total in totals.items()}
            self.bar.start()

    def advancer(self, name: str) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n: None
        return lambda n: self.bar.advance(self.tasks[name], n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_table(report: dict[str, Any]) -> None:
    """The report's headline numbers as two rich tables (accuracy; targets)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    acc = Table(title=f"shapes eval: {report['export']} (step {report.get('train_step')}, {report.get('weights')})")
    acc.add_column("t2v combos")
    acc.add_column("n", justify="right")
    for k in (*ATTRIBUTES, "joint"):
        acc.add_column(k, justify="right")
    acc.add_column("present", justify="right")
    for group in ("seen", "heldout"):
        g = report["t2v"][group]
        acc.add_row(group, str(g["n"]), *[_pct(g["accuracy"][k]) for k in (*ATTRIBUTES, "joint")], _pct(g["present"]))
    gt = report["ground_truth"]["t2v"]
    acc.add_row("ground truth", str(gt["n"]), *[_pct(gt["accuracy"][k]) for k in (*ATTRIBUTES, "joint")], _pct(gt["present"]))
    vae = report["vae"]
    if "recon_read" in vae:  # the ceiling: attributes read back from VAE reconstructions
        acc.add_row("VAE recon", str(vae["n"]), *[_pct(vae["recon_read"][k]) for k in (*ATTRIBUTES, "joint")], "")
    console.print(acc)
    tgt = Table(title="targets")
    tgt.add_column("metric")
    tgt.add_column("value", justify="right")
    tgt.add_column("target", justify="right")
    tgt.add_column("", justify="center")
    for name, t in report["targets"].items():
        v = t["value"]
        as_pct = any(w in name for w in ("accuracy", "kept", "object")) and "points" not in name
        tgt.add_row(name, "n/a" if v is None else (f"{v:.1%}" if as_pct else f"{v:.3g}"), t["target"], "pass" if t["pass"] else "FAIL")
    console.print(tgt)
    if "i2v" in report:  # a sanity figure, not a target: it measures the VAE round trip of the given image
        console.print(f"i2v frame-0 PSNR {report['i2v']['frame0_psnr_db']:.1f} dB (sanity: the given image through the VAE)")
    misses = top_confusions(report["t2v"]["all"].get("confusion", {}))
    if misses:  # what the misses are says what to fix (e.g. squares read as circles: corners)
        console.print("most frequent misreads (t2v, asked -> read): "
                      + ", ".join(f"{attr} {asked} -> {read} x{c}" for attr, asked, read, c in misses))
    tc = report["t2v"]["all"]["temporal"]
    console.print("temporal consistency (t2v, mean): " + ", ".join(f"{k} {v:.3g}" for k, v in tc.items() if v is not None))
    if "native" in report:
        nat = Table(title=f"native shapes (text-to-video, seen captions; points lost vs {report['native']['reference']})")
        for col in ("FxHxW", "trained", "1 object", "colour", "shape", "dir", "lost c/s/d"):
            nat.add_column(col, justify="left" if col == "FxHxW" else "right", no_wrap=True)
        for name, e in report["native"]["shapes"].items():
            acc, lost = e["accuracy"], e["points_lost"]
            nat.add_row(name, "yes" if e["seen_in_training"] else "no", _pct(e["one_object_frac"]), _pct(acc.get("colour")),
                        _pct(acc.get("shape")), _pct(acc.get("direction")),
                        "/".join("-" if k not in lost else f"{lost[k]:+.0f}" for k in ("colour", "shape", "direction")))
        console.print(nat)


def one_line(report: dict[str, Any]) -> str:
    """The headline in one line: seen-caption accuracy, held-out joint, targets met."""
    seen, held = report["t2v"]["seen"]["accuracy"], report["t2v"]["heldout"]["accuracy"]
    met = sum(t["pass"] for t in report["targets"].values())
    preset = report.get("settings", {}).get("targets", "quality")
    return (f"shapes eval (step {report.get('train_step')}): seen colour {_pct(seen['colour'])}, shape {_pct(seen['shape'])}, "
            f"direction {_pct(seen['direction'])}, size {_pct(seen['size'])}; held-out joint {_pct(held['joint'])}; "
            f"{preset} targets met {met}/{len(report['targets'])}")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"
