"""Wan2.1 as a base model: the adapter runs diffusers' transformer as it is, and our sampler
reproduces diffusers' WanPipeline on a tiny random Wan folder (written here; nothing is
downloaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sora_train.diffusion.samplers import sample, timestep_schedule  # noqa: E402
from sora_train.models.dit.wan import WanDiT, load_wan_dit  # noqa: E402
from sora_train.models.dit.wan_debug import TINY_TEXT_LEN, write_tiny_wan  # noqa: E402
from sora_train.models.text.umt5 import WanTextEncoder  # noqa: E402
from sora_train.models.vae.pretrained import load_pretrained_vae  # noqa: E402
from sora_train.utils.errors import SoraError  # noqa: E402

PROMPT, NEGATIVE = "a red ball rolls left", "blurry low quality"
SHIFT, STEPS, GUIDANCE = 3.0, 4, 5.0
F_, H_, W_ = 5, 32, 32  # pixels: 2 x 4 x 4 latents of 16 channels


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return write_tiny_wan(tmp_path_factory.mktemp("tiny_wan") / "Wan2.1-T2V-tiny-Diffusers", shift=SHIFT)


def ours(wan_dir: Path):
    dit = load_wan_dit(str(wan_dir), text_len=TINY_TEXT_LEN).eval()
    text = WanTextEncoder(str(wan_dir), max_length=TINY_TEXT_LEN)
    vae = load_pretrained_vae(str(wan_dir))
    return dit, text, vae


def reference(wan_dir: Path):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(wan_dir), local_files_only=True)


def test_schedule_is_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift, steps in ((1.0, 4), (3.0, 7), (5.0, 50)):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)
        assert torch.equal(timestep_schedule(steps, shift, schedule="flow_match_euler"), sched.sigmas)
    with pytest.raises(SoraError, match="schedule"):
        timestep_schedule(4, schedule="karras")


def test_adapter_is_the_transformer(wan_dir):
    dit, text, vae = ours(wan_dir)
    assert dit.patch_size == (1, 2, 2) and dit.in_channels == vae.latent_channels == 16 and dit.text_dim == text.dim
    assert vae.spatial_factor == 8 and vae.temporal_factor == 4
    x, t = torch.randn(2, 16, 2, 4, 4), torch.tensor([0.3, 0.9])
    emb, mask = text([PROMPT, ""])  # (2, L, D): the empty caption has one token (</s>)
    assert mask.sum(1).tolist() == [6, 1]
    padded = torch.zeros(2, TINY_TEXT_LEN, dit.text_dim)
    padded[:, : emb.shape[1]] = emb * mask[..., None]
    with torch.no_grad():
        want = dit.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=padded, return_dict=False)[0]
        got = dit(x, t, emb, mask)
        # padding beyond the captions' lengths is invisible, whatever its values
        longer = torch.cat([emb, torch.randn(2, 3, dit.text_dim)], 1), torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
        got_longer = dit(x, t, *longer)
    assert torch.equal(got, want) and torch.equal(got_longer, want)
    assert dit.flops_per_step(32) > 0 and dit.num_params() == sum(p.numel() for p in dit.transformer.parameters())
    with pytest.raises(SoraError, match="context frames"):
        dit(x, t, emb, mask, cond_mask=torch.ones(2, 2, dtype=torch.bool))


def test_exported_config_rebuilds_the_architecture(wan_dir):
    dit, _, _ = ours(wan_dir)
    cfg = json.loads(json.dumps(dit.config()))
    again = WanDiT(**cfg)
    again.load_state_dict(dit.state_dict())
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([0.5])
    text, mask = torch.randn(1, 3, dit.text_dim), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(again.eval()(x, t, text, mask), dit(x, t, text, mask))


def our_latents(wan_dir: Path, noise: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    dit, text, _ = ours(wan_dir)
    cond, uncond = text([PROMPT]), text([NEGATIVE])

    def model_fn(x, t, guided):
        v = dit(x, t, *cond)
        return (v, dit(x, t, *uncond)) if guided else v

    return sample(model_fn, noise, steps=STEPS, shift=SHIFT, guidance_scale=GUIDANCE, schedule="flow_match_euler")


def test_sampler_parity_with_wan_pipeline(wan_dir):
    """Same noise, prompt, negative prompt, steps, shift and guidance: the same latents and video."""
    pipe = reference(wan_dir)
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=F_, height=H_, width=W_, num_inference_steps=STEPS,
              guidance_scale=GUIDANCE, max_sequence_length=TINY_TEXT_LEN, latents=noise.clone())
    want = pipe(**kw, output_type="latent").frames
    got = our_latents(wan_dir, noise)
    diff = (got - want).abs().max().item()
    print(f"Wan parity: max |latent ours - diffusers| = {diff:.3e}")
    assert diff <= 1e-4
    assert (got - noise).abs().max() > 1e-2  # it did sample

    # decoded: WanPipeline's postprocess maps [-1, 1] to [0, 1]
    video_ref = torch.from_numpy(pipe(**kw, output_type="np").frames[0])  # (F, H, W, 3) in [0, 1]
    vae = load_pretrained_vae(str(wan_dir))
    with torch.no_grad():
        video = vae.decode(vae.denormalize(got))[0]  # (3, F, H, W)
    video = ((video.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
    vdiff = (video - video_ref).abs().max().item()
    print(f"Wan parity: max |video ours - diffusers| = {vdiff:.3e}")
    assert video.shape == video_ref.shape and vdiff <= 1e-4


# -- bad input: one line naming the file and what was expected ----------------------------------
def test_bad_folders(wan_dir, tmp_path):
    with pytest.raises(SoraError, match="model_index.json: missing"):
        load_wan_dit(str(tmp_path))
    other = tmp_path / "other"
    shutil.copytree(wan_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "LTXPipeline"}))
    with pytest.raises(SoraError, match=r"model_index.json: a 'LTXPipeline' folder, expected WanPipeline"):
        load_wan_dit(str(other))
    (other / "model_index.json").write_text(json.dumps(index))
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "CogVideoXTransformer3DModel"}))
    with pytest.raises(SoraError, match=r"transformer/config.json: a 'CogVideoXTransformer3DModel', expected WanTransformer3DModel"):
        load_wan_dit(str(other))
    (other / "transformer" / "config.json").write_text(json.dumps(cfg))
    weights = other / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(SoraError, match=r"diffusion_pytorch_model.safetensors: truncated safetensors file"):
        load_wan_dit(str(other))
    weights.unlink()
    torch.save({}, other / "transformer" / "diffusion_pytorch_model.bin")  # a pickle: never read
    with pytest.raises(SoraError, match=r"transformer: only pickled \*.bin weights in the transformer folder; expected \*.safetensors"):
        load_wan_dit(str(other))
    (other / "transformer" / "diffusion_pytorch_model.bin").unlink()
    weights.write_bytes(data)
    shutil.rmtree(other / "tokenizer")
    with pytest.raises(SoraError, match=r"tokenizer: missing tokenizer folder"):
        WanTextEncoder(str(other))


# -- a Wan folder where an export goes ---------------------------------------------------------
def test_video_pipeline_from_wan_folder_matches_wan_pipeline(wan_dir):
    """`sora-sample --ckpt <Wan folder>`'s pipeline: Wan's shift, schedule and text length
    from the folder, the same video as diffusers from the same noise."""
    from sora_train.training.pipeline import VideoPipeline

    pipe = VideoPipeline.from_export(wan_dir)
    assert pipe.flow.sampler_defaults["schedule"] == "flow_match_euler" and pipe.flow.sampling_shift(10**6) == SHIFT
    gen = pipe.generate([PROMPT], F_, H_, W_, steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, seed=3)
    noise = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(3))  # as generate draws it
    want = reference(wan_dir)(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=F_, height=H_, width=W_, num_inference_steps=STEPS,
                              guidance_scale=GUIDANCE, latents=noise, output_type="np").frames[0]
    got = ((gen.video[0] + 1) / 2).permute(1, 2, 3, 0)  # (F, H, W, 3) in [0, 1]
    assert (got - torch.from_numpy(want)).abs().max().item() <= 1e-4


def test_export_records_folder_and_hash_not_weights(wan_dir, tmp_path):
    from safetensors import safe_open

    from sora_train.models.export import export_parts, load_parts

    parts, _ = load_parts(wan_dir)
    out = export_parts(tmp_path / "export", parts, {"task": "dit"}, weights={"vae": False, "text": False})
    spec = json.loads((out / "model.json").read_text())["parts"]
    assert spec["vae"]["target"] == "sora_train.models.vae.pretrained.PretrainedVideoVAE"
    assert spec["vae"]["config"]["path"] == str(wan_dir / "vae") and len(spec["vae"]["config"]["sha256"]) == 64
    assert spec["text"]["target"] == "sora_train.models.text.umt5.WanTextEncoder" and len(spec["text"]["config"]["sha256"]) == 64
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"dit"}
    again, _ = load_parts(out)
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([0.4])
    emb, mask = again["text"]([PROMPT])
    with torch.no_grad():
        assert torch.equal(again["dit"](x, t, emb, mask), parts["dit"](x, t, *parts["text"]([PROMPT])))
        assert torch.equal(again["vae"].decode(x), parts["vae"].decode(x))
    # the recorded folder changed: refused, naming it
    moved = tmp_path / "changed"
    shutil.copytree(wan_dir, moved)
    cfg = json.loads((moved / "vae" / "config.json").read_text())
    (moved / "vae" / "config.json").write_text(json.dumps({**cfg, "latents_std": [1.0] * 16}))
    spec_all = json.loads((out / "model.json").read_text())
    spec_all["parts"]["vae"]["config"]["path"] = str(moved / "vae")
    (out / "model.json").write_text(json.dumps(spec_all))
    with pytest.raises(SoraError, match=r"changed.*vae.*contents changed"):
        load_parts(out, ["vae"])


@pytest.mark.slow
def test_sora_sample_cli_on_wan_folder(wan_dir, tmp_path):
    from sora_train.cli.sample import main

    grad = torch.is_grad_enabled()
    try:
        main(["--ckpt", str(wan_dir), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--frames", "5", "--height", "32", "--width", "32",
              "--steps", "2", "--out", str(tmp_path / "samples")])
    finally:
        torch.set_grad_enabled(grad)  # the CLI switches autograd off for the process
    index = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert len(index) == 1 and Path(index[0]["video"]).is_file()


def test_activation_checkpointing_wraps_the_transformer_blocks(wan_dir):
    """parallel.activation_checkpointing applies to Wan's blocks from outside, same gradients."""
    import copy

    from sora_train.parallel.strategies import apply_parallelism

    dit = load_wan_dit(str(wan_dir), text_len=TINY_TEXT_LEN).train()
    ref = copy.deepcopy(dit)
    apply_parallelism(dit, activation_checkpointing=True)
    assert all(getattr(b, "_sora_checkpointed", False) for b in dit.transformer.blocks)
    x, t = torch.randn(2, 16, 2, 4, 4), torch.tensor([0.3, 0.7])
    text, mask = torch.randn(2, 3, dit.text_dim), torch.ones(2, 3, dtype=torch.bool)
    for m in (dit, ref):
        m(x, t, text, mask).square().mean().backward()
    for a, b in zip(dit.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_a_vae_folder_reads_as_a_vae_export(wan_dir, tmp_path):
    """A bare diffusers VAE folder, and another pipeline's vae/ when only a VAE is asked for."""
    from sora_train.models.export import load_parts

    bare = tmp_path / "vae_only"
    shutil.copytree(wan_dir / "vae", bare)
    parts, meta = load_parts(bare)
    assert set(parts) == {"vae"} and meta["task"] == "vae" and parts["vae"].latent_channels == 16
    other = tmp_path / "ltx_like"
    shutil.copytree(wan_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "SomeOtherPipeline"}))
    assert set(load_parts(other, ["vae"])[0]) == {"vae"}
    with pytest.raises(SoraError, match="supported base models: WanPipeline"):
        load_parts(other, ["dit", "vae"])
