"""`sora-data preview`: a PNG contact sheet of what the loader will feed, bucket by bucket.

    sora-data preview data/shards/mine --out sheet.png --data shards       # conf/data/shards.yaml
    sora-data preview data/shapes/train --out sheet.png --buckets 17x32x32:8,1x32x32:16 --image-ratio 0.25
    sora-data preview data/shards/mine --out sheet.png --data my_data.yaml --target-fps 8

The sheet is drawn from real batches of :class:`VideoDataModule` with the run's buckets,
image ratio and frame rate - random temporal starts and crops included, exactly as training
sees them - so it shows what a config does to the footage: a crop that cuts the subject
off, a frame rate that makes motion jump, captions that do not match the clip, a bucket
that never fills. Each bucket gets a header (its name, batch size, how many batches it
got) and a grid of panels, one per sample: a few evenly spaced frames side by side, the
caption under them and the sample key in grey.

Buckets come from ``--data`` (a ``conf/data`` option name, or a YAML file of the same form),
from ``--buckets`` (which replaces the config's), or, when neither is given, one per
shape of the shard set's index at its native size.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_train.utils.errors import SoraError

# What of a conf/data option a preview uses (the rest - shard paths, workers, prepare hooks,
# Hydra interpolations such as ${seed} - belongs to a training run).
_DATA_KEYS = ("buckets", "tokens_per_batch", "image_ratio", "bucket_weights", "target_fps", "caption_probs", "decoder")
_DATA_TARGET = "sora_train.data.datamodule.VideoDataModule"


@dataclass(frozen=True)
class SheetStyle:
    """Sizes of the sheet, in pixels. Every panel of a bucket has the same size, so the
    sheet's size follows from the number of panels (the tests rely on it)."""

    frame_height: int = 96  # each frame is scaled to this height (nearest-neighbour when enlarged)
    frame_gap: int = 2  # between the frames of one strip
    pad: int = 8  # around and between panels
    header_height: int = 24  # the bucket's title line
    header_font: int = 14
    caption_font: int = 11
    line_height: int = 13
    caption_lines: int = 3  # caption lines under a strip (longer captions end in "...")
    columns: int = 4  # panels per row
    background: tuple[int, int, int] = (255, 255, 255)

    @property
    def caption_height(self) -> int:
        return (self.caption_lines + 1) * self.line_height + 4  # + the key line and a gap

    def frame_width(self, height: int, width: int) -> int:
        return max(1, round(width * self.frame_height / height))

    def panel_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        """(width, height) of one sample's panel: a strip of ``frames`` frames and its caption."""
        strip = frames * self.frame_width(height, width) + (frames - 1) * self.frame_gap
        return strip, self.frame_height + self.caption_height

    def section_size(self, height: int, width: int, frames: int, panels: int) -> tuple[int, int]:
        """(width, height) of one bucket's section: header + a grid of ``panels`` panels."""
        pw, ph = self.panel_size(height, width, frames)
        cols = max(1, min(self.columns, panels))
        rows = math.ceil(panels / self.columns)
        return self.pad + cols * (pw + self.pad), self.header_height + rows * (ph + self.pad)


