"""Fine-tuning Wan2.1 end to end on a tiny random Wan folder (written here; nothing is
downloaded): footage -> sora-data ingest -> (cache-latents) -> sora-train experiment=wan_lora
-> an export whose LoRA diffusers' WanPipeline loads -> sora-sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CAPTION = "a yellow square moving right"
PROMPT, NEGATIVE = "a red ball rolls left", "blurry low quality"
# A 17x32x32 bucket: 5x4x4 latents of the tiny Wan (4x temporal, 8x spatial), two clips a batch.
BUCKET = "data.buckets=[{num_frames: 17, height: 32, width: 32, batch_size: 2}]"
TRAIN = ["data.tokens_per_batch=null", "data.num_workers=0", "data.val_shards=null", "trainer=cpu", "trainer.max_steps=3",
         "trainer.val_check_interval=null", "logger=csv", "callbacks.progress=null", "callbacks.samples.steps=2",
         f"callbacks.samples.prompts=[{CAPTION}]", "optimizer.lr=3e-2", "lora.rank=4", "lora.alpha=8"]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def write_footage(folder: Path, n: int = 4) -> Path:
    """n 2 s clips of a square moving right, each with a caption file beside it."""
    from sora_train.data.video_io import encode_video

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        frames = np.full((20, 48, 64, 3), (40 * i, 80, 160), np.uint8) + rng.integers(0, 12, (20, 48, 64, 3), dtype=np.uint8)
        for j in range(20):
            frames[j, 16:28, 2 * j : 2 * j + 12] = (250, 240, 40)
        (folder / f"clip{i}.mp4").write_bytes(encode_video(frames, fps=10))
        (folder / f"clip{i}.txt").write_text(CAPTION)
    return folder


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    from sora_train.models.dit.wan_debug import write_tiny_wan

    base = tmp_path_factory.mktemp("wan_ft")
    wan = write_tiny_wan(base / "Wan2.1-T2V-tiny-Diffusers")
    clips = write_footage(base / "clips")
    run([str(BIN / "sora-data"), "ingest", str(clips), "--out", str(base / "shards"), "--workers", "1", "--min-side", "32"])
    return base, wan


@pytest.fixture(scope="module")
def lora_run(footage):
    base, wan = footage
    run_dir = base / "run"
    run([str(BIN / "sora-train"), "experiment=wan_lora", f"pretrained={wan}", f"data.train_shards={base / 'shards'}", BUCKET, *TRAIN,
         f"hydra.run.dir={run_dir}"])
    return run_dir / "export", wan


def latents_of(pipe_call, noise):
    return pipe_call(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                     latents=noise.clone(), output_type="latent").frames


def test_lora_export_loads_into_diffusers_wan_pipeline(lora_run):
    """The LoRA we export, loaded into WanPipeline with load_lora_weights, samples the same
    latents as our merged export (same noise, prompts, steps, shift, guidance)."""
    from diffusers import WanPipeline

    from sora_train.diffusion.samplers import sample
    from sora_train.models.export import load_parts

    export, wan = lora_run
    spec = json.loads((export / "model.json").read_text())
    assert spec["parts"]["vae"]["config"]["sha256"] and spec["parts"]["text"]["config"]["sha256"]  # recorded by path + hash
    assert spec["meta"]["diffusion"]["sampler"]["schedule"] == "flow_match_euler" and spec["meta"]["diffusion"]["base_shift"] == 3.0
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))

    pipe = WanPipeline.from_pretrained(str(wan), local_files_only=True)
    before = latents_of(pipe, noise)
    pipe.load_lora_weights(str(export))  # finds pytorch_lora_weights.safetensors
    theirs = latents_of(pipe, noise)

    parts, _ = load_parts(export, ["dit", "text"])
    dit, text = parts["dit"], parts["text"]
    cond, uncond = text([PROMPT]), text([NEGATIVE])

    def model_fn(x, t, guided):
        v = dit(x, t, *cond)
        return (v, dit(x, t, *uncond)) if guided else v

    ours = sample(model_fn, noise, steps=4, shift=3.0, guidance_scale=5.0, schedule="flow_match_euler")
    diff, effect = (ours - theirs).abs().max().item(), (theirs - before).abs().max().item()
    print(f"Wan LoRA interop: max |ours merged - diffusers + LoRA| = {diff:.3e} (the LoRA moved the latents by {effect:.3e})")
    assert effect > 1e-3  # the fine-tune changed something
    assert diff <= 1e-4


def test_lora_of_another_base_is_refused(lora_run, tmp_path):
    from sora_train.models.dit.wan import WanDiT, load_wan_lora
    from sora_train.utils.errors import SoraError

    export, wan = lora_run
    from sora_train.models.export import load_parts

    dit = load_parts(wan, ["dit"])[0]["dit"]
    load_wan_lora(dit, export / "pytorch_lora_weights.safetensors")  # its own base: fine
    cfg = dit.config()
    cfg["transformer"] = {**cfg["transformer"], "attention_head_dim": 6}
    other = WanDiT(**cfg)
    with pytest.raises(SoraError, match=r"pytorch_lora_weights.safetensors: a LoRA of another base"):
        load_wan_lora(other, export / "pytorch_lora_weights.safetensors")


def test_sora_sample_lora_on_the_base_is_the_merged_export(lora_run, tmp_path):
    """The base + the exported diffusers LoRA (sora-sample --lora) samples what the merged
    export does; a LoRA whose shapes do not fit is one line naming the file."""
    from safetensors.torch import load_file, save_file

    from sora_train.models.dit.wan import load_wan_lora
    from sora_train.training.pipeline import VideoPipeline

    export, wan = lora_run
    lora = export / "pytorch_lora_weights.safetensors"
    base = VideoPipeline.from_export(wan)
    load_wan_lora(base.dit, lora)
    kw = dict(steps=2, guidance_scale=5.0, negative_prompt=NEGATIVE, seed=1)
    a = base.generate([PROMPT], 5, 32, 32, **kw).video
    b = VideoPipeline.from_export(export).generate([PROMPT], 5, 32, 32, **kw).video
    assert (a - b).abs().max().item() <= 1e-4

    bad = load_file(str(lora))
    key = next(k for k in bad if k.endswith("lora_A.weight"))
    bad[key] = bad[key][:, :-1].contiguous()  # trained on a narrower model
    save_file(bad, str(tmp_path / "other.safetensors"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.run([str(BIN / "sora-sample"), "--ckpt", str(wan), "--lora", str(tmp_path / "other.safetensors"), "--prompt", PROMPT,
                        "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--out", str(tmp_path / "s")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "other.safetensors: a LoRA of another base" in last and "Traceback" not in p.stderr


@pytest.mark.slow
def test_wan_finetune_chain_on_cached_latents(footage):
    """ingest -> cache-latents --vae/--text <Wan folder> -> sora-train experiment=wan_lora on the
    latents -> sora-sample of the export and of the Wan folder itself."""
    base, wan = footage
    latents = base / "latents"
    run([str(BIN / "sora-data"), "cache-latents", str(base / "shards"), "--vae", str(wan), "--text", str(wan), "--out", str(latents),
         "--num-frames", "17", "--height", "32", "--width", "32", "--dtype", "float32"])
    index = json.loads((latents / "index.json").read_text())
    assert index["vae_hash"] and index["text_hash"]
    # the run's own VAE and text encoder are always checked against the cache's fingerprints
    from sora_train.data.latents import LatentDataModule
    from sora_train.models.export import load_parts
    from sora_train.models.text.tiny import TinyTextEncoder
    from sora_train.utils.errors import SoraError

    parts, _ = load_parts(wan, ["vae", "text"])
    dm = LatentDataModule(str(latents), batch_size=2, num_workers=0)
    dm.expect_models(parts["vae"], parts["text"])
    dm.setup("fit")  # the parts that made them: accepted
    dm = LatentDataModule(str(latents), batch_size=2, num_workers=0)
    dm.expect_models(parts["vae"], TinyTextEncoder(dim=16, trainable=False))
    with pytest.raises(SoraError, match="text embeddings were made by text encoder"):
        dm.setup("fit")
    run_dir = base / "run_latents"
    p = run([str(BIN / "sora-train"), "experiment=wan_lora", f"pretrained={wan}", f"vae_ckpt={wan}", "data=latents", f"data.train_shards={latents}",
             "data.batch_size=2", *[o for o in TRAIN if not o.startswith("data.tokens")], "data.buckets=null", f"hydra.run.dir={run_dir}"])
    assert "initialised from" in p.stdout + p.stderr
    export = run_dir / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file() and (export / "adapter.safetensors").is_file()
    assert list((run_dir / "samples").rglob("*.mp4"))  # validation samples
    run([str(BIN / "sora-eval"), "vae", "--vae", str(wan), "--shards", str(base / "shards"), "--num-frames", "17", "--height", "32",
         "--width", "32", "--max-samples", "2", "--out", str(base / "eval_vae")])  # the Wan VAE where a VAE export goes
    assert json.loads((base / "eval_vae" / "vae_eval.json").read_text())["vae_hash"] == index["vae_hash"]
    for ckpt in (export, wan):
        out = base / f"samples_{ckpt.name}"
        run([str(BIN / "sora-sample"), "--ckpt", str(ckpt), "--prompt", CAPTION, "--frames", "17", "--height", "32", "--width", "32",
             "--steps", "2", "--out", str(out)])
        assert len(json.loads((out / "samples.json").read_text())) == 1


@pytest.mark.slow
def test_wan_lora_under_zero3_resumes_exactly(footage, tmp_path):
    """ZeRO-3 + activation checkpointing on the Wan LoRA run; stopped at step 2 and resumed
    (resume=auto), it logs the losses of a run never stopped; the export comes from the
    ZeRO checkpoint with the diffusers LoRA beside it."""
    base, wan = footage
    common = ["experiment=wan_lora", f"pretrained={wan}", f"data.train_shards={base / 'shards'}", BUCKET, *TRAIN,
              "strategy=deepspeed_stage_3", "trainer.devices=1", "parallel.activation_checkpointing=true", "callbacks.samples=null",
              "callbacks.checkpoint.every_n_steps=2", "trainer.max_steps=4"]

    def losses(run_dir: Path) -> list:
        history = json.loads((run_dir / "plots" / "loss_history.json").read_text())["train/loss"]
        return [(s, round(v, 6)) for s, v in history]

    run([str(BIN / "sora-train"), *common, f"hydra.run.dir={tmp_path / 'straight'}"])
    stopped = tmp_path / "stopped"
    run([str(BIN / "sora-train"), *common, "trainer.max_steps=2", "export=false", f"hydra.run.dir={stopped}"])
    p = run([str(BIN / "sora-train"), *common, "resume=auto", f"hydra.run.dir={stopped}"])
    assert "resuming from" in p.stdout + p.stderr
    assert losses(stopped) == losses(tmp_path / "straight") and len(losses(stopped)) == 4
    assert (stopped / "export" / "pytorch_lora_weights.safetensors").is_file()
