"""Invariants of the spacetime-patch DiT, on the debug size (CPU, milliseconds per call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sora_train.models.dit import DIT_SIZES, DiT, build_dit
from sora_train.models.dit.dit import apply_rope, grid_positions, normalized_position_features, rope_angles, rope_dims
from sora_train.utils.errors import SoraError

CONF = Path(__file__).resolve().parents[2] / "conf"
C, TEXT_DIM, L = 4, 32, 6


def make(**overrides) -> DiT:
    torch.manual_seed(0)
    return build_dit("debug", in_channels=C, text_dim=TEXT_DIM, **overrides)


def inputs(B=2, f=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, f, h, w, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[0, 4:] = False  # sample 0 has 2 padded tokens
    return x, t, text, text_mask


@torch.no_grad()
def perturb(model: DiT, std=0.05, seed=2) -> DiT:
    """Move every weight off its init (zero-initialised ones included) so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("patch,shape", [((1, 2, 2), (3, 6, 10)), ((2, 2, 2), (4, 6, 10)), ((1, 1, 1), (1, 3, 5))])
def test_patchify_roundtrip(patch, shape):
    model = make(patch_size=patch)
    x = torch.randn(2, 5, *shape)
    tokens, grid = model.patchify(x)
    assert grid == tuple(s // p for s, p in zip(shape, patch))
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], patch[0] * patch[1] * patch[2] * 5)
    # token 0 is the patch at the origin, flattened (p_t, p_h, p_w, C)
    first = x[:, :, : patch[0], : patch[1], : patch[2]].permute(0, 2, 3, 4, 1).reshape(2, -1)
    torch.testing.assert_close(tokens[:, 0], first)
    torch.testing.assert_close(model.unpatchify(tokens, grid), x, rtol=0, atol=0)


@pytest.mark.parametrize("shape,dim", [((3, 4, 4), "f=3"), ((4, 5, 4), "h=5"), ((4, 4, 7), "w=7")])
def test_shape_errors_name_the_dim(shape, dim):
    model = make(patch_size=(2, 2, 2))
    x, t, text, mask = inputs(f=shape[0], h=shape[1], w=shape[2])
    with pytest.raises(SoraError, match=dim):
        model(x, t, text, mask)
    with pytest.raises(SoraError, match=dim):
        model.patchify(x)


