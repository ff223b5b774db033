"""The shapes world: rendering, captions, held-out pairs, shard writing and the attribute reader.

The reader is the framework's quality check for generated video, so its accuracy is tested
the way it is used: on clips that went through a real H.264 encode and decord decode.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from sora_train.data import shapes
from sora_train.data.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    AttributeReader,
    ShapeAttrs,
    ShapesWorld,
    default_heldout,
    ensure_shapes_dataset,
    generate_shards,
)
from sora_train.data.shards import REQUIRED_META, iter_samples, read_index, shard_paths
from sora_train.data.video_io import decode_video, encode_video
from sora_train.utils.errors import SoraError
from sora_train.utils.io import sha256_bytes

ATTRS = ("colour", "shape", "direction", "size")
WORLD = ShapesWorld()  # 32x32, 17 frames


def _roundtrip(frames: np.ndarray, fps: float) -> np.ndarray:
    """Real H.264 mp4 via PyAV, decoded by decord -> (F, H, W, 3) uint8."""
    return decode_video(encode_video(frames, fps))


# -- vocabulary and captions -------------------------------------------------------------------
def test_combos_cover_the_vocabulary_once():
    combos = WORLD.combos()
    assert len(combos) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) * len(SIZES)
    assert len(set(combos)) == len(combos)
    assert {a.colour for a in combos} == set(COLOURS) and {a.size for a in combos} == set(SIZES)


def test_attrs_reject_unknown_names():
    with pytest.raises(SoraError, match="unknown colour 'purple'"):
        ShapeAttrs("purple", "circle", "left", "small")
    with pytest.raises(SoraError, match="unknown shape"):
        ShapeAttrs("red", "hexagon", "left", "small")


def test_captions_state_the_attributes():
    shorts, denses = set(), set()
    for a in WORLD.combos():
        assert a.caption() == f"a {a.size} {a.colour} {a.shape} moving {a.direction}"
        dense = a.dense_caption()
        assert dense == a.dense_caption()  # deterministic
        words = dense.lower()
        assert f" {a.size} " in words and a.colour in words and a.shape in words
        assert shapes._DENSE_PATH[a.direction] in words and "black background" in words
        shorts.add(a.caption())
        denses.add(dense)
    assert len(shorts) == len(denses) == len(WORLD.combos())  # no two combos share a caption
    assert ShapeAttrs("red", "circle", "left", "small").dense_caption() == (
        "A small bright red circle glides steadily from right to left across a plain black background, "
        "seen by a static camera."
    )


def test_attrs_for_is_deterministic_and_balanced():
    n = len(WORLD.combos())
    first = [WORLD.attrs_for(i, seed=3) for i in range(n)]
    assert first == [WORLD.attrs_for(i, seed=3) for i in range(n)]
    assert set(first) == set(WORLD.combos())  # each block of n clips holds every combo once
    assert first != [WORLD.attrs_for(i, seed=4) for i in range(n)]
    subset = WORLD.combos()[:5]
    assert {WORLD.attrs_for(i, 0, subset) for i in range(20)} == set(subset)


# -- rendering ---------------------------------------------------------------------------------
def test_every_combination_renders_deterministically_in_frame_and_moving():
    bg = np.asarray(WORLD.background)
    for i, a in enumerate(WORLD.combos()):
        frames = WORLD.render(a, np.random.default_rng(i))  # (F, H, W, 3)
        assert frames.shape == (17, 32, 32, 3) and frames.dtype == np.uint8
        assert np.array_equal(frames, WORLD.render(a, np.random.default_rng(i)))
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)  # (F, 4W, 3)
        assert (border == bg).all(), f"{a.caption()}: object leaves the frame"
        assert (frames.reshape(-1, 3) == COLOURS[a.colour]).all(axis=1).any()  # the exact palette colour
        m = WORLD.sample_motion(a, np.random.default_rng(i))
        moved = np.subtract(m.end, m.start)
        assert np.abs(moved).max() >= WORLD.width / 3, f"{a.caption()}: moved only {moved}"
        assert tuple(np.sign(moved).astype(int)) == shapes._DIRECTION_VECTORS[a.direction]


def test_world_rejects_impossible_settings():
    with pytest.raises(SoraError, match="too small"):
        ShapesWorld(height=8, width=8)
    with pytest.raises(SoraError, match="overlaps"):
        ShapesWorld(small_radius=(0.1, 0.2), large_radius=(0.15, 0.2))
    with pytest.raises(SoraError, match="does not fit"):
        ShapesWorld(large_radius=(0.2, 0.3), travel=(0.4, 0.6))
    with pytest.raises(SoraError, match="too bright"):
        ShapesWorld(background=(128, 128, 128))
    assert ShapesWorld(height=64, width=64).render(WORLD.combos()[0], np.random.default_rng(0)).shape == (17, 64, 64, 3)


# -- the attribute reader ------------------------------------------------------------------------
def _reader_accuracy(world: ShapesWorld, n: int, seed: int) -> tuple[dict[str, float], list[str]]:
    reader = AttributeReader(world)
    wrong: Counter[str] = Counter()
    errors = []
    for i in range(n):
        a = world.attrs_for(i, seed)
        decoded = _roundtrip(world.render(a, np.random.default_rng([seed, i])), world.fps)  # (F, H, W, 3)
        got = reader.read(decoded)
        for k in ATTRS:
            if got[k] != getattr(a, k):
                wrong[k] += 1
                errors.append(f"{a.caption()}: {k} read as {got[k]}")
    return {k: 1 - wrong[k] / n for k in ATTRS}, errors


def test_reader_is_accurate_after_h264_at_32x32():
    n = 336  # every combination once (224) plus half again
    acc, errors = _reader_accuracy(WORLD, n, seed=101)
    assert all(v >= 0.99 for v in acc.values()), f"accuracy {acc}; e.g. {errors[:5]}"


def test_reader_is_accurate_after_h264_at_64x64():
    acc, errors = _reader_accuracy(ShapesWorld(height=64, width=64), 64, seed=202)
    assert all(v >= 0.99 for v in acc.values()), f"accuracy {acc}; e.g. {errors[:5]}"


def test_reader_survives_mild_blur_noise_and_dimming():
    """Generated samples are soft, noisy and off in brightness; the reader must not care."""
    reader, rng = AttributeReader(WORLD), np.random.default_rng(0)
    for i in range(24):
        a = WORLD.attrs_for(i, 5)
        x = _roundtrip(WORLD.render(a, np.random.default_rng(i)), WORLD.fps).astype(np.float32)  # (F, H, W, 3)
        x = np.stack([shapes._gaussian_blur(x[..., c], 0.7) for c in range(3)], axis=-1)  # (F, H, W, 3)
        x = 0.75 * x + rng.normal(0, 8, x.shape)  # dimmer, plus noise
        got = reader.read(np.clip(x, 0, 255).astype(np.uint8))
        assert {k: got[k] for k in ATTRS} == a.as_dict(), a.caption()


def test_reader_reports_none_without_an_object():
    reader = AttributeReader(WORLD)
    noise = np.random.default_rng(0).normal(0, 3, (17, 32, 32, 3))
    for blank in (
        np.zeros((17, 32, 32, 3), np.uint8),
        np.full((17, 32, 32, 3), 90, np.uint8),
        -np.ones((17, 32, 32, 3), np.float32),
        np.clip(10 + noise, 0, 255).astype(np.uint8),
        np.zeros((1, 32, 32, 3), np.uint8),
    ):
        got = reader.read(blank)
        assert not got["present"] and all(got[k] == "none" for k in ATTRS)
        assert reader.temporal_consistency(blank)["present_fraction"] == 0.0


def test_reader_static_object_has_no_direction():
    a = ShapeAttrs("cyan", "square", "up", "large")
    frames = np.repeat(WORLD.render(a, np.random.default_rng(0))[:1], 17, axis=0)  # (F, H, W, 3) frozen
    got = AttributeReader(WORLD).read(frames)
    assert got["direction"] == "none" and (got["colour"], got["shape"], got["size"]) == ("cyan", "square", "large")


def test_reader_accepts_float_torch_and_channel_first():
    a = ShapeAttrs("magenta", "triangle", "right", "small")
    frames = WORLD.render(a, np.random.default_rng(1))  # (F, H, W, 3) uint8
    reader = AttributeReader(WORLD)
    as_float = frames.astype(np.float32) / 127.5 - 1.0  # [-1, 1]
    cfhw = torch.from_numpy(as_float).permute(3, 0, 1, 2)  # (C, F, H, W), one sample of a batch
    for video, layout in ((frames, "FHWC"), (as_float, "FHWC"), (torch.from_numpy(frames), "FHWC"), (cfhw, "CFHW")):
        got = reader.read(video, layout=layout)
        assert {k: got[k] for k in ATTRS} == a.as_dict()
    assert reader.score(frames, a) == {"colour": True, "shape": True, "direction": True, "size": True, "all": True}
    with pytest.raises(SoraError, match="expected a video"):
        reader.read(frames[0])
    with pytest.raises(SoraError, match=r"\[-1, 1\]"):
        reader.read(frames.astype(np.float32))


def test_reader_diagnostics_track_the_object():
    a = ShapeAttrs("yellow", "circle", "down", "large")
    motion = WORLD.sample_motion(a, np.random.default_rng(2))
    got = AttributeReader(WORLD).read(WORLD.draw(a, motion))
    assert got["centroids"].shape == (17, 2) and got["areas"].shape == (17,) and got["colours"].shape == (17, 3)
    np.testing.assert_allclose(got["centroids"], motion.centres(17), atol=0.1)  # a circle's centroid is its centre
    np.testing.assert_allclose(got["radius"] * 32, motion.radius, rtol=0.03)


def test_temporal_consistency_flags_flicker_and_colour_drift():
    reader = AttributeReader(WORLD)
    a = ShapeAttrs("red", "square", "left", "large")
    frames = WORLD.render(a, np.random.default_rng(3))  # (F, H, W, 3)
    steady = reader.temporal_consistency(_roundtrip(frames, WORLD.fps))
    assert steady["present_fraction"] == 1.0
    assert steady["area_rel_std"] < 0.05 and steady["colour_rel_std"] < 0.05 and steady["track_rmse"] < 0.02
    flicker = frames.copy()
    flicker[1::2] = 0  # object gone in every other frame
    assert reader.temporal_consistency(flicker)["present_fraction"] == pytest.approx(9 / 17)
    drift = frames.copy()
    drift[9:] = WORLD.render(ShapeAttrs("yellow", "square", "left", "large"), np.random.default_rng(3))[9:]
    assert reader.temporal_consistency(drift)["colour_rel_std"] > 0.2


# -- held-out pairs --------------------------------------------------------------------------------
def test_default_heldout_is_a_fair_novel_subset():
    pairs = default_heldout(0)
    assert pairs == default_heldout(0)
    n_pairs = len(COLOURS) * len(SHAPES)
    assert 0.10 <= len(pairs) / n_pairs <= 0.15
    assert len({c for c, _ in pairs}) == len({s for _, s in pairs}) == len(pairs)  # one per colour and shape
    train = {(c, s) for c in COLOURS for s in SHAPES} - set(pairs)
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)
    assert any(default_heldout(seed) != pairs for seed in range(1, 5))


def test_heldout_must_leave_every_colour_and_shape_in_training(tmp_path):
    with pytest.raises(SoraError, match="every shape of colour 'red'"):
        generate_shards(tmp_path, 1, 1, heldout=[("red", s) for s in SHAPES])
    with pytest.raises(SoraError, match="not in the vocabulary"):
        generate_shards(tmp_path, 1, 1, heldout=[("purple", "circle")])


# -- shards ----------------------------------------------------------------------------------------
NUM_TRAIN, NUM_VAL = 40, 12


def _samples(split_dir):
    return [s for p in shard_paths(split_dir) for s in iter_samples(p)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    summary = generate_shards(root, NUM_TRAIN, NUM_VAL, seed=7, clips_per_shard=16, progress=True)
    return root, summary


def test_generate_shards_writes_three_valid_splits(dataset):
    root, summary = dataset
    heldout = {tuple(p) for p in summary["heldout_pairs"]}
    assert heldout == set(default_heldout(7))
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL), ("heldout", NUM_VAL)):
        index = read_index(root / split)
        assert index["num_samples"] == count and index["options"]["split"] == split
        assert index["shape_histogram"] == {"17x32x32": count}
        samples = _samples(root / split)
        assert [s["__key__"] for s in samples] == [f"shapes_{split}_{i:06d}" for i in range(count)]
        for i, s in enumerate(samples):
            meta = json.loads(s["json"])
            assert all(k in meta for k in REQUIRED_META)
            a = ShapeAttrs(**meta["attributes"])
            assert meta["caption"] == meta["captions"]["original"] == a.caption()
            assert meta["captions"]["dense"] == a.dense_caption()
            assert (meta["num_frames"], meta["height"], meta["width"], meta["frame_range"]) == (17, 32, 32, [0, 17])
            assert meta["duration"] == pytest.approx(17 / 8) and meta["fps"] == 8
            assert meta["source"] == {"path": f"shapes://7/{split}/{i}", "sha256": sha256_bytes(s["mp4"])}
            assert meta["license"].startswith("CC0-1.0")
            assert (a.pair in heldout) == (split == "heldout"), f"{split} holds {a.pair}"
    assert len(shard_paths(root / "train")) == 3  # 40 clips at 16 per shard


def test_shard_mp4s_decode_and_read_back(dataset):
    root, _ = dataset
    reader = AttributeReader(WORLD)
    for s in _samples(root / "heldout")[:4]:
        frames = decode_video(s["mp4"])  # (F, H, W, 3)
        assert frames.shape == (17, 32, 32, 3) and frames.dtype == np.uint8
        got = reader.read(frames)
        assert {k: got[k] for k in ATTRS} == json.loads(s["json"])["attributes"]


def test_generate_shards_is_byte_deterministic(dataset, tmp_path):
    root, _ = dataset
    generate_shards(tmp_path / "again", 0, NUM_VAL, seed=7, clips_per_shard=16)
    generate_shards(tmp_path / "other", 0, NUM_VAL, seed=8, clips_per_shard=16)
    first, again, other = ([s["mp4"] for s in _samples(base / "val")] for base in (root, tmp_path / "again", tmp_path / "other"))
    assert first == again
    assert first != other


def test_h264_encoding_of_identical_frames_is_identical():
    # Clip 10 of seed 7's val split encoded to 2-4 different byte strings in 25-40 tries while
    # libx264's mbtree was on (a flaky shard-determinism test); encode_video now turns it off.
    world = ShapesWorld()
    attrs = world.attrs_for(10, shapes._split_seed(7, "val"), [a for a in world.combos() if a.pair not in default_heldout(7)])
    frames = world.draw(attrs, world.sample_motion(attrs, np.random.default_rng([shapes._split_seed(7, "val"), shapes._RENDER_STREAM, 10])))
    assert len({encode_video(frames, world.fps) for _ in range(25)}) == 1


def test_ensure_shapes_dataset_generates_once_and_regenerates_on_change(tmp_path, monkeypatch):
    calls = []
    real = shapes.generate_shards
    monkeypatch.setattr(shapes, "generate_shards", lambda *a, **k: calls.append(1) or real(*a, **k))
    root = tmp_path / "shapes"
    assert ensure_shapes_dataset(root, 10, 2, seed=1, clips_per_shard=4) == root
    assert len(calls) == 1 and len(shard_paths(root / "train")) == 3
    stamp = (root / "train" / "index.json").stat().st_mtime_ns
    ensure_shapes_dataset(root, 10, 2, seed=1, clips_per_shard=4)
    assert len(calls) == 1 and (root / "train" / "index.json").stat().st_mtime_ns == stamp
    ensure_shapes_dataset(root, 6, 2, seed=1, clips_per_shard=4)  # changed options: rebuilt, old shards gone
    assert len(calls) == 2
    assert read_index(root / "train")["num_samples"] == 6
    assert sorted(p.name for p in (root / "train").glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


_RACE = """
import sys, time
from pathlib import Path
from sora_train.data import shapes
from sora_train.data.shards import shard_paths
root, log, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
real = shapes.generate_shards
def slow(*a, **k):
    with open(log, "a") as f:
        f.write("generated\\n")
    time.sleep(1.0)  # hold the set half-written while the others arrive
    return real(*a, **k)
shapes.generate_shards = slow
while time.time() < start:  # all three look at the empty directory at the same moment
    time.sleep(0.01)
missing = not (root / "train" / "index.json").exists()
shapes.ensure_shapes_dataset(root, 10, 2, seed=1, clips_per_shard=4)
print(len(shard_paths(root / "train")), missing)
"""


def test_ensure_shapes_dataset_three_processes_at_once_generate_it_once(tmp_path):
    """Sweep trials, ranks and nodes all prepare the same set: one writes, the others wait.

    Without the lock, each would clear and rewrite the other's shards (the sweep's
    ``FileNotFoundError: .../val/.shard-000000.tar.tmp``). ~4 s, mostly three interpreters.
    """
    import subprocess
    import sys
    import time

    root, log = tmp_path / "shapes", tmp_path / "log"
    start = time.time() + 5.0  # past every interpreter's imports
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(root), str(log), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    assert log.read_text().splitlines() == ["generated"]  # exactly one process wrote the set
    assert [o.strip() for o, _ in outs] == ["3 True"] * 3  # each found it missing, each returned it complete
    assert read_index(root / "train")["num_samples"] == 10 and read_index(root / "val")["num_samples"] == 2
    assert not list(root.rglob("*.tmp"))
