"""Reconstruction quality of a VAE export on a shard set: what `sora-eval vae` runs.

    sora-eval vae --vae runs/vae/export --shards data/shapes/val --out eval/vae

Clips are decoded the way the loader decodes validation data (centred, deterministic) at one
shape, encoded to the posterior mode, decoded, clamped to [-1, 1] and compared with the input:
PSNR (dB, peak-to-peak 2) and SSIM (Gaussian 11x11, per frame) per sample and their means.
Writes ``vae_eval.json`` (summary + one row per sample), ``reconstructions.mp4`` (the first
clips, each row input | reconstruction) and ``reconstructions.png`` (a strip of its frames).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_train.data.buckets import BucketTable
from sora_train.data.dataset import ShardVideoDataset, expand_shards
from sora_train.data.transforms import video_to_float
from sora_train.data.shards import read_index
from sora_train.models.vae.losses import psnr, ssim
from sora_train.models.export import load_parts
from sora_train.training.pipeline import to_uint8, write_strip
from sora_train.provenance import mark_image_file, write_generated_video
from sora_train.utils import atomic_write_json
from sora_train.utils.errors import SoraError

RESULT_NAME = "vae_eval.json"
VIDEO_NAME = "reconstructions.mp4"
STRIP_NAME = "reconstructions.png"


def default_shape(shards: str, temporal_factor: int, spatial_factor: int) -> tuple[int, int, int]:
    """The most common clip shape of a shard set, cut down to what the VAE accepts."""
    try:
        hist = read_index(shards).get("shape_histogram") or {}
    except SoraError:
        hist = {}
    if not hist:
        raise SoraError(f"--shards {shards}: no shape histogram in its index.json; give --num-frames, --height and --width")
    F, H, W = (int(v) for v in Counter(hist).most_common(1)[0][0].split("x"))
    F = 1 + (F - 1) // temporal_factor * temporal_factor  # 1 + k * s_t frames
    H, W = H // spatial_factor * spatial_factor, W // spatial_factor * spatial_factor
    if H < spatial_factor or W < spatial_factor:
        raise SoraError(f"--shards {shards}: its clips ({H}x{W}) are smaller than the VAE's spatial factor {spatial_factor}")
    return F, H, W


def _side_by_side(inputs: list[np.ndarray], recons: list[np.ndarray]) -> np.ndarray:
    """Clips (F, H, W, 3) -> one video (F, n*H + gaps, 2*W + gap, 3): each row input | reconstruction."""
    rows = []
    for x, y in zip(inputs, recons):
        gap = np.full((x.shape[0], x.shape[1], 2, 3), 255, np.uint8)  # a white 2-px divider
        rows.append(np.concatenate([x, gap, y], axis=2))  # (F, H, 2W + 2, 3)
        rows.append(np.full((x.shape[0], 2, rows[-1].shape[2], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=1)  # (F, n*H + 2(n-1), 2W + 2, 3)


@torch.no_grad()
def evaluate_vae(
    vae_dir: str | Path,
    shards: str,
    out: str | Path,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    max_samples: int = 64,
    batch_size: int = 4,
    num_videos: int = 4,
    chunk_frames: int | None = None,
    tile: int | None = None,
    device: str = "cpu",
    decoder: str = "decord",
) -> dict[str, Any]:
    """Measure reconstruction of up to ``max_samples`` clips; writes and returns the JSON report."""
    from sora_train.data.latents import vae_fingerprint

    if max_samples < 1 or batch_size < 1 or num_videos < 0:
        raise SoraError(f"--max-samples ({max_samples}) and --batch-size ({batch_size}) must be >= 1, --num-videos ({num_videos}) >= 0")
    parts, meta = load_parts(vae_dir, ["vae"])
    if "vae" not in parts:
        raise SoraError(f"--vae {vae_dir}: the export holds no 'vae' part")
    vae = parts["vae"]
    vae_hash = vae_fingerprint(vae)
    given = (num_frames, height, width)
    if all(v is None for v in given):
        F, H, W = default_shape(shards, vae.temporal_factor, vae.spatial_factor)
    elif any(v is None for v in given):
        raise SoraError("--num-frames, --height and --width go together: give all three or none")
    else:
        F, H, W = int(num_frames), int(height), int(width)  # type: ignore[arg-type]
    try:
        f, h, w = vae.latent_shape(F, H, W)
    except SoraError as e:
        raise SoraError(f"--num-frames/--height/--width {F}x{H}x{W}: {e}") from None
    vae.to(device).eval()
    table = BucketTable([{"num_frames": F, "height": H, "width": W, "batch_size": batch_size}])
    # max_skip_rate=1: clips that fit no shape are counted and reported, not fatal here.
    ds = ShardVideoDataset(expand_shards(shards), table, train=False, decoder=decoder, max_skip_rate=1.0)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    inputs: list[np.ndarray] = []
    recons: list[np.ndarray] = []
    fps = 8.0
    skipped = 0
    for batch in ds:
        video = video_to_float(batch["video"][: max_samples - len(rows)].to(device))  # (B, 3, F, H, W) in [-1, 1]
        z = vae.encode(video, chunk_frames=chunk_frames, tile=tile).mode()  # (B, C, f, h, w)
        recon = vae.decode(z, chunk_frames=None if chunk_frames is None else max(1, chunk_frames // vae.temporal_factor), tile=tile)
        recon = recon.clamp(-1.0, 1.0)  # (B, 3, F, H, W)
        p = psnr(recon, video, reduction="none").cpu()  # (B,)
        s = ssim(recon, video, reduction="none").mean(dim=1).cpu()  # (B,)
        for i in range(video.shape[0]):
            rows.append({"key": batch["key"][i], "caption": batch["caption"][i], "psnr": _finite(p[i]), "ssim": round(float(s[i]), 5)})
        if len(inputs) < num_videos:
            k = num_videos - len(inputs)
            inputs += list(to_uint8(video[:k]))  # (F, H, W, 3) each
            recons += list(to_uint8(recon[:k]))
            fps = float(batch["fps"][0]) or fps
        skipped = int(batch["skipped"])
        if len(rows) >= max_samples:
            break
    if not rows:
        raise SoraError(f"--shards {shards}: no clip could be read at {F}x{H}x{W} (too short, or no video samples)")
    seconds = time.perf_counter() - t0

    video_path = strip_path = None
    if inputs:
        grid = _side_by_side(inputs, recons)  # (F, rows, cols, 3)
        # The right half is model output: written marked like every generated video.
        claims = {"prompt": "", "content": "VAE input | reconstruction", "model_sha256": vae_hash}
        video_path = write_generated_video(out / VIDEO_NAME, grid, fps, claims, crf=12).path
        strip_path = mark_image_file(write_strip(grid, out / STRIP_NAME, title="input | reconstruction"), claims).path
    psnrs = [r["psnr"] for r in rows if r["psnr"] is not None]
    ssims = [r["ssim"] for r in rows]
    result = {
        "vae": str(vae_dir),
        "vae_hash": vae_hash,
        "shards": str(shards),
        "shape": {"num_frames": F, "height": H, "width": W},
        "latent_shape": [int(vae.latent_channels), f, h, w],
        "compression": round(3 * F * H * W / (vae.latent_channels * f * h * w), 3),
        "num_samples": len(rows),
        "skipped": skipped,
        "psnr_mean": round(float(np.mean(psnrs)), 4) if psnrs else None,
        "psnr_std": round(float(np.std(psnrs)), 4) if psnrs else None,
        "ssim_mean": round(float(np.mean(ssims)), 5),
        "ssim_std": round(float(np.std(ssims)), 5),
        "seconds": round(seconds, 3),
        "frames_per_second": round(len(rows) * F / seconds, 2) if seconds > 0 else None,
        "video": video_path.name if video_path else None,
        "strip": strip_path.name if strip_path else None,
        "options": {"chunk_frames": chunk_frames, "tile": tile, "device": device, "max_samples": max_samples},
        "samples": rows,
    }
    atomic_write_json(out / RESULT_NAME, result)
    return result


def _finite(x: torch.Tensor) -> float | None:
    v = float(x)
    return round(v, 4) if math.isfinite(v) else None  # inf: reproduced exactly (JSON has no inf)


def print_report(result: dict[str, Any], out: str | Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sora-eval vae: {result['vae']} on {result['shards']}", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    s = result["shape"]
    t.add_row("clip F x H x W", f"{s['num_frames']}x{s['height']}x{s['width']}")
    t.add_row("latent C x f x h x w", "x".join(map(str, result["latent_shape"])) + f"  ({result['compression']:g}x)")
    t.add_row("samples (skipped)", f"{result['num_samples']} ({result['skipped']})")
    if result["psnr_mean"] is not None:
        t.add_row("PSNR dB (mean ± std)", f"{result['psnr_mean']:.2f} ± {result['psnr_std']:.2f}")
    t.add_row("SSIM (mean ± std)", f"{result['ssim_mean']:.4f} ± {result['ssim_std']:.4f}")
    worst = min(result["samples"], key=lambda r: r["psnr"] if r["psnr"] is not None else math.inf)
    t.add_row("worst sample (PSNR)", f"{worst['key']} ({worst['psnr']})")
    t.add_row("encode+decode frames/s", str(result["frames_per_second"]))
    t.add_row("vae_hash", result["vae_hash"][:16])
    Console(soft_wrap=True).print(t)
    print(f"wrote {Path(out) / RESULT_NAME}" + (f", {Path(out) / result['video']}, {Path(out) / result['strip']}" if result["video"] else ""))


__all__ = ["evaluate_vae", "print_report", "default_shape"]
