"""Boxes (issue 19): the JSON contract, its one-line errors, interpolation, what the shapes
world writes, how loaders carry boxes through frame choice and crop, and rasterising."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sora_train.data.boxes import collate_boxes, latent_frame_groups, load_boxes, parse_boxes, rasterise_boxes
from sora_train.data.shapes import SHAPES, AttributeReader, ShapesWorld, boxes_json, centroid_offset, half_extent
from sora_train.utils.errors import SoraError


def _one(keyframes, mode="hard", **top):
    return {"objects": [{"id": 0, "mode": mode, "keyframes": keyframes}], **top}


GOOD = _one([{"frame": 0, "box": [0.1, 0.2, 0.3, 0.4]}, {"frame": 8, "box": [0.5, 0.2, 0.7, 0.4]}])


def test_keyframes_interpolate_and_leave_frames_outside_unconstrained():
    b = parse_boxes(_one([{"frame": 2, "box": [0.1, 0.2, 0.3, 0.4]}, {"frame": 6, "box": [0.5, 0.2, 0.7, 0.4]}]))
    boxes, valid, hard = b.dense(9)
    assert valid[0].tolist() == [False, False, True, True, True, True, True, False, False]
    np.testing.assert_allclose(boxes[0, 4], [0.3, 0.2, 0.5, 0.4], atol=1e-6)  # halfway
    assert hard.tolist() == [True]
    # resampling at source frames (a clip cut, a loader's stride) keeps the path
    sub = b.at_frames([2, 4, 6])
    np.testing.assert_allclose(sub.dense(3)[0][0, 1], [0.3, 0.2, 0.5, 0.4], atol=1e-6)
    assert parse_boxes(b.to_json()) == b  # round trip


@pytest.mark.parametrize(
    "data, needle",
    [
        (_one([{"frame": 0, "box": [-0.1, 0.2, 0.3, 0.4]}]), "objects[0].keyframes[0].box: [-0.1, 0.2, 0.3, 0.4] lies outside the frame"),
        (_one([{"frame": 0, "box": [0.1, 0.2, 1.3, 0.4]}]), "lies outside the frame"),
        (_one([{"frame": 0, "box": [0.5, 0.2, 0.3, 0.4]}]), "objects[0].keyframes[0].box: [0.5, 0.2, 0.3, 0.4] is inverted"),
        (_one([{"frame": 0, "box": [0.1, 0.2, 0.3, 0.4]}, {"frame": 17, "box": [0.1, 0.2, 0.3, 0.4]}]), "objects[0].keyframes[1].frame: 17 is past the clip (frames 0..16)"),
        (_one([{"frame": 0, "box": [0.1, 0.2, 0.3]}]), "objects[0].keyframes[0].box"),
        (_one([{"frame": 0, "box": [0.1, 0.2, 0.3, 0.4]}], mode="squishy"), "objects[0].mode: 'squishy'"),
        ({"objects": [GOOD["objects"][0], {**GOOD["objects"][0], "id": 1}]}, "objects has 2 objects; the model was trained for at most 1"),
        ({"objects": []}, "'objects' must be a non-empty list"),
        ({"boxes": []}, "unknown field(s) ['boxes']"),
    ],
)
def test_bad_boxes_are_one_line_errors_naming_the_field(data, needle):
    with pytest.raises(SoraError) as e:
        parse_boxes(data, "boxes.json", num_frames=17, max_objects=1)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("boxes.json:")


def test_malformed_json_file_is_one_line_error(tmp_path):
    p = tmp_path / "b.json"
    p.write_text('{"objects": [')
    with pytest.raises(SoraError, match=r"b.json: malformed JSON: .* line 1") as e:
        load_boxes(p)
    assert "\n" not in str(e.value)
    p.write_text(json.dumps(GOOD))
    assert len(load_boxes(p, num_frames=9, max_objects=1).objects) == 1


@pytest.mark.parametrize("motion", ["straight", "varied"])
def test_shapes_world_boxes_hold_the_object(motion):
    """Every clip's boxes contain the drawn object in every frame; varied motion turns."""
    world = ShapesWorld(motion=motion)
    reader = AttributeReader(world)
    turned = 0
    for i in range(12):
        attrs = world.attrs_for(i, 0)
        m = world.sample_motion(attrs, np.random.default_rng(i))
        frames = world.draw(attrs, m)  # (F, H, W, 3)
        boxes, valid, _ = parse_boxes(boxes_json(attrs.shape, m, world.num_frames, world.height, world.width)).dense(world.num_frames)
        assert valid.all()
        for f in range(world.num_frames):
            yy, xx = np.nonzero(frames[f].max(-1) > 40)
            x0, y0, x1, y1 = boxes[0, f] * [world.width, world.height, world.width, world.height]
            assert xx.min() >= np.floor(x0) - 1 and xx.max() <= np.ceil(x1) and yy.min() >= np.floor(y0) - 1 and yy.max() <= np.ceil(y1)
        assert reader.read(frames)["direction"] == attrs.direction  # the caption stays true
        c = m.centres(world.num_frames)
        turned += bool(np.abs(np.diff(c, 2, axis=0)).max() > 1e-6)
    assert (turned > 0) == (motion == "varied")


