"""sora-eval shapes: the metric code is right on ground truth, and the command writes a
complete report from a (tiny, random) export through the real entry point."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sora_train.data.shapes import AttributeReader, ShapeAttrs, ShapesWorld, default_heldout
from sora_train.training import shapes_eval as se

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORLD = ShapesWorld()  # 32x32, 17 frames: what the quality recipe trains on


# -- the metric code, on ground truth (no model) ------------------------------------------------
def test_ground_truth_scores_are_perfect():
    gt = se.ground_truth_check(WORLD, num_clips=24, seed=3)
    acc = gt["t2v"]["accuracy"]
    assert acc["colour"] == acc["direction"] == acc["size"] == 1.0
    assert acc["shape"] >= 0.95 and acc["joint"] >= 0.95
    assert gt["t2v"]["present"] == 1.0
    assert gt["seam_error_px"]["measured_fraction"] == 1.0 and gt["seam_error_px"]["mean"] < 0.1
    assert gt["mid_error_frac"]["measured_fraction"] == 1.0 and gt["mid_error_frac"]["mean"] < 0.01
    tc = gt["t2v"]["temporal"]
    assert tc["present_fraction"] == 1.0 and tc["area_rel_std"] < 0.05 and tc["colour_rel_std"] < 0.05 and tc["track_rmse"] < 0.01


def test_ground_truth_scores_survive_the_datasets_codec():
    """The clips the model is prompted with go through H.264 like the training data; the
    scoring must stay right on them (the reader was built for decoded video)."""
    gt = se.ground_truth_check(WORLD, num_clips=12, seed=4, codec=se.Codec())
    assert gt["t2v"]["accuracy"]["joint"] >= 0.9 and gt["t2v"]["accuracy"]["colour"] == 1.0
    assert gt["seam_error_px"]["mean"] < 0.3 and gt["mid_error_frac"]["mean"] < 0.02


def test_metrics_see_what_they_should_not_ignore():
    """A jump at the seam, a mid frame off the path, a wrong caption: each is measured."""
    reader = AttributeReader(WORLD)
    attrs = ShapeAttrs("red", "square", "right", "large")
    clip = se.render_clip(WORLD, attrs, seed=0, stream=1, index=0)  # (F, H, W, 3)
    assert se.seam_error_px(reader, clip, 3) < 0.1
    jumped = clip.copy()
    jumped[3:] = np.roll(clip[3:], 3, axis=1)  # new frames 3 px lower than the motion predicts
    assert se.seam_error_px(reader, jumped, 3) == pytest.approx(3.0, abs=0.2)

    c = se.centroids(reader, clip)
    F = len(clip)
    assert se.interpolation_error(reader, clip, c[0], c[-1], F - 1) < 0.01
    stuck = clip.copy()
    stuck[(F - 1) // 2] = clip[0]  # the mid frame never left the start
    assert se.interpolation_error(reader, stuck, c[0], c[-1], F - 1) == pytest.approx(0.5, abs=0.03)

    wrong = se.score_caption(reader, clip, ShapeAttrs("blue", "square", "left", "large"))
    assert wrong["hits"] == {"colour": False, "shape": True, "direction": False, "size": True, "joint": False}
    assert se.psnr_db(clip[0], clip[0]) == se.PSNR_CAP_DB
    noisy = np.clip(clip[0].astype(int) + 8, 0, 255).astype(np.uint8)
    assert 28 < se.psnr_db(noisy, clip[0]) < 31  # an error of 8/255 everywhere is 30.0 dB


def test_confusions_count_what_was_asked_against_what_was_read():
    reader = AttributeReader(WORLD)
    red_square = ShapeAttrs("red", "square", "right", "large")
    square = se.render_clip(WORLD, red_square, seed=0, stream=1, index=0)
    records = [se.score_caption(reader, square, red_square),  # right
               se.score_caption(reader, square, ShapeAttrs("red", "circle", "right", "large")),  # shape wrong
               se.score_caption(reader, square, ShapeAttrs("red", "circle", "left", "large"))]  # shape, direction wrong
    summary = se.summarize_captions(records)
    assert summary["confusion"]["shape"] == {"square": {"square": 1}, "circle": {"square": 2}}
    assert summary["confusion"]["direction"] == {"right": {"right": 2}, "left": {"right": 1}}
    assert se.top_confusions(summary["confusion"]) == [("shape", "circle", "square", 2), ("direction", "left", "right", 1)]


def test_combos_split_by_heldout_pairs_and_cap():
    held_pairs = default_heldout(0)
    seen, held = se.split_combos(held_pairs)
    assert len(seen) + len(held) == len(ShapesWorld.combos())
    assert {a.pair for a in held} == set(held_pairs) and not {a.pair for a in seen} & set(held_pairs)
    seen4, held4 = se.split_combos(held_pairs, max_combos=4, seed=1)
    assert len(seen4) == len(held4) == 4 and set(seen4) <= set(seen) and set(held4) <= set(held)


def test_heldout_pairs_come_from_metadata_then_data_then_default(tmp_path):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    recorded = {"train_data": {"heldout_pairs": [["red", "circle"]], "world": WORLD.options()}}
    assert se.data_facts(export, recorded, None, 0)["heldout_pairs"] == [["red", "circle"]]
    data = tmp_path / "shapes" / "train"
    data.mkdir(parents=True)
    (data / "index.json").write_text(json.dumps({"options": {"heldout_pairs": [["blue", "square"]]}}))
    facts = se.data_facts(export, recorded, tmp_path / "shapes", 0)
    assert facts["heldout_pairs"] == [["blue", "square"]] and "--data" in facts["heldout_source"]
    facts = se.data_facts(export, {}, None, 5)
    assert facts["heldout_pairs"] == [list(p) for p in default_heldout(5)] and facts["heldout_source"] == "default_heldout(5)"


# -- the command, on a tiny random export -------------------------------------------------------
def _tiny_export(run_dir: Path) -> Path:
    import torch

    from sora_train.models.dit import build_dit
    from sora_train.models.text import TinyTextEncoder
    from sora_train.models.vae import build_vae
    from sora_train.models.export import export_parts

    torch.manual_seed(0)
    world = ShapesWorld(num_frames=9)
    text = TinyTextEncoder(dim=32, depth=1, num_heads=2)
    vae = build_vae("debug")
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    meta = {
        "task": "dit", "step": 4, "sampler": {"steps": 2},
        "train_shape": {"num_frames": world.num_frames, "height": world.height, "width": world.width},
        "train_data": {"heldout_pairs": [list(p) for p in default_heldout(0)], "world": world.options()},
    }
    out = export_parts(run_dir / "export", {"vae": vae, "text": text, "dit": dit}, meta)
    # what LossPlot leaves in a run dir: val loss per timestep bin, over steps
    history = {f"val/loss_t{a / 10:.1f}-{(a + 1) / 10:.1f}": [[2, 1.0 + a / 10], [4, 0.9 + a / 10]] for a in range(10)}
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "loss_history.json").write_text(json.dumps(history))
    return out


@pytest.fixture(scope="module")
def fast_report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    export = _tiny_export(run_dir)
    out = run_dir / "eval"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.run([str(BIN / "sora-eval"), "shapes", "--ckpt", str(export), "--out", str(out), "--fast", "--no-progress"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


def _walk(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _walk(v, f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, x


def test_i2v_scores_can_fail_where_frame0_psnr_cannot():
    """Frame-0 PSNR is perfect for an output that repeats the given image, for a second
    object appearing, and for a subject that changes colour halfway: the i2v scores that
    replaced it as targets (subject in the last frames, direction, one object) catch each."""
    reader = AttributeReader(WORLD)
    attrs = ShapeAttrs("red", "square", "right", "large")
    clip = se.render_clip(WORLD, attrs, seed=0, stream=11, index=0)  # (F, H, W, 3)
    F = len(clip)
    tail = max(3, F // 4)
    assert (reader.count_objects(clip) == 1).all()
    assert reader.read(clip)["direction"] == "right" and reader.read(clip[-tail:])["colour"] == "red"

    frozen = np.repeat(clip[:1], F, axis=0)  # the image, held still: frame 0 is exact
    assert se.psnr_db(frozen[0], clip[0]) == se.PSNR_CAP_DB and reader.read(frozen)["direction"] != "right"

    other = se.render_clip(WORLD, ShapeAttrs("blue", "circle", "left", "small"), seed=1, stream=11, index=1)
    doubled = np.maximum(clip, other)  # a second object appears beside the subject
    counts = reader.count_objects(doubled)  # two until they meet (the two move towards each other)
    assert (counts == 2).any() and (counts == 1).mean() < se.TARGETS["one object per frame (i2v, extension, interpolation)"][2]

    changed = clip.copy()
    changed[F // 2:] = se.render_clip(WORLD, ShapeAttrs("blue", "square", "right", "large"), seed=0, stream=11, index=0)[F // 2:]
    assert se.psnr_db(changed[0], clip[0]) == se.PSNR_CAP_DB and reader.read(changed[-tail:])["colour"] == "blue"
    assert (reader.count_objects(np.zeros_like(clip)) == 0).all()


def test_fast_eval_writes_a_complete_report(fast_report):
    out, stdout = fast_report
    report = json.loads((out / "report.json").read_text())  # strict JSON: no NaN/Infinity
    for key in ("export", "settings", "heldout_pairs", "heldout_source", "t2v", "i2v", "extend", "interpolate", "vae",
                "ground_truth", "targets", "val_loss_by_t", "timings", "files"):
        assert key in report, key
    assert report["heldout_source"] == "export metadata" and report["settings"]["fast"] is True
    assert report["ground_truth_codec"]["crf"] == 18  # the dataset's encoding (default when not recorded)
    for group in ("seen", "heldout", "all"):
        g = report["t2v"][group]
        assert g["n"] > 0
        assert set(g["accuracy"]) == {"colour", "shape", "direction", "size", "joint"}
        assert all(0.0 <= v <= 1.0 for v in g["accuracy"].values())
        assert set(g["temporal"]) == {"present_fraction", "area_rel_std", "colour_rel_std", "track_rmse"}
        for attr in ("colour", "shape", "direction", "size"):  # every sample counted once per attribute
            assert sum(c for row in g["confusion"][attr].values() for c in row.values()) == g["n"]
    assert 0 <= report["i2v"]["direction_accuracy"] <= 1 and 0 <= report["extend"]["direction_accuracy"] <= 1
    for key in ("subject_kept_last", "one_object_frac"):
        assert 0 <= report["i2v"][key] <= 1 and 0 <= report["extend"][key] <= 1
    assert 0 <= report["interpolate"]["one_object_frac"] <= 1 and 0 <= report["modes"]["one_object_frac"] <= 1
    assert "i2v frame-0 PSNR (dB)" not in report["targets"]  # a sanity figure now, not a target
    for psnr in (report["i2v"]["frame0_psnr_db"], report["vae"]["recon_psnr_db"]):
        assert math.isfinite(psnr) and 0 < psnr <= se.PSNR_CAP_DB
    assert set(report["vae"]["recon_read"]) == {"colour", "shape", "direction", "size", "joint"}
    assert all(0.0 <= v <= 1.0 for v in report["vae"]["recon_read"].values())
    assert report["extend"]["num_given_frames"] == 3 and report["interpolate"]["end_frame"] == 7
    for key in ("seam_error_px", "measured_fraction"):  # nan (object missing) would be null
        v = report["extend"][key]
        assert v is None or (math.isfinite(v) and v >= 0)
    assert set(report["targets"]) == set(se.TARGETS)
    assert all(isinstance(t["pass"], bool) for t in report["targets"].values())
    assert len(report["val_loss_by_t"]) == 10
    for path, v in _walk(report["ground_truth"]):
        assert v is None or isinstance(v, (int, float, str)), path
    assert report["ground_truth"]["t2v"]["accuracy"]["colour"] == 1.0  # the reader itself works at 9 frames

    from PIL import Image

    for name in ("samples.png", "accuracy.png", "val_loss_by_t.png"):
        with Image.open(out / name) as img:
            img.load()
            assert img.size[0] > 100 and img.size[1] > 50, name
    assert "targets" in stdout and "held-out joint accuracy" in stdout
    last = stdout.strip().splitlines()[-1]  # the one-line result, last
    assert last.startswith("shapes eval (step ") and "quality targets met" in last


def test_demo_targets_t2v_only(fast_report):
    """make demo's bar: text-to-video on seen captions only — no prompting modes are generated,
    their targets are left out (not failed), and the one-line result names the preset."""
    out, _ = fast_report
    export = next(out.parent.glob("**/export"))
    demo_out = out.parent / "eval_demo"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.run([str(BIN / "sora-eval"), "shapes", "--ckpt", str(export), "--out", str(demo_out), "--fast", "--no-progress",
                        "--targets", "demo", "--t2v-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((demo_out / "report.json").read_text())
    assert set(report["targets"]) == set(se.DEMO_TARGETS)
    assert not ({"i2v", "extend", "interpolate", "modes"} & set(report)) and "modes_s" not in report["timings"]
    assert report["settings"]["targets"] == "demo" and report["settings"]["modes"] is False
    last = p.stdout.strip().splitlines()[-1]
    assert "seen colour" in last and "demo targets met" in last and f"/{len(se.DEMO_TARGETS)}" in last
    with pytest.raises(se.SoraError, match="targets='best'"):
        se.ShapesEvalSettings(targets="best")


def test_bad_checkpoint_is_one_line_error(tmp_path, capsys):
    from sora_train.cli.eval import main

    with pytest.raises(SystemExit) as e:
        main(["shapes", "--ckpt", str(tmp_path / "nope"), "--fast", "--no-progress"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a sora_train export" in lines[0]


def test_world_is_scored_at_the_shape_the_model_trained_on():
    """A DiT trained on fewer frames than the source clips (make demo's: 5 frames at 2 fps of the
    17-frame clips; here 9): the eval generates and reads clips of its length, with the rest of
    the world's options kept."""
    facts = {"world": {"height": 32, "width": 32, "num_frames": 17, "fps": 8.0, "motion": "varied"}}
    world = se.make_world(facts, {"train_shape": {"num_frames": 9, "height": 32, "width": 32}})
    assert (world.num_frames, world.height, world.width, world.fps, world.motion) == (9, 32, 32, 8.0, "straight")
    assert se.make_world(facts, {}).num_frames == 17  # no train shape recorded: the source clips'
