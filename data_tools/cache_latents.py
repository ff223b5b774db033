"""`sora-data cache-latents`: a video shard set -> a latent shard set the DiT trains on without a VAE.

    sora-data cache-latents data/shapes/train --vae runs/vae/export --out data/latents/train \\
        --num-frames 17 --height 32 --width 32
    sora-data cache-latents data/shards/mine --vae runs/vae/export --text runs/dit/export \\
        --out data/latents/mine --buckets 33x256x256 33x192x336 1x256x256 --fps 16 --device cuda

Each clip is decoded exactly as the video loader decodes a validation clip (the same
`ShardVideoDataset._decode`: frame_indices -> resize_for_crop -> centred crop, no randomness)
at the bucket it fits, encoded with the VAE's posterior mode, NORMALISED with the VAE's stored
latent shift/scale (what `DiTModule.encode_video` consumes as-is) and written through
`ShardWriter` with the source sample's json (format: `sora_train/data/latents.py`). With
`--text`, every distinct caption of a sample (caption and each of captions) is embedded with
the export's text encoder and stored unpadded, so the loader's caption choice still applies.

index.json records `vae_hash` / `text_hash` (`sora_train.data.latents.module_fingerprint`);
the latent loader refuses the set when the run's VAE differs.

Re-running into the same --out resumes (`sora_train.data.shardset`): keys in ``done.jsonl``
are skipped, new samples go into shards numbered after them, and index.json is rebuilt over
all of them. --out must have been written with the same VAE, text encoder and written options
(`cache-latents.json` records them before the first shard).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_train.data.boxes import boxes_for_clip
from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.dataset import ShardVideoDataset, SkipSample, expand_shards
from sora_train.data.latents import (
    LATENT_FORMAT,
    TEXT_MEMBER,
    encode_latent,
    encode_text_member,
    text_fingerprint,
    vae_fingerprint,
)
from sora_train.data.shards import REJECTS_NAME, iter_tar_samples, read_index, shape_key
from sora_train.data.shardset import ShardSetSpec, ShardSetWriter
from sora_train.data.transforms import frame_indices
from sora_train.data.video_io import DECODERS, IMAGE_EXTS
from sora_train.data_tools.parts import Part, add_part_argument, finish_part, part_done, part_label, resolve_part, say_done
from sora_train.data_tools.probe import console, display_path, progress, table
from sora_train.utils import get_logger, stable_hash
from sora_train.utils.errors import SoraError

log = get_logger(__name__)

TOOL = "sora-data cache-latents"
RUN_FILE = "cache-latents.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = {"safetensors": "latent.safetensors", "npy": "latent.npy"}


class CacheFailed(SoraError):
    """The run wrote no usable latent (exit status 1, not the usage error's 2)."""

    exit_code = 1


@dataclass
class CacheOptions:
    """What decides the latents written (recorded, must match on resume), then how."""

    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (F, H, W) buckets
    target_fps: float | None = None
    dtype: str = "float16"  # normalised latents are ~unit variance: fp16 keeps ~3 significant digits
    format: str = "safetensors"
    # -- how (not recorded) --
    batch_size: int = 4
    chunk_frames: int | None = None
    tile: int | None = None
    device: str = "cpu"
    decoder: str = "decord"
    shard_max_count: int = 1000

    _RUNTIME = ("batch_size", "chunk_frames", "tile", "device", "decoder", "shard_max_count")

    def __post_init__(self) -> None:
        checks = [
            (bool(self.shapes), "give the clip shape: --num-frames N --height H --width W, or --buckets FxHxW ..."),
            (self.dtype in DTYPES, f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}"),
            (self.format in FORMATS, f"--format {self.format!r}: choose one of {sorted(FORMATS)}"),
            (not (self.format == "npy" and self.dtype == "bfloat16"), "--format npy cannot hold --dtype bfloat16"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1"),
            (self.target_fps is None or self.target_fps > 0, f"--fps {self.target_fps}: must be > 0"),
            (self.decoder in DECODERS, f"--decoder {self.decoder!r}: choose one of {list(DECODERS)}"),
            (self.shard_max_count >= 1, f"--shard-size {self.shard_max_count}: must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SoraError(msg)
        self.shapes = [tuple(int(v) for v in s) for s in self.shapes]  # type: ignore[misc]
        if len(set(self.shapes)) != len(self.shapes):
            raise SoraError(f"--buckets: duplicate shapes {[shape_key(*s) for s in self.shapes]}")

    def written(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in self._RUNTIME}
        d["shapes"] = [shape_key(*s) for s in self.shapes]
        return d


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SoraError(f"--buckets {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 17x256x256") from None
    return f, h, w


# -- loading the models ----------------------------------------------------------------------
def load_part(export_dir: str | os.PathLike, part: str, option: str) -> torch.nn.Module:
    """One part of an export (`sora_train.models.export.load_parts`: safetensors + model.json,
    only sora_train classes; the one thing this tool takes from `training`)."""
    from sora_train.models.export import load_parts

    try:
        parts, _ = load_parts(export_dir, [part])
    except SoraError as e:
        raise SoraError(f"{option} {export_dir}: {e}") from None
    if part not in parts:
        raise SoraError(f"{option} {export_dir}: the export holds no {part!r} part")
    return parts[part]


# -- the run ---------------------------------------------------------------------------------
@dataclass
class _Clip:
    key: str
    meta: dict[str, Any]
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float
    indices: list[int] | None


def _out_meta(clip: _Clip, bucket: Bucket) -> dict[str, Any]:
    """The source json, re-describing the clip that was encoded (shape, fps, frame range)."""
    src = clip.meta
    meta = dict(src)
    start = int((src.get("frame_range") or [0])[0])
    F = bucket.num_frames
    meta.update(
        num_frames=F, height=bucket.height, width=bucket.width, fps=clip.fps,
        duration=round(F / clip.fps, 6) if F > 1 and clip.fps > 0 else 0.0,
    )
    if clip.indices:
        meta["frame_range"] = [start + clip.indices[0], start + clip.indices[-1] + 1]
    meta["cached_from"] = {k: src.get(k) for k in ("num_frames", "height", "width", "fps", "frame_range")}
    meta["cached_from"]["frame_indices"] = clip.indices
    return meta


def _captions_of(meta: dict[str, Any]) -> list[str]:
    """Every distinct caption a loader may choose for this sample, the primary one first."""
    caps = [str(meta.get("caption") or "")]
    others = meta.get("captions") or {}
    if isinstance(others, dict):
        caps += [c for c in others.values() if isinstance(c, str)]
    return list(dict.fromkeys(caps))


class _Encoder:
    """Batches decoded clips per bucket, encodes them and writes the samples."""

    def __init__(self, vae, text, opts: CacheOptions, out: ShardSetWriter, stats: Counter):
        self.vae, self.text, self.opts, self.out, self.stats = vae, text, opts, out, stats
        self.member = FORMATS[opts.format]
        self.dtype = DTYPES[opts.dtype]
        self.groups: dict[str, list[_Clip]] = {}
        self.latent_shapes: Counter[str] = Counter()
        self.text_dim: int | None = None
        self.encode_seconds = 0.0

    def add(self, clip: _Clip, bucket: Bucket) -> None:
        group = self.groups.setdefault(bucket.name, [])
        group.append(clip)
        if len(group) >= self.opts.batch_size:
            self.flush(bucket)

    @torch.no_grad()
    def flush(self, bucket: Bucket) -> None:
        clips, self.groups[bucket.name] = self.groups.get(bucket.name, []), []
        if not clips:
            return
        t0 = time.perf_counter()
        device = torch.device(self.opts.device)
        frames = torch.from_numpy(np.stack([c.frames for c in clips]))  # (B, F, H, W, 3) uint8
        video = frames.to(device).permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)  # (B, 3, F, H, W) in [-1, 1]
        posterior = self.vae.encode(video, chunk_frames=self.opts.chunk_frames, tile=self.opts.tile)
        z = self.vae.normalize(posterior.mode()).to(self.dtype).cpu()  # (B, C, f, h, w), normalised
        finite = torch.isfinite(z.float()).flatten(1).all(dim=1).tolist()  # (B,)
        embeddings: dict[str, torch.Tensor] = {}
        if self.text is not None:
            unique = list(dict.fromkeys(c for clip in clips for c in _captions_of(clip.meta)))
            for text, emb in zip(unique, self.text.encode_for_cache(unique)):  # (L_i, D) each
                embeddings[text] = emb.cpu()
            self.text_dim = int(next(iter(embeddings.values())).shape[-1])
        self.encode_seconds += time.perf_counter() - t0
        for i, clip in enumerate(clips):
            if not finite[i]:
                self.out.reject(clip.key, "nonfinite_latent", f"the VAE produced NaN/inf for {bucket.name}")
                self.stats["rejected:nonfinite_latent"] += 1
                continue
            meta = _out_meta(clip, bucket)
            meta["latent"] = {"shape": list(z.shape[1:]), "dtype": self.opts.dtype, "member": self.member, "normalized": True}
            media = {self.member: encode_latent(z[i], self.member)}
            if self.text is not None:
                caps = _captions_of(clip.meta)
                meta["text_embeddings"] = {"captions": caps, "dim": self.text_dim, "member": TEXT_MEMBER}
                media[TEXT_MEMBER] = encode_text_member([embeddings[c] for c in caps])
            self.out.write(clip.key, media, meta)
            self.latent_shapes["x".join(map(str, z.shape[1:]))] += 1
            self.stats["written"] += 1

    def flush_all(self, table: BucketTable) -> None:
        for name in list(self.groups):
            self.flush(table.by_name(name))


def cache_latents(
    shards: str | list[str],
    out: str | os.PathLike,
    vae_dir: str | os.PathLike,
    options: CacheOptions,
    text_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    part: Part | None = None,
) -> dict[str, Any]:
    """Encode every clip of ``shards`` into a latent shard set at ``out``; returns its index.json.
    With ``part``, only that part of the input shards, into ``out/parts/part-K-of-N``
    (data_tools/parts.py; `sora-data merge` joins the parts)."""
    t0 = time.monotonic()
    out = Path(out)
    vae = load_part(vae_dir, "vae", "--vae")
    text = None if text_dir is None or str(text_dir).lower() == "none" else load_part(text_dir, "text", "--text")
    for F, H, W in options.shapes:
        try:
            vae.latent_shape(F, H, W)
        except SoraError as e:
            raise SoraError(f"--num-frames/--height/--width or --buckets {shape_key(F, H, W)}: {e}") from None
    if text is not None and getattr(text, "trainable", False):
        log.warning("--text %s: the text encoder is trainable; DiT runs use cached embeddings only with a frozen encoder", text_dir)
    vae_hash = vae_fingerprint(vae)
    text_hash = text_fingerprint(text) if text is not None else None
    vae.to(options.device).eval()
    if text is not None:
        text.to(options.device).eval()

    urls = expand_shards(str(shards) if isinstance(shards, os.PathLike) else shards)
    try:
        source_index = read_index(shards) if isinstance(shards, (str, os.PathLike)) and os.path.isdir(shards) else {}
    except SoraError:
        source_index = {}
    counts = {str(s["name"]): int(s.get("count") or 0) for s in source_index.get("shards") or []}
    # The source set's own options (the shapes world: its held-out pairs and world), so a DiT
    # trained on these latents still records what sora-eval shapes needs.
    source_options = source_index.get("options")
    identity = {"vae_hash": vae_hash, "text_hash": text_hash, "options": options.written()}
    sources = [str(s) for s in ([shards] if isinstance(shards, (str, os.PathLike)) else shards)]
    options_hash = stable_hash({"format": LATENT_FORMAT, **identity})
    label, set_dir, mine = f"--out {out}", out, urls
    if part is not None:  # the units are the input shards, in the order one run reads them
        units = [display_path(u) for u in urls]
        finished = part_done(part, out, TOOL, options_hash, units)
        if finished is not None:
            say_done(part, out, finished, quiet)
            return finished
        label, set_dir, mine = part_label(part, out), part.dir(out), part.select(urls)
    total = sum(counts.get(Path(u).name, 0) for u in mine) if counts else 0
    spec = ShardSetSpec(tool=TOOL, label=label, verb="cached", options=options.written(),
                        options_hash=options_hash, identity=identity, record_name=RUN_FILE,
                        sources=tuple(Path(s) for s in sources if os.path.isdir(s)))
    shard_set = ShardSetWriter(set_dir, spec, max_count=options.shard_max_count)

    table = BucketTable([{"num_frames": F, "height": H, "width": W, "batch_size": 1} for F, H, W in options.shapes])
    # The loader's own decode path, in validation mode (centred, deterministic).
    decoder = ShardVideoDataset(urls, table, target_fps=options.target_fps, train=False, decoder=options.decoder)
    stats: Counter[str] = Counter()
    looked_at: set[str] = set()  # keys not cached by an earlier run: their old reject rows are replaced
    enc = _Encoder(vae, text, options, shard_set, stats)
    with shard_set, progress("cache-latents", total or None) as advance:  # None: unknown (no index.json)
        for url in mine:
            for sample in iter_tar_samples(url):
                if sample["__key__"] in shard_set.done:
                    stats["skipped"] += 1
                else:
                    looked_at.add(sample["__key__"])
                    _one(sample, decoder, enc, shard_set, stats, options)
                advance(f"cache-latents: {stats['written']} written, {stats['skipped']} already cached")
        enc.flush_all(table)
    seconds = time.monotonic() - t0
    vae_cfg = vae.config() if hasattr(vae, "config") else {}
    extra = {
        "latent_format": LATENT_FORMAT,
        "vae_hash": vae_hash,
        "text_hash": text_hash,
        "vae": {"export": str(vae_dir), "target": f"{type(vae).__module__}.{type(vae).__qualname__}", "config": vae_cfg},
        "text": None if text is None else {"export": str(text_dir), "target": f"{type(text).__module__}.{type(text).__qualname__}",
                                           "dim": int(getattr(text, "dim", enc.text_dim or 0)), "trainable": bool(getattr(text, "trainable", False))},
        "latent": {"normalized": True, "dtype": options.dtype, "member": enc.member, "channels": int(getattr(vae, "latent_channels", 0))},
        "source": sources,
        "source_options": source_options,
    }
    run = {k: v for k, v in stats.items()}
    run.update(seconds=round(seconds, 3), encode_seconds=round(enc.encode_seconds, 3), latent_shapes=dict(enc.latent_shapes))
    index = shard_set.close(run, looked_at, **extra)
    if not quiet:
        print_summary(index, run, set_dir)
    if part is not None:  # a part may hold no sample; the merge judges the whole set
        finish_part(part, out, TOOL, options_hash, units, "shards", index)
        return index
    if index["num_samples"] == 0:
        raise CacheFailed(f"nothing was written to {out}: {sum(v for k, v in stats.items() if k.startswith('rejected:'))} clips rejected (see {REJECTS_NAME})")
    return index


def _one(sample: dict[str, Any], decoder: ShardVideoDataset, enc: _Encoder, out: ShardSetWriter, stats: Counter, opts: CacheOptions) -> None:
    """Decode one source sample into its bucket's pending batch (or reject it)."""
    key = sample["__key__"]

    def reject(reason: str, detail: str) -> None:
        out.reject(key, reason, detail)
        stats[f"rejected:{reason}"] += 1

    try:
        item = decoder.pending(sample)
    except SkipSample as e:
        return reject(e.reason, e.detail)
    meta, bucket = item.meta, item.bucket
    try:
        geometry: dict[str, Any] = {}
        frames, out_fps = decoder.decode_clip(item, bucket, np.random.default_rng(0), geometry)
        if meta.get("boxes") is not None:  # boxes follow the frames and crop that were encoded
            boxes = boxes_for_clip(meta, key, geometry, bucket.height, bucket.width)
            meta = {**meta, "boxes": boxes.to_json() if boxes is not None and boxes.objects else None}
    except Exception as e:  # a corrupt clip costs that clip
        return reject("decode_error", str(e)[:200])
    f, fps = int(meta["num_frames"]), float(meta.get("fps") or 0.0)
    if item.media_ext in IMAGE_EXTS:
        indices = None
    elif bucket.is_image:
        indices = [f // 2]
    else:
        indices = frame_indices(f, fps, bucket.num_frames, opts.target_fps, None, random_start=False)
    enc.add(_Clip(key, meta, frames, out_fps, indices), bucket)


def print_summary(index: dict[str, Any], run: dict[str, Any], out: Path) -> None:
    rows: list[tuple[Any, ...]] = [("written this run", run.get("written", 0)), ("skipped (already cached)", run.get("skipped", 0))]
    rows += [(f"rejected: {k.split(':', 1)[1]}", v) for k, v in sorted(run.items()) if k.startswith("rejected:")]
    rows.append(("samples in the set", index["num_samples"]))
    rows += [(f"latent C x f x h x w {shape}", n) for shape, n in run.get("latent_shapes", {}).items()]
    rows += [("vae_hash", index["vae_hash"][:16]), ("text_hash", (index["text_hash"] or "-")[:16]),
             ("seconds (encode)", f"{run['seconds']:.1f} ({run['encode_seconds']:.1f})")]
    console().print(table(f"cache-latents -> {out}", rows, ("", "value")))


# -- CLI -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CacheOptions(shapes=[(1, 8, 8)])
    p.add_argument("shards", metavar="SHARDS", help="the video shard set (a directory with index.json, a glob or a brace pattern)")
    p.add_argument("--vae", required=True, help="an export directory holding a 'vae' part (a VAE run's export/ or a DiT run's)")
    p.add_argument("--text", default=None, help="an export holding a frozen 'text' part, to cache caption embeddings too; or none")
    p.add_argument("--out", required=True, help="the latent shard set directory; re-running into it adds only what is missing")
    g = p.add_argument_group("clip shape (the loader's validation decode: centred, deterministic)")
    g.add_argument("--num-frames", type=int, help="frames per clip (1 + k * the VAE's temporal factor)")
    g.add_argument("--height", type=int, help="pixels (a multiple of the VAE's spatial factor)")
    g.add_argument("--width", type=int, help="pixels (a multiple of the VAE's spatial factor)")
    g.add_argument("--buckets", nargs="+", metavar="FxHxW", help="several shapes instead: each clip goes to the nearest aspect ratio it fills")
    g.add_argument("--fps", type=float, default=None, help="resample to this frame rate first (default: native)")
    g = p.add_argument_group("what is written")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="latent storage dtype")
    g.add_argument("--format", choices=sorted(FORMATS), default=d.format, help="latent member: latent.safetensors or latent.npy")
    g = p.add_argument_group("how")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="clips encoded at once")
    g.add_argument("--chunk-frames", type=int, default=None, help="encode time in chunks of this many frames (flat memory for long clips)")
    g.add_argument("--tile", type=int, default=None, help="encode spatial tiles of this many pixels (approximate at tile borders)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    g.add_argument("--decoder", choices=DECODERS, default=d.decoder)
    g.add_argument("--shard-size", type=int, default=d.shard_max_count, help="samples per shard")
    add_part_argument(g)


def options_from_args(args: argparse.Namespace) -> CacheOptions:
    fixed = (args.num_frames, args.height, args.width)
    if args.buckets and any(v is not None for v in fixed):
        raise SoraError("give either --num-frames/--height/--width or --buckets, not both")
    if args.buckets:
        shapes = [parse_shape(s) for spec in args.buckets for s in spec.split(",") if s.strip()]
    elif all(v is not None for v in fixed):
        shapes = [fixed]
    elif any(v is not None for v in fixed):
        raise SoraError("--num-frames, --height and --width go together: give all three")
    else:
        shapes = []
    return CacheOptions(
        shapes=shapes, target_fps=args.fps, dtype=args.dtype, format=args.format, batch_size=args.batch_size,
        chunk_frames=args.chunk_frames, tile=args.tile, device=args.device, decoder=args.decoder, shard_max_count=args.shard_size,
    )


def run(args: argparse.Namespace) -> int:
    if not os.path.exists(args.shards) and not any(c in args.shards for c in "*?[{") and "://" not in args.shards:
        raise SoraError(f"SHARDS {args.shards} does not exist")
    options, part = options_from_args(args), resolve_part(args.part)
    cache_latents(args.shards, args.out, args.vae, options, text_dir=args.text, part=part)
    return 0