def test_input_errors():
    model = make()
    x, t, text, mask = inputs()
    with pytest.raises(SoraError, match="in_channels"):
        model(torch.cat([x, x], 1), t, text, mask)
    with pytest.raises(SoraError, match="cond_mask"):
        model(x, t, text, mask, cond_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(SoraError, match="text_dim"):
        model(x, t, text[..., :8], mask)
    with pytest.raises(SoraError, match="size"):
        build_dit("huge", C, TEXT_DIM)
    with pytest.raises(SoraError, match="hidden_sise"):
        build_dit("debug", C, TEXT_DIM, hidden_sise=3)
    with pytest.raises(SoraError, match="num_heads"):
        build_dit("debug", C, TEXT_DIM, num_heads=3)
    with pytest.raises(SoraError, match="modulation"):
        build_dit("debug", C, TEXT_DIM, modulation="global")


MODULATIONS = ["per_block", "shared"]
# Every architecture variant the whole-model invariants below run on.
VARIANTS = [dict(modulation="per_block"), dict(modulation="shared"), dict(normalized_positions=True),
            dict(rope_scale=(1.0, 0.5, 0.5))]


@torch.no_grad()
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_adaln_zero_identity_at_init(modulation):
    model = make(modulation=modulation)
    x, t, text, mask = inputs()
    B, N, D = 2, 3 * 2 * 3, model.hidden_size
    h = torch.randn(B, N, D)
    c = torch.randn(B, D)  # SiLU(conditioning); shared modulation projects it once for all blocks
    c = c if modulation == "per_block" else model.shared_modulation(c)
    context = torch.randn(B, L, D)
    rope = rope_angles(grid_positions((3, 2, 3)), model.head_dim)
    for block in model.blocks:
        torch.testing.assert_close(block(h, c, context, mask[:, None, None, :], rope), h, rtol=0, atol=0)
    cond = torch.tensor([[True, False, False], [False, False, True]])
    assert model(x, t, text, mask, cond).abs().max() == 0


def test_rope_is_relative_and_any_shape():
    head_dim, N = 32, 20
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, N, head_dim, generator=g).unbind(0)
    pos = torch.randint(0, 50, (N, 3), generator=g).float()

    def scores(positions):
        cos, sin = rope_angles(positions, head_dim)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T  # (N, N)

    torch.testing.assert_close(scores(pos + torch.tensor([7.0, -3.0, 11.0])), scores(pos), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(pos * 2), scores(pos), atol=1e-3)  # positions do matter
    # grids the model never saw: shapes follow the input, values stay finite
    model = perturb(make()).eval()
    for f, h, w in [(1, 2, 2), (5, 4, 6), (2, 12, 2), (9, 8, 8)]:
        x, t, text, mask = inputs(f=f, h=h, w=w)
        with torch.no_grad():
            out = model(x, t, text, mask)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_normalized_positions_span_every_shape():
    """u is 0 at the first frame and the top / left edge's cell, 1 at the last frame and the
    bottom / right edge's, at every grid: a 2:1 frame's edges look like a square frame's."""
    for grid in [(5, 4, 4), (9, 4, 8), (1, 6, 4)]:
        f = normalized_position_features(grid)  # (N, 24): sin(pi 2^k u) then cos, per axis
        assert f.shape == (grid[0] * grid[1] * grid[2], 24)
        cos_pi_u = f.reshape(-1, 3, 8)[:, :, 4]  # cos(pi u) per axis: 1 at u=0, -1 at u=1
        u = torch.arccos(cos_pi_u.clamp(-1, 1)) / torch.pi  # (N, 3)
        t, h, w = (u[:, a].reshape(grid) for a in range(3))
        assert t[0].max() == 0 and (t[-1].min() == 1 or grid[0] == 1)
        torch.testing.assert_close(h[0, 0, 0], torch.tensor(0.5 / grid[1]))
        torch.testing.assert_close(w[0, 0, -1], torch.tensor(1 - 0.5 / grid[2]))
    # frames of two widths: the top-left token has the same t and h features, and its u_w is
    # the centre of a cell 1/4 or 1/8 of the width across
    a, b = normalized_position_features((1, 4, 4)), normalized_position_features((1, 4, 8))
    assert not torch.allclose(a[0], b[0])  # u_w: 1/8 vs 1/16 (cell centres)
    torch.testing.assert_close(a[0, :16], b[0, :16])  # t and h agree


def test_rope_scale_stretches_the_period_past_the_grid():
    """RoPE's fastest pair turns 1 rad per token (period 2 pi ~ 6.3 tokens): at the default
    scale a token 6 tokens away is, to that pair, 0.28 rad from the token itself, nearer than
    a neighbour at 1. With rope_scale 0.5 no distance within a 12-token extent (up to 11) comes
    closer than the neighbour: twice the 6-token frames the native-shape model trains on."""
    head_dim = 64
    d_t, d_h, _ = rope_dims(head_dim)
    w_first = d_t // 2 + d_h // 2  # the width axis's fastest pair
    for scale, aliased in [(1.0, True), (0.5, False)]:
        dist = torch.arange(12.0)
        positions = torch.stack([torch.zeros(12), torch.zeros(12), dist * scale], dim=-1)  # (12, 3)
        cos, sin = rope_angles(positions, head_dim)
        turn = torch.atan2(sin[:, w_first], cos[:, w_first]).abs()  # angle to distance 0, wrapped to [0, pi]
        assert turn[1] == pytest.approx(scale, abs=1e-5)
        near = turn[2:] < turn[1]  # distances >= 2 that look nearer than the neighbour
        assert bool(near[4].item() if aliased else near.any()) == aliased  # distance 6


