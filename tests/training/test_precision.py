"""Dtypes at model boundaries (the unit layer under test_precision_matrix.py).

DeepSpeed's bf16 mode casts every parameter of the module it trains to bf16 and runs it with
no autocast; frozen parts must keep their own dtype, and everything made inside a step must
meet the dtype of the weights it reaches.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from sora_train.diffusion import FlowMatching
from sora_train.models.dit import build_dit
from sora_train.models.text import TinyTextEncoder
from sora_train.models.vae import build_vae
from sora_train.training.dit_module import DiTModule
from sora_train.utils.errors import SoraError
from sora_train.utils.precision import module_dtype, parse_dtype


def _module(**kwargs) -> DiTModule:
    torch.manual_seed(0)
    vae = build_vae("debug")
    text = TinyTextEncoder(dim=32, depth=1, num_heads=2, trainable=kwargs.pop("trainable_text", False))
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    with torch.no_grad():  # leave adaLN-Zero: a zero output at init would hide any dtype error in the loss
        for p in dit.parameters():
            if not p.abs().max() > 0:
                p.normal_(0.0, 0.05)
    return DiTModule(dit=dit, text_encoder=text, flow=FlowMatching(), optimizer=torch.optim.AdamW, vae=vae, caption_dropout=0.0, **kwargs)


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"video": torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1, "caption": ["a red circle moving left", "a blue square moving up"]}


def _loss(module: DiTModule) -> torch.Tensor:
    torch.manual_seed(3)
    return module.diffusion_loss(_batch())["loss"]


def test_frozen_parts_are_not_submodules_and_keep_their_dtype():
    module = _module()
    names = {n for n, _ in module.named_children()}
    assert "vae" not in names and "text_encoder" not in names  # no strategy casts, shards or checkpoints them
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in module.state_dict())
    module.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the module it trains
    assert module_dtype(module.dit) == torch.bfloat16
    assert module_dtype(module.vae) == torch.float32 and module_dtype(module.text_encoder) == torch.float32


def test_a_trainable_text_encoder_is_trained_and_cast_with_the_dit():
    module = _module(trainable_text=True)
    assert "text_encoder" in {n for n, _ in module.named_children()}
    module.freeze_text_encoder()  # LoRA runs freeze it after construction
    assert "text_encoder" not in {n for n, _ in module.named_children()}
    assert not any(p.requires_grad for p in module.text_encoder.parameters())


def test_bf16_weights_without_autocast_give_the_fp32_loss_to_tolerance():
    module = _module()
    loss32 = _loss(module).detach()
    module.to(torch.bfloat16)  # DiT in bf16, no autocast: inputs must be cast at its boundary
    loss16 = _loss(module)
    assert loss16.dtype == torch.float32  # the loss is computed in fp32
    rel = float((loss16.detach() - loss32).abs() / loss32)
    assert 0 < rel < 0.03, (float(loss32), float(loss16))  # bf16 really ran, and agrees to ~3 digits


def test_vae_dtype_option_runs_the_frozen_vae_in_bf16():
    module = _module(vae_dtype="bfloat16")
    module.place_frozen("cpu")
    assert module_dtype(module.vae) == torch.bfloat16
    latents = module.encode_video(_batch())
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    with pytest.raises(SoraError, match="task.vae_dtype='fp16'"):
        _module(vae_dtype="fp16")
    assert parse_dtype("bf16") is torch.bfloat16


def test_old_checkpoints_with_frozen_weights_still_load():
    module = _module()
    state = {**module.state_dict(), **{f"vae.{k}": v for k, v in module.vae.state_dict().items()}}
    checkpoint = {"state_dict": state}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: the frozen keys were dropped


def test_trainer_gpu_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from cli_runs import BIN, ROOT, base_env

    r = subprocess.run([str(BIN / "sora-train"), "experiment=pretrain_100M", f"data.train_shards={tmp_path}/shards", f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=base_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0] and "trainer=cpu" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_bf16_ema_resumes_from_its_fp32_shadow_exactly():
    """The fp32 average of a bf16 EMA is saved with the callback's state and restored: 5 + 5
    updates across a save/restore equal 10 uninterrupted ones, bit for bit; restarting the
    average from the bf16 weights instead would not."""
    import copy
    from types import SimpleNamespace

    from sora_train.training.callbacks.ema import EMA

    def fresh():
        torch.manual_seed(0)
        dit = torch.nn.Linear(16, 16).to(torch.bfloat16)
        return SimpleNamespace(dit=dit, ema=copy.deepcopy(dit).requires_grad_(False))

    def steps(module, cb, a, b):
        for step in range(a, b):
            g = torch.Generator().manual_seed(step)
            with torch.no_grad():  # what an optimizer step does to the bf16 weights
                for p in module.dit.parameters():
                    p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
            cb.on_train_batch_end(SimpleNamespace(global_step=step + 1, accumulate_grad_batches=1), module, None, None, step)

    whole, m_whole = EMA(decay=0.999, warmup=False), fresh()
    steps(m_whole, whole, 0, 10)

    m, first = fresh(), EMA(decay=0.999, warmup=False)
    steps(m, first, 0, 5)
    state = first.state_dict()  # what a checkpoint holds (with the module's bf16 weights)
    assert state["fp32_shadow"] and all(v.dtype == torch.float32 for v in state["fp32_shadow"].values())
    saved = copy.deepcopy(m)
    resumed = EMA(decay=0.999, warmup=False)
    resumed.load_state_dict(state)
    steps(m, resumed, 5, 10)
    assert all(torch.equal(resumed._shadow[k], whole._shadow[k]) for k in whole._shadow)
    assert all(torch.equal(a, b) for a, b in zip(m.ema.parameters(), m_whole.ema.parameters()))

    restarted = EMA(decay=0.999, warmup=False)  # no shadow restored: the average restarts from bf16
    steps(saved, restarted, 5, 10)
    assert not all(torch.equal(restarted._shadow[k], whole._shadow[k]) for k in whole._shadow)