# -- what to load ------------------------------------------------------------------------------
def parse_buckets(spec: str) -> list[dict[str, int]]:
    """``17x32x32:8,1x32x32`` -> bucket dicts (FxHxW, optional :batch_size)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        shape, _, bs = part.partition(":")
        try:
            f, h, w = (int(v) for v in shape.lower().split("x"))
            bucket = {"num_frames": f, "height": h, "width": w}
            if bs:
                bucket["batch_size"] = int(bs)
        except ValueError:
            raise SoraError(f"--buckets: {part!r} is not FRAMESxHEIGHTxWIDTH[:BATCH] (e.g. 17x32x32:8)") from None
        out.append(bucket)
    if not out:
        raise SoraError("--buckets is empty; give e.g. 17x32x32:8,1x32x32:16")
    return out


def load_data_option(name: str) -> dict[str, Any]:
    """The loader settings of a ``conf/data`` option (by name) or of a YAML file of that form."""
    import importlib.resources

    import yaml

    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SoraError(f"--data {name}: no such file")
        text = path.read_text(encoding="utf-8")
    else:
        folder = importlib.resources.files("sora_train.conf").joinpath("data")
        options = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        if name not in options:
            raise SoraError(f"--data {name!r} is not a conf/data option; choose one of {options} or give a .yaml file")
        text = folder.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(text) or {}
    if cfg.get("_target_", _DATA_TARGET) != _DATA_TARGET:
        raise SoraError(f"--data {name}: previews read video shards ({_DATA_TARGET}), not {cfg['_target_']}")
    return {k: cfg[k] for k in _DATA_KEYS if cfg.get(k) is not None and not _interpolation(cfg[k])}


def _interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def native_buckets(shards: str, batch_size: int = 4, limit: int = 4) -> list[dict[str, int]]:
    """One bucket per shape of the shard set's index (the ``limit`` most common)."""
    from sora_train.data.shards import read_index

    try:
        hist = read_index(shards).get("shape_histogram") or {}
    except SoraError as e:
        raise SoraError(f"{e}; without an index, give the buckets: --buckets or --data") from None
    shapes = sorted(hist, key=lambda s: -hist[s])[:limit]
    if not shapes:
        raise SoraError(f"{shards}/index.json has no shape histogram; give --buckets or --data")
    return [dict(zip(("num_frames", "height", "width"), map(int, s.split("x"))), batch_size=batch_size) for s in shapes]


# -- collecting samples ------------------------------------------------------------------------
def collect(datamodule, per_bucket: int, max_batches: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Take batches until every bucket has ``per_bucket`` samples (or ``max_batches`` were
    taken) -> bucket name -> samples {video (F, H, W, 3) uint8, caption, key, fps}, and
    bucket name -> batches seen."""
    datamodule.setup("fit")
    names = [b.name for b in datamodule.train_set.buckets.buckets]
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    batches = {n: 0 for n in names}
    it = iter(datamodule.train_dataloader())
    try:
        for _ in range(max_batches):
            batch = next(it)
            name = batch["bucket"]
            batches[name] += 1
            video = batch["video"]  # (B, F, H, W, 3): the loader's uint8, exactly what training gets
            if video.dtype != torch.uint8:  # a custom datamodule that already made it float (B, 3, F, H, W)
                video = ((video + 1.0) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 4, 1)
            video = video.numpy()  # (B, F, H, W, 3)
            for i in range(video.shape[0]):
                if len(samples[name]) < per_bucket:
                    samples[name].append(
                        {"video": video[i], "caption": batch["caption"][i], "key": batch["key"][i], "fps": float(batch["fps"][i])}
                    )
            if all(len(s) >= per_bucket for s in samples.values()):
                break
    finally:
        del it  # stops the DataLoader's workers
    return samples, batches


# -- drawing -----------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last kept line ends in "..." when cut."""
    avg = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    out = textwrap.wrap(" ".join(text.split()), width=max(4, int(width / avg))) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(0, len(out[-1]) - 3)].rstrip() + "..."
    while out and font.getlength(out[-1]) > width and len(out[-1]) > 4:  # proportional fonts
        out[-1] = out[-1][:-4] + "..."
    return out


def strip_frames(video: np.ndarray, k: int) -> list[int]:
    """Indices of ``k`` evenly spaced frames of a (F, ...) clip, first and last included."""
    return sorted(set(np.linspace(0, video.shape[0] - 1, num=min(k, video.shape[0])).round().astype(int).tolist()))