@torch.no_grad()
def test_rope_scale_acts_per_axis_and_defaults_to_the_old_model():
    plain = perturb(make())
    for scale in [(1.0, 1.0, 1.0), [1, 1, 1]]:  # explicit ones, or a list from a config: the same model
        same = make(rope_scale=scale)
        same.load_state_dict(plain.state_dict())
        x, t, text, mask = inputs(f=3, h=4, w=8)
        torch.testing.assert_close(same(x, t, text, mask), plain(x, t, text, mask), rtol=0, atol=0)
    spatial = make(rope_scale=(1.0, 0.5, 0.5))
    spatial.load_state_dict(plain.state_dict())
    x, t, text, mask = inputs(f=3, h=4, w=8)
    assert not torch.allclose(spatial(x, t, text, mask), plain(x, t, text, mask), atol=1e-4)
    x, t, text, mask = inputs(f=5, h=2, w=2)  # one token per frame: no spatial distance to scale
    torch.testing.assert_close(spatial(x, t, text, mask), plain(x, t, text, mask), rtol=0, atol=1e-6)
    assert "rope_scale" in plain.config() and DiT(**{k: v for k, v in plain.config().items() if k != "rope_scale"}).rope_scale == [1.0] * 3
    for bad in [(1.0, 0.5), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), "wide", "111"]:
        with pytest.raises(SoraError, match="rope_scale"):
            make(rope_scale=bad)


@torch.no_grad()
def test_normalized_positions_start_as_the_model_without_them():
    """The position MLP's output layer starts at zero: a model gaining it computes what it did,
    and once trained (perturbed) the output depends on where a token sits in the frame."""
    plain = perturb(make())
    cued = make(normalized_positions=True)
    missing, unexpected = cued.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("position_embedder.") for k in missing)
    x, t, text, mask = inputs(f=3, h=4, w=8)
    torch.testing.assert_close(cued(x, t, text, mask), plain(x, t, text, mask), rtol=0, atol=0)
    perturb(cued.position_embedder)
    assert not torch.allclose(cued(x, t, text, mask), plain(x, t, text, mask), atol=1e-4)


@torch.no_grad()
def test_padded_text_tokens_are_ignored():
    model = perturb(make()).eval()
    x, t, text, mask = inputs()
    text2 = text.clone()
    text2[0, 4:] = torch.randn(2, TEXT_DIM) * 10  # padded positions of sample 0
    torch.testing.assert_close(model(x, t, text2, mask), model(x, t, text, mask))
    text2[0, :4] += 1  # real tokens do matter
    assert not torch.allclose(model(x, t, text2, mask)[0], model(x, t, text, mask)[0])
    empty = mask.clone()
    empty[1] = False  # contract violation: must not produce NaN
    assert torch.isfinite(model(x, t, text, empty)).all()


