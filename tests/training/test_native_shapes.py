"""Native shape, measured (issue 18): shapes sets in several clip shapes, image batches fed by the
video of their own aspect, sora-eval shapes --shapes and its targets, and the fast version of
launch/native_shapes.sh through the real entry points (bucketed DiT training on latents cached
at each clip's shape, then generation and scoring at seen and unseen shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from sora_train.data.buckets import BucketTable
from sora_train.data.dataset import PendingSample, ShardVideoDataset
from sora_train.data.latents import LatentShardDataset
from sora_train.data.shapes import ShapesSetSpec, ShapesWorld, generate_shards
from sora_train.data.video_io import decode_video
from sora_train.training.shapes_eval import ShapesEvalSettings, check_targets
from sora_train.training.shapes_native import native_targets, parse_shape, world_at
from sora_train.utils.errors import SoraError

from cli_runs import BIN, ROOT, base_env

SHAPES = [[17, 32, 32], [9, 32, 48], [17, 48, 32]]


# -- the data option ------------------------------------------------------------------------------
def test_clip_shapes_draw_each_clip_at_its_own_shape(tmp_path):
    generate_shards(tmp_path, num_train=6, num_val=3, seed=0, clip_shapes=SHAPES)
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert index["options"]["clip_shapes"] == SHAPES
    assert index["shape_histogram"] == {"17x32x32": 2, "9x32x48": 2, "17x48x32": 2}
    with tarfile.open(next((tmp_path / "train").glob("shard-*.tar"))) as t:
        names = sorted(m.name for m in t.getmembers())
        for i, stem in enumerate(sorted({n.rsplit(".", 1)[0] for n in names})):
            meta = json.loads(t.extractfile(f"{stem}.json").read())
            f, h, w = SHAPES[i % len(SHAPES)]
            assert (meta["num_frames"], meta["height"], meta["width"]) == (f, h, w)
            frames = decode_video(t.extractfile(f"{stem}.mp4").read(), list(range(f)), backend="pyav")
            assert frames.shape == (f, h, w, 3)  # the pixels, not only the json
            assert meta["boxes"]["num_frames"] == f  # boxes of the clip's own frames
    # without the option: one shape, and the options (and so every set written before it) unchanged
    assert "clip_shapes" not in ShapesSetSpec(4, 2).options()


@pytest.mark.parametrize("shapes, needle", [
    ([[17, 32]], "[num_frames, height, width]"),
    ([], "non-empty"),
    ([["a", 32, 32]], "must be a list"),
    ([[17, 8, 32]], "[17, 8, 32]"),    # too small a frame: the world's own check, naming the entry
    ([[1, 32, 32]], "[1, 32, 32]"),    # a 1-frame clip cannot move; images come from the clips' frame 0
])
def test_bad_clip_shapes_are_one_line_errors(shapes, needle):
    with pytest.raises(SoraError) as e:
        ShapesSetSpec(4, 2, clip_shapes=shapes)
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- image batches: each from the videos of its own aspect ------------------------------------------
def _pending(h: int, w: int, bucket) -> PendingSample:
    return PendingSample(f"k{h}x{w}", {"num_frames": 17, "height": h, "width": w}, "mp4", b"", bucket)


def test_a_video_feeds_the_image_bucket_of_its_aspect():
    table = BucketTable([{"num_frames": 17, "height": 32, "width": 32, "batch_size": 2},
                         {"num_frames": 17, "height": 32, "width": 48, "batch_size": 2},
                         {"num_frames": 1, "height": 32, "width": 32, "batch_size": 4},
                         {"num_frames": 1, "height": 32, "width": 48, "batch_size": 4}], image_ratio=0.5)
    video = ShardVideoDataset.__new__(ShardVideoDataset)
    video.buckets = table
    wide, square = table.buckets[1], table.buckets[0]
    assert video.image_bucket_for(_pending(64, 96, wide)).name == "1x32x48"  # decoded video is resized: aspect decides
    assert video.image_bucket_for(_pending(40, 40, square)).name == "1x32x32"
    latent = LatentShardDataset.__new__(LatentShardDataset)
    latent.buckets = table
    assert latent.image_bucket_for(_pending(32, 48, wide)).name == "1x32x48"
    assert latent.image_bucket_for(_pending(64, 96, wide)) is None  # a cached latent is never resized


def test_buckets_are_drawn_by_the_batches_their_samples_fill():
    table = BucketTable([{"num_frames": 9, "height": 32, "width": 32, "batch_size": 28},
                         {"num_frames": 17, "height": 32, "width": 48, "batch_size": 7},
                         {"num_frames": 25, "height": 32, "width": 32, "batch_size": 14},
                         {"num_frames": 1, "height": 32, "width": 32, "batch_size": 64},
                         {"num_frames": 1, "height": 32, "width": 48, "batch_size": 32},
                         {"num_frames": 1, "height": 48, "width": 32, "batch_size": 64}], image_ratio=0.2)
    table.fit_weights_from_histogram({"9x32x32": 280, "17x32x48": 70, "33x32x32": 140}, target_fps=None)
    w = table.weights
    # 10 batches each: equal draws, so each shape's clips are used at the rate they arrive
    assert w["9x32x32"] == pytest.approx(1 / 3) and w["17x32x48"] == pytest.approx(1 / 3) and w["25x32x32"] == pytest.approx(1 / 3)
    # square clips (420) fill 6.6 image batches of 64, wide ones (70) 2.2 of 32; no tall clip feeds 1x48x32
    assert w["1x32x32"] == pytest.approx((420 / 64) / (420 / 64 + 70 / 32)) and w["1x48x32"] == 0.0
    assert {table.schedule(0, 0, i).name for i in range(400)} == {"9x32x32", "17x32x48", "25x32x32", "1x32x32", "1x32x48"}


# -- the eval's parts -------------------------------------------------------------------------------------
def test_shapes_are_parsed_and_checked():
    assert parse_shape("17x32x64") == (17, 32, 64) and parse_shape("1X48X32") == (1, 48, 32)
    for bad in ("17x32", "axbxc", "0x32x32", "17x8x32"):
        with pytest.raises(SoraError, match="--shapes"):
            parse_shape(bad)
    assert ShapesEvalSettings(shapes=("17x32x64", "17X32X64")).shapes == ("17x32x64",)
    w = world_at(ShapesWorld(), 1, 48, 32)
    assert (w.height, w.width) == (48, 32) and w.small_radius == ShapesWorld().small_radius
    with pytest.raises(SoraError, match="17x8x32"):
        world_at(ShapesWorld(), 17, 8, 32)  # the world's own check, named by the shape asked for


def _native(entries: dict) -> dict:
    return {"native": {"reference": "17x32x32", "shapes": entries}}


def test_native_targets_hold_every_shape_to_one_object_and_the_reference():
    ref = {"seen_in_training": True, "one_object_frac": 1.0, "accuracy": {"colour": 1.0}, "points_lost": {"colour": 0.0}}
    wide = {"seen_in_training": False, "one_object_frac": 0.5, "accuracy": {"colour": 0.85}, "points_lost": {"colour": 15.0}}
    image = {"seen_in_training": True, "one_object_frac": 0.97, "accuracy": {"colour": 0.95}, "points_lost": {"colour": 5.0}}
    report = _native({"17x32x32": ref, "17x32x64": wide, "1x32x32": image})
    names = native_targets(report)
    assert "native 17x32x64 (unseen): one object per frame" in names
    assert not any(n.startswith("native 17x32x32") and "points" in n for n in names)  # the reference is not held to itself
    report["t2v"] = {"seen": {"accuracy": {"colour": 1.0, "shape": 1.0, "direction": 1.0}}, "heldout": {"accuracy": {"joint": 1.0}}}
    report["vae"] = {"recon_psnr_db": 40.0}
    got = check_targets(report)
    assert got["native 17x32x32 (seen): one object per frame"]["pass"]
    assert not got["native 17x32x64 (unseen): one object per frame"]["pass"]  # two copies in half the frames
    assert not got["native 17x32x64 (unseen): colour points lost vs 17x32x32"]["pass"]
    assert got["native 1x32x32 (seen): colour points lost vs 17x32x32"]["pass"]


# -- the recipe, at toy scale ---------------------------------------------------------------------------
def _tiny_vae_export(base: Path) -> Path:
    import torch

    from sora_train.models.export import export_parts
    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    return export_parts(base / "vae" / "export", {"vae": build_vae("debug")}, {"task": "vae", "step": 0})


@pytest.mark.slow
def test_fast_recipe_trains_on_every_bucket_and_scores_seen_and_unseen_shapes(tmp_path):
    base, out, data = tmp_path / "base", tmp_path / "out", tmp_path / "data"
    _tiny_vae_export(base)
    env = base_env(SORA_QUALITY_DIR=str(base), SORA_NATIVE_DIR=str(out), SORA_DATA_DIR=str(data), SORA_NATIVE_FAST="1",
                   PATH=f"{BIN}:{os.environ['PATH']}")
    p = subprocess.run(["bash", "launch/native_shapes.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    index = json.loads((out / "latents" / "train" / "index.json").read_text())
    assert set(index["shape_histogram"]) == {"17x32x32", "17x32x48", "17x48x32", "9x32x32", "25x32x32"}
    meta = json.loads((out / "dit" / "export" / "model.json").read_text())["meta"]
    assert meta["train_shape"] == {"num_frames": 17, "height": 32, "width": 32}
    assert {"1x32x32", "1x32x48", "1x48x32", "25x32x32"} <= set(meta["train_buckets"])
    assert "skipping sample" not in (out / "dit" / "train.log").read_text()  # every image batch had latents of its size
    # the shipped buckets on these latents: 1,500 batches (metadata only) use every shape's clips at the rate
    # they arrive, so no bucket's pool grows until the loader stops (it did, at ~650 steps, weighted by clips)
    from omegaconf import OmegaConf

    from sora_train.data.latents import LatentDataModule

    buckets = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "shapes_native.yaml").data.buckets)
    dm = LatentDataModule(str(out / "latents" / "train"), buckets=buckets, image_ratio=0.1, num_workers=0)
    ds = dm.make_dataset(dm.train_spec, dm.make_buckets(), train=True)
    st = ds._consumer()
    batches = ds._batches(st, ds._forever(st), 0)
    used: dict[str, int] = {}
    for _ in range(1500):
        for item in next(batches)[2]:
            shape = f"{item.meta['num_frames']}x{item.meta['height']}x{item.meta['width']}"
            used[shape] = used.get(shape, 0) + 1
    assert len(used) == 5 and max(used.values()) < 1.1 * min(used.values()), used
    # a run whose loader fails (here: 4 of 5 clip shapes fit no bucket) stops with the worker's one-line error;
    # it used to print a traceback and hang at exit on its DataLoader worker, which ignores SIGTERM during a run
    bad = subprocess.run([str(BIN / "sora-train"), "experiment=shapes_native", f"vae_ckpt={base}/vae/export",
                          f"data.train_shards={out}/latents/train", "data.val_shards=null", "data.num_workers=1", "data.image_ratio=0",
                          "data.buckets=[{num_frames: 17, height: 32, width: 32, batch_size: 2}]", "trainer.max_steps=50",
                          "callbacks.samples=null", f"hydra.run.dir={tmp_path}/bad", "dit.hidden_size=32", "dit.depth=1", "dit.num_heads=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr[-3000:]
    assert errors[0].startswith("error: data loader worker:") and "fits_no_bucket" in errors[0]
    report = json.loads((out / "eval_shapes" / "report.json").read_text())
    shapes = report["native"]["shapes"]
    assert report["native"]["reference"] == "17x32x32" and list(shapes)[0] == "17x32x32"
    assert {n for n, e in shapes.items() if not e["seen_in_training"]} == {"17x32x64", "17x64x32", "17x48x48", "49x32x32", "33x32x64"}
    assert set(shapes["1x48x32"]["accuracy"]) == {"colour", "shape"} and "direction" in shapes["49x32x32"]["accuracy"]
    for name, e in shapes.items():
        assert 0.0 <= e["one_object_frac"] <= 1.0 and e["n"] > 0, name
        assert f"native {name} ({'seen' if e['seen_in_training'] else 'unseen'}): one object per frame" in report["targets"]
    assert (out / "eval_shapes" / "native.png").is_file() and report["files"]["native"] == "native.png"
