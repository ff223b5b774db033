"""Box motion control (issue 19): the DiT gains it without changing what it computed, it
trains (jointly or on a frozen base), sampling takes boxes in every mode with one-line
errors, and the whole path — train, export, sora-sample --boxes, sora-eval shapes control
scores — runs through the real entry points (the fast version of launch/boxes_quality.sh)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_train.data.boxes import parse_boxes, rasterise_boxes
from sora_train.data.shapes import ShapesWorld, boxes_json
from sora_train.models.dit import build_dit
from sora_train.models.export import export_parts, load_parts
from sora_train.models.text import TinyTextEncoder
from sora_train.models.vae import build_vae
from sora_train.training.box_control import BoxControl
from sora_train.utils.errors import SoraError

from cli_runs import BIN, ROOT, base_env

BOXES = {"objects": [{"id": 0, "mode": "hard", "keyframes": [{"frame": 0, "box": [0.1, 0.3, 0.4, 0.6]}, {"frame": 8, "box": [0.6, 0.3, 0.9, 0.6]}]}]}


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(dit, B=2, f=3, h=4, w=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, dit.in_channels, f, h, w, generator=g)
    return x, torch.rand(B, generator=g), torch.randn(B, 5, dit.text_dim, generator=g), torch.ones(B, 5, dtype=torch.bool)


def test_gaining_box_control_changes_nothing_until_trained_and_boxes_then_steer():
    dit = build_dit("debug", in_channels=4, text_dim=32)
    _randomise(dit)
    x, t, text, mask = _inputs(dit)
    before = dit(x, t, text, mask)
    BoxControl(max_objects=2).attach(dit)
    boxes, valid, hard = (torch.from_numpy(a)[None].expand(2, *a.shape) for a in parse_boxes(BOXES).dense(9))
    maps = rasterise_boxes(boxes.float(), valid, hard, 2, (3, 4, 4))  # (2, 4, 3, 4, 4)
    assert torch.equal(dit(x, t, text, mask), before)  # no boxes
    assert torch.equal(dit(x, t, text, mask, box_maps=maps), before)  # zero-initialised embedder
    _randomise(dit.box_embedder, seed=3)
    assert torch.equal(dit(x, t, text, mask, box_maps=torch.zeros_like(maps)), before)  # all-zero maps = no boxes
    steered = dit(x, t, text, mask, box_maps=maps)
    assert not torch.allclose(steered, before)
    # the export rebuilds it: max_boxes is part of the DiT's config
    rebuilt = type(dit)(**dit.config())
    rebuilt.load_state_dict(dit.state_dict())
    assert torch.equal(rebuilt(x, t, text, mask, box_maps=maps), steered)
    with pytest.raises(SoraError, match="max_boxes"):
        dit(x, t, text, mask, box_maps=maps[:, :2])


def test_frozen_base_trains_only_the_box_embedder():
    dit = build_dit("debug", in_channels=4, text_dim=32)
    BoxControl(max_objects=1, freeze_base=True).attach(dit)
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("box_embedder.") for n in trainable)


def test_augment_drops_softens_and_shortens():
    ctl = BoxControl(max_objects=1, dropout=0.5, soft_prob=0.5, partial_prob=0.5)
    boxes = torch.tensor([[[0.3, 0.3, 0.5, 0.5]]]).expand(256, 1, 9, 4).clone()
    valid, hard = torch.ones(256, 1, 9, dtype=torch.bool), torch.ones(256, 1, dtype=torch.bool)
    b, v, h = ctl.augment(boxes, valid, hard, torch.Generator().manual_seed(0))
    dropped = (~v.any(-1)).float().mean()
    assert 0.35 < dropped < 0.65
    soft = ~h[:, 0]
    assert 0.35 < soft.float().mean() < 0.65 and (b[soft, 0, :, 0] < 0.3).all() and (b[~soft, 0, :, 0] == 0.3).all()
    partial = v.any(-1)[:, 0] & ~v.all(-1)[:, 0]
    assert partial.any() and v[partial][:, 0, 0].all()  # a leading span always keeps frame 0


@pytest.fixture(scope="module")
def box_export(tmp_path_factory):
    """A tiny random export whose DiT has box control (what training leaves)."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("boxes_run")
    world = ShapesWorld(num_frames=9)
    text = TinyTextEncoder(dim=32, depth=1, num_heads=2)
    vae = build_vae("debug")
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    BoxControl(max_objects=1).attach(dit)
    _randomise(dit, seed=5)  # a trained model's weights stand-in: zero-initialised layers would hide the boxes
    meta = {"task": "dit", "step": 1, "sampler": {"steps": 2},
            "train_shape": {"num_frames": 9, "height": 32, "width": 32}, "train_data": {"heldout_pairs": [], "world": world.options()}}
    return export_parts(run / "export", {"vae": vae, "text": text, "dit": dit}, meta)


