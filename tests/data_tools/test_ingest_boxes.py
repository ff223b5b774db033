"""sora-data ingest keeps a NAME.boxes.json sidecar (issue 19): cut to each clip's frames, and
a bad sidecar rejects its video as bad_sidecar with one line naming the field."""

from __future__ import annotations

import json

import numpy as np

from sora_train.data.boxes import parse_boxes
from sora_train.data.shapes import ShapeAttrs, ShapeMotion, ShapesWorld
from sora_train.data.shards import iter_samples, shard_paths
from sora_train.data.video_io import encode_video
from sora_train.data_tools.cli import main


def _video(path, frames=24):
    world = ShapesWorld(num_frames=frames)
    clip = world.draw(ShapeAttrs("red", "square", "right", "large"), ShapeMotion(5.0, (8.0, 16.0), (24.0, 16.0)))
    path.write_bytes(encode_video(clip, 8.0))
    path.with_suffix(".txt").write_text("a large red square moving right")


def _sidecar(path, keyframes):
    path.with_name(path.stem + ".boxes.json").write_text(json.dumps({"objects": [{"id": 3, "mode": "soft", "keyframes": keyframes}]}))


def test_ingest_cuts_the_sidecar_to_each_clip_and_rejects_bad_ones(tmp_path):
    src = tmp_path / "clips"
    src.mkdir()
    for name in ("good", "inverted", "late"):
        _video(src / f"{name}.mp4")
    _sidecar(src / "good.mp4", [{"frame": 0, "box": [0.0, 0.25, 0.5, 0.75]}, {"frame": 23, "box": [0.5, 0.25, 1.0, 0.75]}])
    _sidecar(src / "inverted.mp4", [{"frame": 0, "box": [0.6, 0.25, 0.5, 0.75]}])
    _sidecar(src / "late.mp4", [{"frame": 30, "box": [0.1, 0.25, 0.5, 0.75]}])
    out = tmp_path / "shards"
    # clips of at most 1.5 s (12 frames): the 24-frame source is cut in two
    assert main(["ingest", str(src), "--out", str(out), "--max-clip-seconds", "1.5"]) == 0
    metas = [json.loads(s["json"]) for p in shard_paths(out) for s in iter_samples(p)]
    assert len(metas) == 2
    for meta in metas:
        start, end = meta["frame_range"]
        boxes, valid, hard = parse_boxes(meta["boxes"], num_frames=meta["num_frames"]).dense(meta["num_frames"])
        assert valid.all() and not hard.any() and meta["boxes"]["objects"][0]["id"] == 3
        x0 = boxes[0, :, 0]
        np.testing.assert_allclose(x0, 0.5 * np.arange(start, end) / 23, atol=1e-4)  # source frame start + i
    rejects = {json.loads(line)["source"]: json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert rejects["inverted.mp4"]["reason"] == "bad_sidecar"
    assert "inverted.boxes.json: objects[0].keyframes[0].box: [0.6, 0.25, 0.5, 0.75] is inverted" in rejects["inverted.mp4"]["detail"]
    assert rejects["late.mp4"]["reason"] == "bad_sidecar" and "objects[0].keyframes[0].frame: 30 is past the clip (frames 0..23)" in rejects["late.mp4"]["detail"]