def test_rasterise_covers_the_box_on_the_latent_grid():
    boxes = torch.tensor([[[[0.25, 0.5, 0.75, 1.0]] * 9]])  # (1, 1, 9, 4)
    valid = torch.ones(1, 1, 9, dtype=torch.bool)
    valid[0, 0, 5:] = False  # the last latent frame covers pixel frames 5..8: no box
    maps = rasterise_boxes(boxes, valid, torch.tensor([[False]]), 2, (3, 4, 4))  # soft
    assert maps.shape == (1, 4, 3, 4, 4)
    assert maps[0, 0].abs().sum() == 0 and maps[0, 2:].abs().sum() == 0  # hard channel and slot 2 empty
    np.testing.assert_allclose(maps[0, 1, 0].numpy(), [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]])
    assert maps[0, 1, 2].sum() == 0  # frames without a box contribute nothing
    assert latent_frame_groups(17, 5) == [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]
    with pytest.raises(SoraError, match="at most 1"):
        rasterise_boxes(torch.zeros(1, 2, 9, 4), torch.ones(1, 2, 9, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool), 1, (3, 4, 4))


def test_collate_pads_objects_and_marks_samples_without_boxes():
    b = parse_boxes(GOOD).dense(9)
    out = collate_boxes([b, None], 9)
    assert out["boxes"].shape == (2, 1, 9, 4) and out["box_valid"][1].sum() == 0 and out["box_valid"][0].all()
    assert collate_boxes([None, None], 9) is None


def test_crop_moves_boxes_with_the_frame():
    b = parse_boxes(_one([{"frame": 0, "box": [0.5, 0.25, 0.75, 0.5]}]))
    # 32x64 frame resized to 32x64, centre crop 32x32 at left=16
    c = b.cropped(32, 64, 0, 16, 32, 32)
    np.testing.assert_allclose(c.objects[0].boxes[0], (0.5, 0.25, 1.0, 0.5))
    assert b.cropped(32, 64, 0, 0, 32, 8).objects == ()  # box entirely outside the crop: dropped


def test_loader_batches_carry_boxes_that_match_the_decoded_frames(tmp_path):
    """Through the real loader (random clip start at a lower frame count, shard decode): each
    sample's boxes hold the object the reader finds in the frames the loader chose."""
    from sora_train.data.buckets import BucketTable
    from sora_train.data.dataset import ShardVideoDataset
    from sora_train.data.shapes import generate_shards

    world = ShapesWorld(motion="varied")
    generate_shards(tmp_path, 8, 0, world=world, heldout=[])
    ds = ShardVideoDataset(str(tmp_path / "train"), BucketTable([{"num_frames": 9, "height": 32, "width": 32, "batch_size": 4}]), train=True)
    batch = next(iter(ds))
    reader = AttributeReader(world)
    assert batch["boxes"].shape == (4, 1, 9, 4) and batch["box_valid"].all()
    for b in range(4):
        shape = next(w for w in batch["caption"][b].split() if w in SHAPES)
        cen = reader.read(batch["video"][b].numpy())["centroids"]  # (9, 2) px
        box = batch["boxes"][b, 0].numpy().astype(np.float64) * 32  # (9, 4) px
        radius = (box[:, 2] - box[:, 0]) / (2 * half_extent(shape, 1.0)[0])  # (9,)
        want = np.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2 + centroid_offset(shape, 1.0)[1] * radius], 1)
        assert np.abs(cen - want).max() < 0.75, (shape, cen - want)  # a frame off would be ~1 px or more