def test_pipeline_takes_boxes_in_every_mode(box_export):
    from sora_train.training.pipeline import VideoPipeline

    pipe = VideoPipeline.from_export(box_export)
    assert pipe.max_boxes == 1
    boxes = parse_boxes(BOXES, num_frames=9)
    image = np.zeros((32, 32, 3), np.uint8)
    image[10:18, 4:12] = (235, 40, 40)  # the box drawn on the given image: frame 0's box
    plain = pipe.generate(["a red square"], 9, 32, 32, steps=2, seed=0)
    steered = pipe.generate(["a red square"], 9, 32, 32, steps=2, seed=0, boxes=boxes)
    assert not torch.allclose(steered.video, plain.video)  # the boxes reach the model
    for mode, kw in (("i2v", {"image": image}), ("interpolate", {"image": image, "last_image": image}),
                     ("extend_forward", {"video": np.zeros((9, 32, 32, 3), np.uint8)}), ("edit", {"video": np.zeros((9, 32, 32, 3), np.uint8)})):
        gen = pipe.generate(["a red square"], 9, 32, 32, mode=mode, steps=1, seed=0, boxes=boxes, **kw)
        assert gen.settings["boxes"]["objects"][0]["keyframes"][1]["frame"] == 8
    two = parse_boxes({"objects": [BOXES["objects"][0], {**BOXES["objects"][0], "id": 1}]})
    with pytest.raises(SoraError, match="objects has 2 objects; the model was trained for at most 1"):
        pipe.generate(["x"], 9, 32, 32, steps=1, boxes=two)
    with pytest.raises(SoraError, match="past the clip"):
        pipe.generate(["x"], 5, 32, 32, steps=1, boxes=boxes)


def test_model_without_box_control_refuses_boxes(tmp_path):
    from sora_train.training.pipeline import VideoPipeline

    text, vae = TinyTextEncoder(dim=32, depth=1, num_heads=2), build_vae("debug")
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    export = export_parts(tmp_path / "export", {"vae": vae, "text": text, "dit": dit}, {"task": "dit", "sampler": {"steps": 1}})
    parts, _ = load_parts(export, ["dit"])
    assert parts["dit"].max_boxes == 0
    with pytest.raises(SoraError, match="not trained with box control"):
        VideoPipeline.from_export(export).generate(["x"], 9, 32, 32, steps=1, boxes=parse_boxes(BOXES))


def _cli(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "boxes, needle",
    [
        ('{"objects": [', "malformed JSON"),
        (json.dumps({"objects": [{"id": 0, "keyframes": [{"frame": 0, "box": [0.1, 0.1, 1.5, 0.4]}]}]}), "objects[0].keyframes[0].box: [0.1, 0.1, 1.5, 0.4] lies outside the frame"),
        (json.dumps({"objects": [{"id": 0, "keyframes": [{"frame": 0, "box": [0.4, 0.1, 0.2, 0.4]}]}]}), "is inverted"),
        (json.dumps({"objects": [{"id": 0, "keyframes": [{"frame": 9, "box": [0.1, 0.1, 0.2, 0.4]}]}]}), "objects[0].keyframes[0].frame: 9 is past the clip (frames 0..8)"),
        (json.dumps({"objects": [BOXES["objects"][0], {**BOXES["objects"][0], "id": 1}]}), "objects has 2 objects; the model was trained for at most 1"),
    ],
)
def test_sora_sample_bad_boxes_are_one_line_errors(box_export, tmp_path, boxes, needle):
    path = tmp_path / "boxes.json"
    path.write_text(boxes)
    p = _cli(["sora-sample", "--ckpt", str(box_export), "--prompt", "a red circle", "--boxes", str(path), "--out", str(tmp_path / "out")])
    assert p.returncode != 0
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0] and f"--boxes {path}" in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_fast_recipe_trains_samples_and_scores_box_control(tmp_path):
    """The fast version of launch/boxes_quality.sh: a few steps of control=boxes on varied
    shapes clips, then sora-sample --boxes (metadata records the boxes) and sora-eval shapes
    (control scores computed). Too few steps to meet the targets: structure, not quality."""
    data, run = tmp_path / "data", tmp_path / "run"
    p = _cli(["sora-train", "experiment=smoke", "control=boxes", f"paths.data_dir={data}", f"hydra.run.dir={run}",
              "data.prepare.world.motion=varied", "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.samples=null"], timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    export = run / "export"
    assert json.loads((export / "model.json").read_text())  # written
    parts, _ = load_parts(export, ["dit"])
    assert parts["dit"].max_boxes == 1 and parts["dit"].box_embedder[2].weight.abs().sum() > 0  # the embedder trained
    world = ShapesWorld(num_frames=9)
    attrs = world.attrs_for(0, 0)
    boxes = boxes_json(attrs.shape, world.sample_motion(attrs, np.random.default_rng(0)), 9, 32, 32)
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    p = _cli(["sora-sample", "--ckpt", str(export), "--prompt", attrs.caption(), "--boxes", str(tmp_path / "boxes.json"),
              "--steps", "2", "--image", str(_png(tmp_path)), "--out", str(tmp_path / "samples")])
    assert p.returncode == 0, p.stderr[-3000:]
    index = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert index[0]["boxes"]["objects"][0]["keyframes"][8]["frame"] == 8
    from sora_train.data.video_io import read_container_metadata

    claims = json.loads(read_container_metadata(Path(index[0]["video"]).read_bytes())["description"])
    assert claims["mode"] == "i2v" and len(claims["boxes"]["objects"][0]["keyframes"]) == 9
    p = _cli(["sora-eval", "shapes", "--ckpt", str(export), "--out", str(tmp_path / "eval"), "--fast", "--no-progress"], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    control = json.loads((tmp_path / "eval" / "report.json").read_text())["control"]
    assert set(control["kinds"]) == {"curve", "zigzag", "stop_and_go"}
    for key in ("centre_error", "inside_soft", "colour_drop_points", "shape_drop_points"):
        assert key in control
    assert 0.0 <= control["inside_soft"] <= 1.0
    targets = json.loads((tmp_path / "eval" / "report.json").read_text())["targets"]
    assert "control: mean centre error (frame widths)" in targets


def _png(tmp_path: Path) -> Path:
    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:16, 8:16] = (235, 40, 40)
    path = tmp_path / "first.png"
    Image.fromarray(img).save(path)
    return path