@torch.no_grad()
def test_cond_mask_changes_output_only_when_model_nonzero():
    model = make().eval()
    x, t, text, mask = inputs()
    cond = torch.zeros(2, 3, dtype=torch.bool)
    cond[:, 0] = True
    assert model(x, t, text, mask, cond).abs().max() == 0
    perturb(model)
    torch.testing.assert_close(model(x, t, text, mask, None), model(x, t, text, mask, torch.zeros_like(cond)))
    assert not torch.allclose(model(x, t, text, mask, cond), model(x, t, text, mask, None))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = make(**variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, text, mask = inputs()
    cond = torch.tensor([[True, False, False], [False, False, False]])
    for _ in range(3):
        opt.zero_grad()
        (model(x, t, text, mask, cond) - x).pow(2).mean().backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_activation_checkpointing_is_exact(modulation):
    from sora_train.parallel.strategies import apply_parallelism

    base = perturb(make(modulation=modulation))
    ckpt = apply_parallelism(make(modulation=modulation), activation_checkpointing=True)
    ckpt.load_state_dict(base.state_dict())
    x, t, text, mask = inputs()
    outs, grads = [], []
    for model in (base, ckpt):
        out = model(x, t, text, mask)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_roundtrip(variant):
    model = make(patch_size=(2, 2, 2), out_channels=8, **variant)
    cfg = json.loads(json.dumps(model.config()))
    clone = DiT(**cfg)
    assert clone.config() == model.config() and clone.num_params() == model.num_params()
    assert model.num_params(exclude_embeddings=True) < model.num_params()


@pytest.mark.parametrize("size,nominal", [("100M", 100e6), ("1B", 1e9), ("3B", 3e9)])
def test_param_counts_on_meta(size, nominal):
    with torch.device("meta"):
        model = build_dit(size, in_channels=16, text_dim=4096)
    assert abs(model.num_params() - nominal) / nominal < 0.35, model.num_params()


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_match_flop_counter(variant):
    model = make(**variant)
    x, t, text, mask = inputs(f=3, h=4, w=6)
    N, B, D = 3 * 2 * 3, x.shape[0], model.hidden_size
    # The counter sees every Linear but not the CPU flash-attention kernel: add QK^T and AV
    # of self- and cross-attention by hand (4N^2D + 4NLD per block, x3 for training).
    attention = model.depth * (4 * N * N * D + 4 * N * L * D)
    # The counter does see the normalized-position MLP, which runs once per batch (on the
    # grid) and flops_per_step leaves out: take its share per sample off the counter's side.
    if model.position_embedder is not None:
        attention -= (2 * N * 24 * D + 2 * N * D * D) / B
    with FlopCounterMode(display=False) as counter:
        model(x, t, text, mask)
    fwd = counter.get_total_flops() / B + attention
    assert model.flops_per_step(N, L, training=False) == pytest.approx(fwd, rel=0.01)
    with FlopCounterMode(display=False) as counter:
        model(x, t, text, mask).sum().backward()
    train = counter.get_total_flops() / B + 3 * attention
    assert model.flops_per_step(N, L, training=True) == pytest.approx(train, rel=0.05)


def test_flops_close_to_6_params_tokens():
    with torch.device("meta"):
        model = build_dit("100M", in_channels=16, text_dim=4096)
    N = 256  # attention (4N^2 D) is small next to the matmuls (~56 N D^2)
    ratio = model.flops_per_step(N, text_len=8) / (6 * model.num_params() * N)
    # The shared adaLN projection and the text embedders act per sample, not per token, so
    # model FLOPs sit somewhat below 6 * params * tokens.
    assert 0.6 < ratio < 1.05, ratio
    assert model.flops_per_step(4 * N, 8) > 4 * model.flops_per_step(N, 8)  # attention is quadratic


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_dit_configs_instantiate(size):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+dit={size}"])
    with torch.device("meta"):
        model = instantiate(cfg.dit)(in_channels=16, text_dim=4096)
    assert isinstance(model, DiT)
    assert cfg.dit.size == size


def test_every_size_has_a_conf_file():
    """A size lives in DIT_SIZES alone: each conf/dit option names one size, its own file name
    (test_dit_configs_instantiate checks the name), and every size has an option."""
    assert {p.stem for p in (CONF / "dit").glob("*.yaml")} == set(DIT_SIZES)


def test_conf_dit_architecture_overrides_are_plain():
    """_base_/dit.yaml lists every key a size sets (null: the size's value), so
    `dit.hidden_size=...` needs no `+`, on any size, and null changes nothing."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose(overrides=["+dit=debug"]).dit
        wide = compose(overrides=["+dit=1B", "dit.hidden_size=1024", "dit.num_heads=8"]).dit
    assert {k for k in base if base[k] is None} == {k for size in DIT_SIZES.values() for k in size}
    assert instantiate(base)(in_channels=C, text_dim=TEXT_DIM).config() == make().config()
    with torch.device("meta"):
        model = instantiate(wide)(in_channels=16, text_dim=64)
    assert (model.hidden_size, model.num_heads, len(model.blocks)) == (1024, 8, DIT_SIZES["1B"]["depth"])
