"""LoRA through peft on the debug DiT: identity at injection, only adapters train, merging is exact."""

from __future__ import annotations

import pytest
import torch

from sora_train.models.dit import DiT, build_dit
from sora_train.models.lora import DIT_TARGETS, add_lora, has_lora, lora_state_dict, merged_copy
from sora_train.utils.errors import SoraError

pytest.importorskip("peft")

C, TEXT_DIM, L = 4, 32, 6


def inputs(B=2, f=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, f, h, w, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    return x, t, text, torch.ones(B, L, dtype=torch.bool)


def trained_base() -> DiT:
    """A debug DiT moved off its zero init, so every branch contributes."""
    torch.manual_seed(0)
    model = build_dit("debug", in_channels=C, text_dim=TEXT_DIM)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_injection_keeps_the_function_and_freezes_the_base():
    model = trained_base()
    x, t, text, mask = inputs()
    with torch.no_grad():
        before = model(x, t, text, mask)
    settings = add_lora(model, rank=4)
    assert settings == {"rank": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": list(DIT_TARGETS)}
    assert has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, mask), before, rtol=0, atol=0)  # B starts at 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every targeted Linear of every block has an adapter; embedders and modulation have none
    per_block = {n.split(".", 2)[2].rsplit(".lora_", 1)[0] for n in trainable}
    assert per_block == set(DIT_TARGETS)
    assert len(trainable) == 2 * len(DIT_TARGETS) * model.depth


def test_training_moves_only_adapters_and_the_merged_copy_is_the_same_function():
    model = trained_base()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t, text, mask = inputs()
    for _ in range(3):
        opt.zero_grad()
        (model(x, t, text, mask) - x).pow(2).mean().backward()
        opt.step()
    for k, v in model.state_dict().items():  # base weights untouched
        if ".lora_" not in k:
            torch.testing.assert_close(v, frozen[k.replace(".base_layer.", ".")], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if ".lora_B." in k)

    plain = merged_copy(model)
    assert type(plain) is DiT and not has_lora(plain) and plain.config() == model.config()
    assert set(plain.state_dict()) == set(frozen)  # loads where a never-adapted DiT loads
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, text, mask), model.eval()(x, t, text, mask), rtol=1e-5, atol=1e-5)
        changed = [k for k in frozen if not torch.equal(plain.state_dict()[k], frozen[k])]
    assert changed and all(any(k.endswith(f"{t}.weight") for t in DIT_TARGETS) for k in changed)


def test_bad_settings_are_named():
    with pytest.raises(SoraError, match="target_modules"):
        add_lora(trained_base(), rank=4, target_modules=["attn.qkvv"])
    with pytest.raises(SoraError, match="rank"):
        add_lora(trained_base(), rank=0)
