"""End to end through the real command-line entry points, in subprocesses, on tiny models:
train -> checkpoint -> resume -> export -> sample in every mode; and the demo chain."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sora_train.data.video_io import decode_video, read_container_metadata

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env_extra: dict | None = None, timeout: int = 600, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": f"{BIN}:{os.environ['PATH']}", **(env_extra or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    run_dir, data = base / "run", base / "data"
    run([str(BIN / "sora-train"), "experiment=smoke", f"hydra.run.dir={run_dir}", f"paths.data_dir={data}"])
    return run_dir, data


def _decodes(path: Path) -> np.ndarray:
    frames = decode_video(path.read_bytes())
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.shape[0] >= 1
    return frames


@pytest.mark.slow
def test_train_writes_checkpoints_plots_samples_and_export(smoke_run):
    run_dir, _ = smoke_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step=00000004.ckpt" in ckpts and "last.ckpt" in ckpts
    assert not [c for c in ckpts if c.endswith(".partial")]
    from PIL import Image

    assert Image.open(run_dir / "plots" / "loss.png").size[0] > 100
    history = json.loads((run_dir / "plots" / "loss_history.json").read_text())
    assert len(history["train/loss"]) >= 3
    samples = sorted((run_dir / "samples").rglob("*.mp4"))
    assert samples and _decodes(samples[0]).shape[1:3] == (32, 32)
    spec = json.loads((run_dir / "export" / "model.json").read_text())
    assert set(spec["parts"]) >= {"vae", "text", "dit", "ema"}


@pytest.mark.slow
def test_resume_auto_continues_from_the_newest_checkpoint(smoke_run, tmp_path):
    run_dir, data = smoke_run
    p = run([str(BIN / "sora-train"), "experiment=smoke", f"hydra.run.dir={run_dir}", f"paths.data_dir={data}", "resume=auto", "trainer.max_steps=6",
             "callbacks.samples=null", "export=false"])
    assert "resuming from" in (p.stdout + p.stderr)
    assert (run_dir / "checkpoints" / "step=00000006.ckpt").exists()
    history = json.loads((run_dir / "plots" / "loss_history.json").read_text())
    steps = [s for s, _ in history["train/loss"]]
    assert steps == sorted(set(steps)) and max(steps) == 6  # one continuous curve


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["t2v", "image", "extend", "extend_backward", "interpolate", "edit"])
def test_sample_every_mode_writes_a_tagged_video(smoke_run, tmp_path, mode):
    from sora_train.data.video_io import encode_image, encode_video

    run_dir, _ = smoke_run
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:16, 8:16] = (235, 40, 40)
    (tmp_path / "a.png").write_bytes(encode_image(img))
    (tmp_path / "b.png").write_bytes(encode_image(img[::-1].copy()))
    clip = np.repeat(img[None], 9, axis=0)
    (tmp_path / "clip.mp4").write_bytes(encode_video(clip, 8))
    extra = {
        "t2v": ["--shift", "2.5"],
        "image": ["--image", str(tmp_path / "a.png")],
        "extend": ["--extend", str(tmp_path / "clip.mp4")],
        "extend_backward": ["--extend", str(tmp_path / "clip.mp4"), "--backward"],
        "interpolate": ["--interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png")],
        "edit": ["--edit", str(tmp_path / "clip.mp4"), "--strength", "0.5"],
    }[mode]
    out = tmp_path / "out"
    run([str(BIN / "sora-sample"), "--ckpt", str(run_dir / "export"), "--prompt", "a small red circle moving left", "--frames", "9",
         "--height", "32", "--width", "48", "--steps", "2", "--guidance", "2.0", "--out", str(out), "--rewriter", "template"] + extra)
    (video,) = sorted(out.glob("*.mp4"))
    frames = _decodes(video)
    if mode.startswith("extend"):
        assert frames.shape[0] > 9  # the given clip joined with the new frames
    else:
        assert frames.shape[0] == 9
    assert frames.shape[1:3] == (32, 48)
    meta = read_container_metadata(video.read_bytes())
    assert meta["comment"].startswith("AI-generated")
    info = json.loads(meta["description"])
    assert info["prompt"] == "a small red circle moving left"
    assert len(info["prompt_expanded"].split()) > len(info["prompt"].split())  # re-writer expanded it
    assert len(info["model_sha256"]) == 64
    if mode == "t2v":
        assert info["shift"] == 2.5  # the sampler's step spacing, as asked
    assert (out / video.name.replace(".mp4", ".png")).exists()


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    p = run([str(BIN / "sora-train"), "experiment=smoke", "trainer.max_stepz=1"], ok=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "max_stepz" in p.stderr
    p = run([str(BIN / "sora-train"), "experiment=smoke", "data.train_shards=/nonexistent/x.tar", "data.prepare=null", f"hydra.run.dir={tmp_path}"], ok=False)
    assert p.returncode == 2 and "error: data path not found: /nonexistent/x.tar" in p.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text('{"shards": [{"name": "shard-000000.tar", "count": 1}]}')
    (bad / "shard-000000.tar").write_bytes(b"this is not a tar file at all" * 100)
    p = run([str(BIN / "sora-train"), "experiment=smoke", f"data.train_shards={bad}", "data.val_shards=null", "data.prepare=null", "data.max_skip_rate=0.0",
             f"hydra.run.dir={tmp_path / 'r'}"], ok=False)
    assert p.returncode != 0 and "error:" in p.stderr and "shard" in p.stderr.lower()
    p = run([str(BIN / "sora-sample"), "--ckpt", str(tmp_path), "--prompt", "x"], ok=False)
    assert p.returncode == 2 and "not a sora_train export" in p.stderr


@pytest.mark.slow
def test_demo_chain_at_the_smallest_size(tmp_path):
    """`make demo`'s script, shortened: shards generated, VAE and DiT trained, samples + PNG, and
    the export scored by sora-eval shapes against make demo's targets, ending in one line."""
    env = {"SORA_DEMO_DIR": str(tmp_path / "demo"), "SORA_DATA_DIR": str(tmp_path / "data"), "SORA_DEMO_EVAL_COMBOS": "4",
           "SORA_DEMO_VAE_ARGS": "data.prepare.num_train=64 data.prepare.num_val=16"}
    p = run(["bash", "launch/demo.sh", "trainer.max_steps=2", "diffusion.sampler.steps=2", "logger=csv", "latent_stats_batches=1"],
            env_extra=env, timeout=900)
    demo = tmp_path / "demo"
    report = json.loads((demo / "eval_shapes" / "report.json").read_text())
    assert set(report["targets"]) == {"seen colour accuracy", "seen shape accuracy", "seen direction accuracy"}
    assert report["t2v"]["seen"]["n"] == 4 and "i2v" not in report
    assert re.search(r"shapes eval \(step 2\): seen colour [\d.]+%, shape [\d.]+%, direction [\d.]+%.*demo targets met \d/3", p.stdout), p.stdout[-2000:]
    assert (demo / "eval_shapes" / "samples.png").is_file()
    videos = sorted((demo / "samples").glob("*.mp4"))
    assert len(videos) >= 4
    for v in videos:
        assert _decodes(v).shape == (5, 32, 32, 3)  # the demo's DiT makes 5-frame clips (2 fps)
    latents = json.loads((demo / "latents" / "train" / "index.json").read_text())
    assert latents["num_samples"] == 64 and latents["shape_histogram"] == {"5x32x32": 64}
    # make demo's own world (larger objects) under its own data directory, and scored on it
    world = latents["source_options"]["world"]
    assert (tmp_path / "data" / "shapes_demo" / "train" / "index.json").is_file() and world["large_radius"] == [0.235, 0.26]
    assert report["settings"]["world"]["large_radius"] == [0.235, 0.26]
    from PIL import Image

    with Image.open(demo / "loss_curves.png") as im:
        im.load()
        assert im.size[0] > 100