def render_sheet(
    samples: dict[str, list[dict[str, Any]]],
    batches: dict[str, int],
    buckets: dict[str, tuple[int, int, int, int]],
    frames_per_sample: int,
    style: SheetStyle = SheetStyle(),
):
    """The contact sheet as a PIL image. ``buckets``: name -> (F, H, W, batch_size)."""
    from PIL import Image, ImageDraw

    header_font, caption_font = _font(style.header_font), _font(style.caption_font)
    sections = []
    for name, (f, h, w, bs) in buckets.items():
        k = 1 if f == 1 else min(frames_per_sample, f)
        sections.append((name, f, h, w, bs, k, style.section_size(h, w, k, len(samples[name]))))
    width = max(s[-1][0] for s in sections)
    height = style.pad + sum(s[-1][1] for s in sections)
    sheet = Image.new("RGB", (width, height), style.background)
    draw = ImageDraw.Draw(sheet)

    y = style.pad
    for name, f, h, w, bs, k, (_, sec_h) in sections:
        got = samples[name]
        fps = {round(s["fps"], 2) for s in got if s["fps"] > 0}
        note = "image" if f == 1 else f"{f} frames" + (f" @ {'/'.join(f'{v:g}' for v in sorted(fps))} fps" if fps else "")
        title = f"{name}  -  {note}, batch {bs}, {batches[name]} batch(es) taken"
        if not got:
            title += ": none drawn"
        draw.text((style.pad, y + (style.header_height - style.header_font) // 2 - 2), title, fill=(0, 0, 0), font=header_font)
        pw, ph = style.panel_size(h, w, k)
        fw = style.frame_width(h, w)
        for i, sample in enumerate(got):
            row, col = divmod(i, style.columns)
            x0 = style.pad + col * (pw + style.pad)
            y0 = y + style.header_height + row * (ph + style.pad)
            for j, t in enumerate(strip_frames(sample["video"], k)):
                frame = Image.fromarray(sample["video"][t])
                resample = Image.NEAREST if style.frame_height >= h else Image.BILINEAR
                sheet.paste(frame.resize((fw, style.frame_height), resample), (x0 + j * (fw + style.frame_gap), y0))
            ty = y0 + style.frame_height + 2
            for line in _wrap(sample["caption"], caption_font, pw, style.caption_lines):
                draw.text((x0, ty), line, fill=(20, 20, 20), font=caption_font)
                ty += style.line_height
            key = _wrap(sample["key"], caption_font, pw, 1)[0]
            draw.text((x0, y0 + style.frame_height + 2 + style.caption_lines * style.line_height), key, fill=(140, 140, 140), font=caption_font)
        y += sec_h
    return sheet


# -- the subcommand ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", help="a shard set directory (with index.json), glob or brace pattern")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--data", help="a conf/data option (e.g. shards, shapes) or a YAML file of that form: buckets, image_ratio, target_fps, ...")
    p.add_argument("--buckets", help="FxHxW[:BATCH],... replacing the config's buckets, e.g. 17x32x32:8,1x32x32:16")
    p.add_argument("--image-ratio", type=float, help="fraction of image (1-frame) batches")
    p.add_argument("--target-fps", type=float, help="resample videos to this rate (0: native)")
    p.add_argument("--tokens-per-batch", type=int, help="pixel budget F*H*W per batch, for buckets without :BATCH")
    p.add_argument("--samples", type=int, default=4, help="panels per bucket")
    p.add_argument("--frames", type=int, default=4, help="evenly spaced frames per panel")
    p.add_argument("--columns", type=int, default=4, help="panels per row")
    p.add_argument("--frame-height", type=int, default=96, help="displayed height of each frame, pixels")
    p.add_argument("--max-batches", type=int, default=64, help="stop after this many batches even if a bucket is short")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in this process)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from sora_train.data.datamodule import VideoDataModule

    for flag in ("samples", "frames", "columns", "frame_height", "max_batches"):
        if getattr(args, flag) < 1:
            raise SoraError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    opts: dict[str, Any] = load_data_option(args.data) if args.data else {}
    if args.buckets:
        opts["buckets"] = parse_buckets(args.buckets)
    elif "buckets" not in opts:
        opts["buckets"] = native_buckets(args.shards)
        print(f"no --buckets/--data: one bucket per shape of the index: {', '.join(_names(opts['buckets']))}")
    for key in ("image_ratio", "tokens_per_batch"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.target_fps is not None:
        opts["target_fps"] = args.target_fps or None
    dm = VideoDataModule(train_shards=args.shards, num_workers=args.workers, seed=args.seed, **opts)
    samples, batches = collect(dm, args.samples, args.max_batches)
    table = dm.train_set.buckets
    buckets = {b.name: (b.num_frames, b.height, b.width, b.batch_size) for b in table.buckets}
    style = SheetStyle(frame_height=args.frame_height, columns=args.columns)
    sheet = render_sheet(samples, batches, buckets, args.frames, style)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, format="PNG")
    for name in buckets:
        print(f"{name}: {len(samples[name])} sample(s) from {batches[name]} batch(es)")
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


def _names(buckets: list[dict[str, int]]) -> list[str]:
    return [f"{b['num_frames']}x{b['height']}x{b['width']}" for b in buckets]
