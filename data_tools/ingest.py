"""`sora-data ingest`: folders of footage and captions -> a webdataset shard set.

    sora-data ingest footage/ --out data/shards/mine
    sora-data ingest footage/ more.mp4 --out data/shards/mine --manifest captions.csv --workers 8
    sora-data ingest --manifest captions.jsonl --out data/shards/mine --scene-split

Per input file, in a worker process (a decoder crash costs one file, not the run):
read -> sha256 -> probe by decoding every frame (probe.py) -> plan clips (scenes.py) ->
the clip bytes: the original file untouched when it is one clip, else each frame range
re-encoded as H.264 (crf 17, same fps) and checked to decode to exactly its frame count.
The parent writes the results in input order through ShardSetWriter, so the same inputs give
the same shards whatever the worker count.

Re-running into the same --out resumes: ``done.jsonl`` lists every source whose samples sit
in finished shards (by sha256, with the options hash); those are skipped, new samples go
into new shard files numbered after the existing ones, and index.json is rebuilt over all
of them. Rejected inputs are retried (a caption may have been added since).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sora_train.data.boxes import BOXES_SUFFIX, load_boxes, parse_boxes
from sora_train.data.shards import REJECTS_NAME, sample_entry
from sora_train.data.shardset import ShardLedger, ShardSetSpec, ShardSetWriter
from sora_train.data_tools.parts import Part, add_part_argument, finish_part, part_done, part_label, resolve_part, say_done
from sora_train.data_tools.probe import (
    REASONS,
    Crashed,
    IsolatedPool,
    Limits,
    Rejected,
    progress,
    display_path,
    find_media,
    iter_frames,
    print_run_summary,
    probe_media,
    read_source,
    short,
)
from sora_train.data_tools.scenes import DEFAULT_SCENE_THRESHOLD, ClipLimits, SceneCutter, plan_clips
from sora_train.utils import get_logger, sha256_bytes, stable_hash
from sora_train.utils.errors import SoraError

log = get_logger(__name__)

TOOL = "sora-data ingest"
# Bump when the bytes or json written for the same input and options change.
INGEST_FORMAT = "sora_train.ingest/1"
MISSING_CAPTION_POLICIES = ("reject", "empty")


class IngestFailed(SoraError):
    """The run could not produce a usable shard set (exit status 1, not the usage error's 2)."""

    exit_code = 1


@dataclass(frozen=True)
class IngestOptions:
    """Options of one ingest. The first group decides what is written (hashed, recorded in
    index.json, and must match when resuming into the same --out); the rest only how."""

    max_clip_seconds: float = 10.0
    min_clip_seconds: float = 1.0
    min_frames: int = 8
    scene_split: bool = False
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD
    min_side: int = 16
    max_side: int = 8192
    max_aspect: float = 8.0
    crf: int = 17  # H.264 quality of re-encoded clips: visually lossless at 17
    missing_caption: str = "reject"
    blur_faces: bool = False  # blur detected faces in kept clips (sora_train.data.faces)
    keep_pii: bool = False  # keep e-mails, phone numbers, URLs, ... in captions (default: scrubbed)
    # -- how (not hashed) --
    workers: int = 1
    stride: int = 1
    timeout: float = 0.0
    shard_max_count: int = 1000
    shard_max_bytes: int = 1 << 30

    _RUNTIME = ("workers", "stride", "timeout", "shard_max_count", "shard_max_bytes")

    def __post_init__(self) -> None:
        checks = [
            (self.max_clip_seconds > 0, "--max-clip-seconds must be > 0"),
            (0 <= self.min_clip_seconds <= self.max_clip_seconds, "--min-clip-seconds must be in [0, --max-clip-seconds]"),
            (self.min_frames >= 1, "--min-frames must be >= 1"),
            (1 <= self.min_side <= self.max_side, "--min-side must be in [1, --max-side]"),
            (self.max_aspect >= 1, "--max-aspect must be >= 1"),
            (0 <= self.crf <= 51, "--crf must be in [0, 51] (H.264)"),
            (self.missing_caption in MISSING_CAPTION_POLICIES, f"--missing-caption must be one of {MISSING_CAPTION_POLICIES}"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.stride >= 1, "--stride must be >= 1"),
            (self.timeout >= 0, "--timeout must be >= 0"),
            (self.shard_max_count >= 1, "--shard-size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SoraError(msg)

    def written(self) -> dict[str, Any]:
        """The options that decide the output."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._RUNTIME}

    def options_hash(self) -> str:
        return stable_hash({"format": INGEST_FORMAT, **self.written()})

    @property
    def clip_limits(self) -> ClipLimits:
        return ClipLimits(self.max_clip_seconds, self.min_clip_seconds, self.min_frames)

    @property
    def limits(self) -> Limits:
        return Limits(self.min_side, self.max_side, self.max_aspect)


# -- captions ------------------------------------------------------------------------------
_RESERVED = ("path", "caption", "captions", "license")


def _path_key(path: str | os.PathLike) -> str:
    """How a file is matched to a manifest row: absolute, normalised, Unicode NFC (macOS
    writes names in NFD; a manifest typed elsewhere is usually NFC)."""
    return unicodedata.normalize("NFC", os.path.normpath(os.path.abspath(os.fsdecode(path))))


def _resolve_listed(path: Path) -> Path:
    """A manifest's path as it exists on disk: the same name in another Unicode normal form
    (NFC in the manifest, NFD on disk, or the reverse) is the same file."""
    if os.path.lexists(path) or not path.parent.is_dir():
        return path
    want = unicodedata.normalize("NFC", path.name)
    for entry in os.scandir(path.parent):
        if unicodedata.normalize("NFC", entry.name) == want:
            return path.with_name(entry.name)
    return path


def load_manifest(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Rows of a .csv (header with ``path`` and ``caption``) or .jsonl manifest, by file.

    Relative paths are relative to the manifest's folder. Fields other than path, caption,
    captions and license are kept as the sample's ``extra``.
    """
    path = Path(path)
    if not path.is_file():
        raise SoraError(f"--manifest {display_path(path)} does not exist")
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl"):
        raise SoraError(f"--manifest {display_path(path)}: expected a .csv or .jsonl file")
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if kind == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise SoraError(f"--manifest {display_path(path)}: the header must name a 'path' column (has {reader.fieldnames})")
                for row in reader:
                    rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None and v not in (None, "")}))
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SoraError(f"--manifest {display_path(path)} line {n}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise SoraError(f"--manifest {display_path(path)} line {n}: expected a JSON object")
                    rows.append((n, row))
    except UnicodeDecodeError as e:
        raise SoraError(f"--manifest {display_path(path)}: not UTF-8 ({e.reason} at byte {e.start})") from None
    out: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    for n, row in rows:
        if not isinstance(row.get("path"), str) or not row["path"].strip():
            raise SoraError(f"--manifest {display_path(path)} line {n}: no 'path'")
        key = _path_key(path.parent / row["path"])
        if key in out:
            raise SoraError(f"--manifest {display_path(path)} line {n}: {row['path']!r} is already listed at line {lines[key]}")
        out[key], lines[key] = {**row, "_line": n, "_manifest": str(path)}, n
    return out


def _caption_fields(src: dict[str, Any], where: str) -> dict[str, Any]:
    """caption, captions, license, extra from a manifest row or a JSON sidecar."""
    caption = src.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise Rejected("bad_sidecar", f"{where}: 'caption' is not a string")
    captions = src.get("captions") or {}
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise Rejected("bad_sidecar", f"{where}: 'captions' must map source names to strings")
    extra = {k: v for k, v in src.items() if k not in _RESERVED and not k.startswith("_")}
    out: dict[str, Any] = {"caption": (caption or "").strip() or None, "captions": dict(captions), "extra": extra}
    if src.get("license") not in (None, ""):
        out["license"] = src["license"]
    return out


def caption_for(media: Path, manifest: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Caption info for one media file: the manifest row, else NAME.json, else NAME.txt.

    Returns {"caption": str | None, "captions": {...}, "license"?: ..., "extra": {...}};
    raises Rejected(bad_sidecar) for a sidecar that exists but cannot be used.
    """
    if manifest:
        row = manifest.get(_path_key(media))
        if row is not None:
            return _caption_fields(row, f"{Path(row['_manifest']).name} line {row['_line']}")
    stem = media.with_suffix("")
    side_json, side_txt = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".txt")
    if side_json.is_file():
        try:
            obj = json.loads(side_json.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Rejected("bad_sidecar", f"{side_json.name}: {short(e, 100)}") from None
        if not isinstance(obj, dict):
            raise Rejected("bad_sidecar", f"{side_json.name}: expected a JSON object")
        info = _caption_fields(obj, side_json.name)
        if info["caption"] is not None or not side_txt.is_file():
            return info
    if side_txt.is_file():
        try:
            text = side_txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise Rejected("bad_sidecar", f"{side_txt.name}: not UTF-8 ({e.reason})") from None
        return {"caption": text or None, "captions": {}, "extra": {}}
    return {"caption": None, "captions": {}, "extra": {}}


def _boxes_sidecar(media: Path) -> dict[str, Any]:
    """NAME.boxes.json beside a video (docs/data.md, "Boxes"): {"boxes", "boxes_file"} when
    present and well-formed, {} when absent; raises Rejected(bad_sidecar) naming the field."""
    side = media.with_suffix("").with_name(media.with_suffix("").name + BOXES_SUFFIX)
    if not side.is_file():
        return {}
    try:
        boxes = load_boxes(side, what=side.name)
    except SoraError as e:
        raise Rejected("bad_sidecar", str(e)) from None
    return {"boxes": boxes.to_json(), "boxes_file": side.name}


# -- one file (runs in a worker) -----------------------------------------------------------
def _ingest_task(task: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Read, hash, probe and cut one file. Returns a dict with status kept/skipped/rejected."""
    if "reject" in task:
        reason, detail = task["reject"]
        return {"status": "rejected", "reason": reason, "detail": detail, "sha256": None}
    opts: IngestOptions = context["options"]
    sha = None
    try:
        data = read_source(task["file"])
        sha = sha256_bytes(data)
        if sha in context["skip"]:
            return {"status": "skipped", "sha256": sha}
        cutter = SceneCutter(opts.clip_limits, opts.scene_threshold) if opts.scene_split else None
        info = probe_media(data, task["ext"], opts.limits, stride=opts.stride, on_frame=cutter.feed if cutter else None)
        if info.kind == "image":
            clips = [{"start": 0, "end": 1, "ext": info.ext, "data": data, "fps": 0.0, "num_frames": 1,
                      "width": info.width, "height": info.height}]
            return {"status": "kept", "sha256": sha, "info": asdict(info), "clips": _blur_faces(clips, opts), "dropped": []}
        if task.get("boxes") is not None:  # keyframes past the source's last frame: refused with the file's name
            try:
                parse_boxes(task["boxes"], task["boxes_file"], num_frames=info.num_frames)
            except SoraError as e:
                raise Rejected("bad_sidecar", str(e)) from None
        cuts = cutter.cuts() if cutter else []
        kept, dropped = plan_clips(info.num_frames, info.fps, opts.clip_limits, cuts)
        if not kept:
            lim = opts.clip_limits
            raise Rejected(
                "too_short",
                f"{info.num_frames} frames ({info.duration:.2f} s at {info.fps:g} fps); "
                f"clips need >= {lim.min_len(info.fps)} frames "
                f"(--min-frames {lim.min_frames}, --min-clip-seconds {lim.min_clip_seconds:g})",
            )
        if kept == [(0, info.num_frames)] and info.num_frames == info.claimed_frames:
            clips = [{"start": 0, "end": info.num_frames, "ext": info.ext, "data": data, "fps": info.fps,
                      "num_frames": info.num_frames, "width": info.width, "height": info.height}]
        else:
            clips = _cut(data, info.pixels, info.fps, kept, opts.crf)
        return {"status": "kept", "sha256": sha, "info": asdict(info), "clips": _blur_faces(clips, opts), "dropped": dropped}
    except Rejected as r:
        return {"status": "rejected", "reason": r.reason, "detail": r.detail, "sha256": sha}


def _blur_faces(clips: list[dict[str, Any]], opts: IngestOptions) -> list[dict[str, Any]]:
    """--blur-faces: blur each clip's faces (re-encoded only when it has any) and count them."""
    if not opts.blur_faces:
        return clips
    from sora_train.data.faces import FaceBlur, blur_media

    blur = FaceBlur()
    for c in clips:
        try:
            c["data"], c["ext"], c["width"], c["height"], stats = blur_media(c["data"], c["ext"], c["fps"], blur, opts.crf)
        except Exception as e:
            raise Rejected("encode_error", f"face blur: {short(e, 120)}") from None
        c["faces"] = stats.to_dict()
    return clips


def _cut(data: bytes, pixels: str, fps: float, ranges: list[tuple[int, int]], crf: int) -> list[dict[str, Any]]:
    """Re-encode each [start, end) of a video as H.264 mp4, decoding the source once, in order."""
    from sora_train.data.video_io import encode_video, probe_video

    clips: list[dict[str, Any]] = []
    todo = list(ranges)
    frames: list[np.ndarray] = []
    try:
        for i, frame in enumerate(iter_frames(data, pixels)):
            if not todo:
                break
            start, end = todo[0]
            if start <= i < end:
                frames.append(frame)
            if i == end - 1:
                stack = np.stack(frames)  # (F, H, W, 3)
                h, w = stack.shape[1] - stack.shape[1] % 2, stack.shape[2] - stack.shape[2] % 2
                stack = stack[:, :h, :w]  # H.264 4:2:0 needs even sides: drop a row/column, invent none
                clip = encode_video(stack, fps, "mp4", crf=crf)
                got = probe_video(clip)
                if got.num_frames != end - start:
                    raise Rejected("encode_error", f"clip [{start}, {end}) re-encoded to {got.num_frames} frames, not {end - start}")
                clips.append({"start": start, "end": end, "ext": "mp4", "data": clip, "fps": got.fps,
                              "num_frames": end - start, "width": w, "height": h})
                frames, todo = [], todo[1:]
    except Rejected:
        raise
    except Exception as e:
        raise Rejected("encode_error", f"cutting clips: {short(e, 120)}") from None
    if todo:
        raise Rejected("encode_error", f"the {pixels} decoder ran out of frames before clip [{todo[0][0]}, {todo[0][1]})")
    return clips


# -- the run -------------------------------------------------------------------------------
def clip_key(sha256: str, start: int, end: int) -> str:
    """Deterministic sample key: same source bytes and frame range -> same key."""
    return f"{sha256[:16]}_{start}_{end}"


class SourceLedger(ShardLedger):
    """done.jsonl of ingest: which samples are in finished shards, and which sources are complete.

    One row per (source, shard) batch: ``{"sha256", "source", "file", "options_hash", "complete",
    "clips": [{"key", "shard", "num_frames", "height", "width", "duration"}]}``. A source is
    skipped on a re-run only once a row marks it ``complete``; a source cut off by a kill is
    redone, and its clips already on disk (same keys, since keys are deterministic) are not
    written twice.
    """

    entries_field = "clips"

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for r in self.rows:
            for c in r["clips"]:
                yield c["shard"], c

    def complete_sources(self) -> set[str]:
        return {r["sha256"] for r in self.rows if r.get("complete")}

    def begin(self, source: dict[str, Any]) -> None:
        """A source ({"sha256", "source", "total"}) whose ``total`` clips are about to be written."""
        source["recorded"] = 0
        if source["total"] == 0:  # every clip was already on disk
            self._append([self._row(source, True)])

    def _rows(self, shard: str, done: list[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for source, clip in done:
            clip["shard"] = shard
            if not rows or rows[-1]["sha256"] != source["sha256"]:
                rows.append(self._row(source, False))
            rows[-1]["clips"].append(clip)
            source["recorded"] += 1
            rows[-1]["complete"] = source["recorded"] == source["total"]
        return rows

    def _adopted(self, shard: str, found: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for key, meta in found:
            src = meta["source"]
            row = rows.setdefault(src["sha256"], self._row({"sha256": src["sha256"], "source": src["path"]}, False))
            row["clips"].append({**sample_entry(key, meta), "shard": shard})
        return list(rows.values())

    def _without(self, missing: set[str]) -> list[dict[str, Any]]:
        lost = {r["sha256"] for r in self.rows for c in r["clips"] if c["shard"] in missing}
        rows = [{**r, "clips": [c for c in r["clips"] if c["shard"] not in missing], "complete": r["complete"] and r["sha256"] not in lost}
                for r in self.rows]
        return [r for r in rows if r["clips"] or r["complete"]]

    def _row(self, source: dict[str, Any], complete: bool) -> dict[str, Any]:
        row = {"sha256": source["sha256"], "source": source["source"], "options_hash": self.options_hash, "complete": complete, "clips": []}
        if "file" in source:  # the merge of an array job's parts names it when it is another part's duplicate
            row["file"] = source["file"]
        return row


def ingest(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    options: IngestOptions = IngestOptions(),
    manifest: str | os.PathLike | None = None,
    quiet: bool = False,
    part: Part | None = None,
) -> dict[str, Any]:
    """Ingest ``inputs`` (folders/files; or the manifest's files when empty) into ``out``; with
    ``part``, only that part of the sorted input files, into ``out/parts/part-K-of-N``
    (data_tools/parts.py; `sora-data merge` joins the parts).

    Returns the merged index.json. Raises SoraError for bad inputs/options (exit 2) and
    IngestFailed (exit 1) when --out cannot be written or the set holds no sample at the end.
    """
    t0 = time.monotonic()
    out = Path(out)
    rows = load_manifest(manifest) if manifest else None
    if inputs:
        files, other = find_media(inputs)
    elif rows:
        mdir = Path(manifest).parent  # type: ignore[arg-type]
        files = sorted(((mdir, _resolve_listed(mdir / r["path"])) for r in rows.values()), key=lambda rf: os.fsencode(rf[1]))
        other = 0
    else:
        raise SoraError("give INPUT folders/files, or --manifest")

    mine, label, set_dir = files, f"--out {display_path(out)}", out
    if part is not None:  # the units are the input files in the order one run takes them
        units = [display_path(os.path.relpath(f, root)) for root, f in files]
        done = part_done(part, out, TOOL, options.options_hash(), units)
        if done is not None:
            say_done(part, out, done, quiet)
            return done
        mine, label, set_dir = part.select(files), part_label(part, out), part.dir(out)
    tasks: list[dict[str, Any]] = []
    for root, f in mine:
        rel = display_path(os.path.relpath(f, root))
        task: dict[str, Any] = {"file": str(f), "rel": rel, "display": display_path(os.path.abspath(f)), "ext": f.suffix.lstrip(".")}
        try:
            cap = caption_for(f, rows)
            if cap["caption"] is None and options.missing_caption == "reject":
                raise Rejected("missing_caption", "no manifest row, NAME.json or NAME.txt caption")
            task["caption"] = cap
            task.update(_boxes_sidecar(f))
        except Rejected as r:
            task["reject"] = (r.reason, r.detail)
        tasks.append(task)
    if rows and inputs:
        unmatched = len(set(rows) - {_path_key(f) for _, f in files})
        if unmatched:
            log.warning("%d manifest rows name files that are not among the inputs; they were not ingested", unmatched)

    spec = ShardSetSpec(tool=TOOL, label=label, verb="ingested", options=options.written(),
                        options_hash=options.options_hash(), reject_field="file", failure=IngestFailed)
    shard_set = ShardSetWriter(set_dir, spec, SourceLedger, max_count=options.shard_max_count, max_bytes=options.shard_max_bytes)
    ledger: SourceLedger = shard_set.ledger  # type: ignore[assignment]
    run: dict[str, Any] = {"inputs": len(tasks), "other_files": other, "kept_sources": 0, "kept_clips": 0,
                           "skipped": 0, "rejected": Counter(), "seconds_of_video": 0.0, "faces_blurred": 0, "clips_with_faces": 0,
                           "pii_scrubbed": {}}
    reevaluated: set[str] = set()
    seen: dict[str, str] = {}
    context = {"options": options, "skip": frozenset(ledger.complete_sources())}
    pool = IsolatedPool(_ingest_task, context, workers=options.workers, timeout=options.timeout)
    results = pool.imap(tasks)
    try:
        with shard_set, progress("ingest", len(tasks)) as advance:
            for task, res in zip(tasks, results):
                if isinstance(res, Crashed):
                    res = {"status": "rejected", "reason": res.reason, "detail": res.detail, "sha256": None}
                if res["status"] != "skipped":
                    reevaluated.add(task["display"])
                if res["status"] == "skipped":
                    run["skipped"] += 1
                elif res["status"] == "kept" and res["sha256"] in seen:
                    first = seen[res["sha256"]]
                    res = {"status": "rejected", "reason": "duplicate", "detail": f"same bytes as {first}", "sha256": res["sha256"]}
                if res["status"] == "rejected":
                    extra = {"sha256": res["sha256"]} if res["sha256"] else {}
                    shard_set.reject(task["rel"], res["reason"], res["detail"], file=task["display"], **extra)
                    run["rejected"][res["reason"]] += 1
                elif res["status"] == "kept":
                    seen[res["sha256"]] = task["rel"]
                    _write_source(shard_set, ledger, task, res, options, run)
                advance(f"ingest: {run['kept_clips']} clips kept, {sum(run['rejected'].values())} rejected")
    finally:
        results.close()  # stops the workers
    run["rejected"] = dict(run["rejected"].most_common())
    run["seconds_of_video"] = round(run["seconds_of_video"], 3)
    run["wall_seconds"] = round(time.monotonic() - t0, 3)
    run["workers"] = options.workers
    index = shard_set.close(run, reevaluated, ingest_format=INGEST_FORMAT, num_sources=len({r["sha256"] for r in ledger.rows}))
    if not quiet:
        print_summary(index, run, set_dir)
    if part is not None:  # a part may hold no sample; the merge judges the whole set
        finish_part(part, out, TOOL, options.options_hash(), units, "files", index)
        return index
    if index["num_samples"] == 0:
        if not tasks:
            raise IngestFailed(f"nothing usable was written to {display_path(out)}: no video or image files in the inputs")
        reasons = ", ".join(f"{k} {v}" for k, v in run["rejected"].items())
        raise IngestFailed(
            f"nothing usable was written to {display_path(out)}: all {len(tasks)} inputs were rejected ({reasons}; see {REJECTS_NAME})"
        )
    return index


def _write_source(
    out: ShardSetWriter, ledger: SourceLedger, task: dict[str, Any], res: dict[str, Any], opts: IngestOptions, run: dict[str, Any]
) -> None:
    """Write a kept source's clips (those not already on disk) and report its dropped scenes."""
    info, sha, cap = res["info"], res["sha256"], task["caption"]
    caption = cap["caption"] or ""
    captions = {"original": caption, **cap["captions"]} if cap["caption"] is not None else dict(cap["captions"])
    extra = cap["extra"]
    if not opts.keep_pii:  # personal data never reaches a shard (--keep-pii: recorded in index.json)
        caption, captions, extra = _scrub_texts(caption, captions, extra, run["pii_scrubbed"])
    todo = [c for c in res["clips"] if clip_key(sha, c["start"], c["end"]) not in ledger.keys]  # not already on disk
    source = {"sha256": sha, "source": task["rel"], "file": task["display"], "total": len(todo)}
    ledger.begin(source)
    for c in todo:
        key = clip_key(sha, c["start"], c["end"])
        duration = c["num_frames"] / c["fps"] if c["fps"] > 0 else 0.0
        meta: dict[str, Any] = {
            "caption": caption,
            "captions": captions,
            "fps": c["fps"],
            "num_frames": c["num_frames"],
            "width": c["width"],
            "height": c["height"],
            "duration": round(duration, 6),
            "frame_range": [c["start"], c["end"]],
            "source": {"path": task["rel"], "sha256": sha, "num_frames": info["num_frames"], "fps": info["fps"],
                       "width": info["width"], "height": info["height"], "codec": info["codec"]},
        }
        if "license" in cap:
            meta["license"] = cap["license"]
        if task.get("boxes") is not None:  # the sidecar's tracks on this clip's frames
            boxes = parse_boxes(task["boxes"], task["boxes_file"]).at_frames(range(c["start"], c["end"]))
            if boxes.objects:
                meta["boxes"] = boxes.to_json()
        if extra:
            meta["extra"] = extra
        if "faces" in c:
            meta["faces"] = c["faces"]
            run["faces_blurred"] += c["faces"]["faces"]
            run["clips_with_faces"] += bool(c["faces"]["detections"])
        out.write(key, {c["ext"]: c["data"]}, meta, group=source)
        run["kept_clips"] += 1
        run["seconds_of_video"] += duration
    run["kept_sources"] += 1
    fps = info["fps"] or 1.0
    for s, e in res["dropped"]:
        detail = f"scene [{s}, {e}) is {(e - s) / fps:.2f} s"
        out.reject(task["rel"], "clip_too_short", detail, file=task["display"], sha256=sha, frame_range=[s, e])
        run["rejected"]["clip_too_short"] += 1


def _scrub_texts(caption: str, captions: dict[str, str], extra: dict[str, Any], counts: dict[str, int]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Captions and string extra fields with personal data replaced; ``counts`` += what was."""
    from sora_train.utils.pii import scrub_pii

    memo: dict[str, str] = {}

    def one(text: str) -> str:
        if text not in memo:  # the same text under two names is counted once
            memo[text], found = scrub_pii(text)
            for kind, n in found.items():
                counts[kind] = counts.get(kind, 0) + n
        return memo[text]

    return (one(caption), {k: one(v) for k, v in captions.items()},
            {k: one(v) if isinstance(v, str) else v for k, v in extra.items()})


def print_summary(index: dict[str, Any], run: dict[str, Any], out: Path) -> None:
    rows = [
        ("inputs", run["inputs"], ""),
        ("sources kept", run["kept_sources"], index["num_sources"]),
        ("clips kept", run["kept_clips"], index["num_samples"]),
        ("skipped (already ingested)", run["skipped"], ""),
        ("hours of video", f"{run['seconds_of_video'] / 3600:.4f}", f"{index['hours']:.4f}"),
    ]
    if run.get("clips_with_faces") or run.get("faces_blurred"):
        rows.append(("clips with faces blurred", run["clips_with_faces"], ""))
    if run.get("pii_scrubbed"):
        rows.append(("personal data removed from captions", ", ".join(f"{k} {v}" for k, v in sorted(run["pii_scrubbed"].items())), ""))
    print_run_summary(f"ingest -> {display_path(out)}", rows, run, index,
                      top=("shapes F x H x W (top 10)", ("shape", "clips"), index["shape_histogram"]))


# -- CLI -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = IngestOptions()
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="folders (walked) and files of video (mp4 mov mkv webm avi) and images (jpg png webp)")
    p.add_argument("--out", required=True, help="shard set directory; re-running into it adds only what is new")
    p.add_argument("--manifest", help=".csv or .jsonl with path, caption, optional license and extra fields (paths relative to it)")
    g = p.add_argument_group("clips")
    g.add_argument("--max-clip-seconds", type=float, default=d.max_clip_seconds,
                   help="longer videos are cut into equal clips at most this long")
    g.add_argument("--min-clip-seconds", type=float, default=d.min_clip_seconds, help="shorter videos/scenes are rejected")
    g.add_argument("--min-frames", type=int, default=d.min_frames, help="and so are videos/scenes with fewer frames")
    g.add_argument("--scene-split", action="store_true", help="cut at scene changes first (PySceneDetect ContentDetector)")
    g.add_argument("--scene-threshold", type=float, default=d.scene_threshold, help="ContentDetector threshold (lower: more cuts)")
    g.add_argument("--crf", type=int, default=d.crf, help="H.264 quality of re-encoded clips (lower: better, bigger)")
    g = p.add_argument_group("privacy")
    g.add_argument("--blur-faces", action="store_true", help="blur faces in kept clips (a bundled frontal-face detector; counts go into each sample's json)")
    g.add_argument("--keep-pii", action="store_true", help="keep e-mail addresses, phone numbers, URLs and similar in captions (default: replaced by [email], ...)")
    g = p.add_argument_group("what is rejected")
    g.add_argument("--min-side", type=int, default=d.min_side, help="reject frames with a side under this (px)")
    g.add_argument("--max-side", type=int, default=d.max_side, help="reject frames with a side over this (px)")
    g.add_argument("--max-aspect", type=float, default=d.max_aspect, help="reject frames with a longer:shorter side ratio over this")
    g.add_argument("--missing-caption", choices=MISSING_CAPTION_POLICIES, default=d.missing_caption,
                   help="reject uncaptioned files, or keep them with caption ''")
    g = p.add_argument_group("how")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes (0: in-process, no crash isolation)")
    g.add_argument("--stride", type=int, default=d.stride, help="probe: convert every k-th frame to pixels (the frame count stays exact)")
    g.add_argument("--timeout", type=float, default=d.timeout, help="seconds per file before it is rejected as timeout (0: no limit)")
    g.add_argument("--shard-size", type=int, default=d.shard_max_count, help="samples per shard")
    g.add_argument("--shard-max-mb", type=float, default=d.shard_max_bytes / 2**20, help="MiB per shard")
    add_part_argument(g)
    p.epilog = "reject reasons: " + ", ".join(REASONS)


def options_from_args(args: argparse.Namespace) -> IngestOptions:
    return IngestOptions(
        max_clip_seconds=args.max_clip_seconds, min_clip_seconds=args.min_clip_seconds, min_frames=args.min_frames,
        scene_split=args.scene_split, scene_threshold=args.scene_threshold, min_side=args.min_side, max_side=args.max_side,
        max_aspect=args.max_aspect, crf=args.crf, missing_caption=args.missing_caption, workers=args.workers,
        blur_faces=args.blur_faces, keep_pii=args.keep_pii,
        stride=args.stride, timeout=args.timeout, shard_max_count=args.shard_size, shard_max_bytes=int(args.shard_max_mb * 2**20),
    )


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    ingest(args.inputs, args.out, options, manifest=args.manifest, part=resolve_part(args.part))
    return 0