@pytest.mark.slow
def test_lora_finetune_starts_from_an_export(smoke_run, tmp_path):
    """Job 2: a new run initialised from a previous run's export (safetensors, no pickle), with
    LoRA adapters; its export is a plain DiT with the adapters folded in, plus the adapters."""
    import torch
    from safetensors.torch import load_file

    from sora_train.models.export import load_parts

    run_dir, data = smoke_run
    p = run([str(BIN / "sora-train"), "experiment=smoke", f"hydra.run.dir={tmp_path / 'ft'}", f"paths.data_dir={data}",
             f"init_from={run_dir / 'export'}", f"vae_ckpt={run_dir / 'export'}", "trainer.max_steps=2", "callbacks.samples=null",
             "lora={rank: 4}", "optimizer.lr=1e-2"])
    out = p.stdout + p.stderr
    assert "initialised from" in out and "LoRA rank 4" in out
    export = tmp_path / "ft" / "export"
    adapter = load_file(str(export / "adapter.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    base, _ = load_parts(run_dir / "export", ["ema", "dit"])
    tuned, meta = load_parts(export, ["dit", "text"])
    assert meta["lora"]["rank"] == 4
    start = (base.get("ema") or base["dit"]).state_dict()
    after = tuned["dit"].state_dict()
    assert set(after) == set(start)  # a plain DiT: no adapter keys left
    changed = {k for k in start if not torch.equal(after[k], start[k])}
    assert changed and all(".attn." in k or ".cross_attn." in k or ".mlp." in k for k in changed), changed


@pytest.mark.slow
def test_sample_is_signed_watermarked_and_scrubbed(smoke_run, tmp_path):
    """sora-sample at 256x256 with a signing identity in the environment: the video verifies
    (sora-eval provenance exits 0), carries the watermark with the model's id, and the prompt's
    e-mail address is in neither the manifest nor the container metadata nor samples.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("provenance_helpers", ROOT / "tests" / "provenance" / "provenance_helpers.py")
    helpers = sys.modules.setdefault("provenance_helpers", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(helpers)
    pki = helpers.make_pki(tmp_path / "pki")
    run_dir, _ = smoke_run
    # The samples written during training went the same way: labelled (32x32: no watermark).
    trained = sorted((run_dir / "samples").rglob("*.mp4"))[0]
    assert read_container_metadata(trained.read_bytes())["comment"].startswith("AI-generated")
    out = tmp_path / "out"
    env = {"SORA_C2PA_CERT": str(pki.cert), "SORA_C2PA_KEY": str(pki.key)}
    p = run([str(BIN / "sora-sample"), "--ckpt", str(run_dir / "export"), "--prompt", "a red circle, by jane@example.com", "--frames", "5",
             "--height", "256", "--width", "256", "--steps", "1", "--guidance", "1.0", "--out", str(out)], env_extra=env)
    assert "not C2PA-signed" not in p.stderr
    (video,) = sorted(out.glob("*.mp4"))
    info = json.loads(read_container_metadata(video.read_bytes())["description"])
    assert info["prompt"] == "a red circle, by [email]" and "jane@" not in (out / "samples.json").read_text()
    v = run([str(BIN / "sora-eval"), "provenance", str(video), str(video.with_suffix(".png")), "--trust", str(pki.ca), "--json"])
    reports = [json.loads(line) for line in v.stdout.splitlines()]
    assert [r["verdict"] for r in reports] == ["ours", "ours"]
    m, w = reports[0]["manifest"], reports[0]["watermark"]
    assert m["trusted"] and m["claims"]["prompt"] == "a red circle, by [email]" and m["claims"]["steps"] == 1
    assert w["present"] and w["model_id"] == info["model_sha256"][:6]
    # Without the identity: still written, one warning line.
    p = run([str(BIN / "sora-sample"), "--ckpt", str(run_dir / "export"), "--prompt", "x", "--frames", "5", "--steps", "1", "--out", str(tmp_path / "unsigned")],
            env_extra={"SORA_C2PA_CERT": str(pki.expired_cert), "SORA_C2PA_KEY": str(pki.expired_key)})
    assert sorted((tmp_path / "unsigned").glob("*.mp4")) and p.stderr.count("expired on") == 1
