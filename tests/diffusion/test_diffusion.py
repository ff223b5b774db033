"""Flow-matching objective, timestep sampling, conditioning masks and ODE samplers (no model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sora_train.diffusion import (
    MODES,
    ConditionSampler,
    FlowMatching,
    TimestepSampler,
    guided_model_fn,
    loss_by_timestep_bins,
    mode_mask,
    sample,
    shift_timesteps,
    timestep_schedule,
    token_shift,
    unshift_timesteps,
)
from sora_train.utils.errors import SoraError

METHODS = ("euler", "heun")
CONF = Path(__file__).resolve().parents[2] / "conf"
SHAPE = (3, 2, 4, 3, 3)  # (B, C, f, h, w)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- timesteps ---------------------------------------------------------------------------


def test_shift_properties():
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    for shift in (0.5, 2.0, 5.0):
        s = shift_timesteps(t, shift)
        assert (s.diff() > 0).all()  # monotone
        assert s[0] == 0 and s[-1] == 1  # end points fixed
        torch.testing.assert_close(unshift_timesteps(s, shift), t)
    assert (shift_timesteps(t[1:-1], 3.0) > shift_timesteps(t[1:-1], 2.0)).all()  # more shift, more noise


def test_token_shift_grows_with_tokens():
    shifts = [token_shift(n, base_tokens=256, base_shift=1.0, max_shift=6.0) for n in (64, 256, 1024, 4096, 10**6)]
    assert shifts[0] == shifts[1] == 1.0
    assert shifts[2] == pytest.approx(2.0) and shifts[3] == pytest.approx(4.0)
    assert shifts[4] == 6.0  # capped
    fm = FlowMatching(TimestepSampler(), use_token_shift=False, base_shift=3.0)
    assert fm.shift_for(10**6) == 3.0


def test_sampling_shift_follows_training_unless_set():
    fm = FlowMatching(TimestepSampler(), base_shift=2.0, sampler={"steps": 10, "shift": None})
    assert fm.sampling_shift(64) == fm.shift_for(64) == 2.0 and fm.sampling_shift(1024) == pytest.approx(4.0)
    assert fm.sampling_shift(64, shift=1.5) == 1.5  # a caller's value wins
    fixed = FlowMatching(TimestepSampler(), base_shift=2.0, sampler={"shift": 3.0})
    assert fixed.sampling_shift(64) == fixed.sampling_shift(10**6) == 3.0 and fixed.shift_for(64) == 2.0
    with pytest.raises(SoraError, match="sampler.shift"):
        FlowMatching(TimestepSampler(), sampler={"shift": 0})
    with pytest.raises(SoraError, match="sampling shift"):
        fm.sampling_shift(64, shift=-1.0)


def test_timestep_samplers():
    t = TimestepSampler("logit_normal", mean=0.5, std=1.0).sample(20000, gen())
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)
    u = TimestepSampler("uniform").sample(20000, gen())
    assert (u >= 0).all() and (u < 1).all() and u.mean().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(TimestepSampler().sample(5, gen(3)), TimestepSampler().sample(5, gen(3)))
    with pytest.raises(SoraError, match="kind"):
        TimestepSampler("cosine")


# ---- masks --------------------------------------------------------------------------------


def test_mode_masks():
    f = 6
    assert not mode_mask("t2v", f).any()
    assert mode_mask("i2v", f).tolist() == [True] + [False] * 5
    assert mode_mask("extend_forward", f, 2).tolist() == [True, True, False, False, False, False]
    assert mode_mask("extend_backward", f, 2).tolist() == [False, False, False, False, True, True]
    assert mode_mask("interpolate", f, 1).tolist() == [True, False, False, False, False, True]
    for mode in MODES:
        assert mode_mask(mode, f).shape == (f,) and mode_mask(mode, f).dtype == torch.bool
    with pytest.raises(SoraError, match="mode"):
        mode_mask("outpaint", f)
    with pytest.raises(SoraError, match="num_context"):
        mode_mask("interpolate", 4, 2)  # nothing left to generate
    with pytest.raises(SoraError, match="i2v"):
        mode_mask("i2v", 1)  # an image has no frame after the first


def test_condition_sampler_frequencies():
    weights = {"t2v": 0.5, "i2v": 0.2, "extend_forward": 0.1, "extend_backward": 0.1, "interpolate": 0.1}
    sampler = ConditionSampler(weights, max_context_frames=2)
    mode, k = sampler.sample_modes(20000, 6, gen())
    for i, name in enumerate(MODES):
        assert (mode == i).float().mean().item() == pytest.approx(weights[name], abs=0.015)
    assert k[mode == 0].eq(0).all() and k[mode == 1].eq(1).all() and k[mode > 1].ge(1).all() and k.le(2).all()
    masks = sampler.sample(20000, 6, gen())
    assert masks.shape == (20000, 6) and masks.dtype == torch.bool
    assert (~masks.any(1)).float().mean().item() == pytest.approx(0.5, abs=0.015)  # t2v
    assert (~masks).any(1).all()  # every sample leaves a frame to generate
    # a 1-frame image can only be t2v
    assert not ConditionSampler(weights).sample(100, 1, gen()).any()
    torch.testing.assert_close(sampler.sample(8, 6, gen(1)), sampler.sample(8, 6, gen(1)))


def test_condition_sampler_rejects_unknown_modes():
    with pytest.raises(SoraError, match="outpaint"):
        ConditionSampler({"t2v": 1.0, "outpaint": 0.1})
    with pytest.raises(SoraError, match="positive"):
        ConditionSampler({"t2v": 0.0})


# ---- objective ----------------------------------------------------------------------------


def test_oracle_model_has_zero_loss():
    fm = FlowMatching(TimestepSampler())
    x0 = torch.randn(SHAPE, generator=gen())
    noise = torch.randn(SHAPE, generator=gen(1))
    t = torch.tensor([0.1, 0.5, 0.9])

    def oracle(x_t, t_):  # reads eps back from x_t: the exact velocity eps - x0
        eps = (x_t - (1 - t_.view(-1, 1, 1, 1, 1)) * x0) / t_.view(-1, 1, 1, 1, 1)
        return eps - x0

    out = fm.training_losses(oracle, x0, noise=noise, t=t)
    assert out["loss"].item() < 1e-10 and out["loss_per_sample"].shape == (3,)
    torch.testing.assert_close(out["t"], t)
    zero = fm.training_losses(lambda x, t_: torch.zeros_like(x), x0, noise=noise, t=t)
    torch.testing.assert_close(zero["loss_per_sample"], (noise - x0).pow(2).mean(dim=(1, 2, 3, 4)))


def test_context_frames_excluded_from_loss_and_given_clean():
    fm = FlowMatching(TimestepSampler())
    x0 = torch.randn(SHAPE, generator=gen())
    cond = torch.zeros(3, 4, dtype=torch.bool)
    cond[0, 0] = cond[1, -2:] = True
    seen = {}

    def model(x_t, t_, junk):
        seen["x_t"] = x_t
        v = torch.zeros_like(x_t)
        return torch.where(cond[:, None, :, None, None], junk, v)  # garbage only on context frames

    a = fm.training_losses(lambda x, t_: model(x, t_, 0.0), x0, cond_mask=cond, generator=gen(5))
    b = fm.training_losses(lambda x, t_: model(x, t_, 1e3), x0, cond_mask=cond, generator=gen(5))
    torch.testing.assert_close(a["loss_per_sample"], b["loss_per_sample"])
    ctx = cond[:, None, :, None, None].expand(SHAPE)
    torch.testing.assert_close(seen["x_t"][ctx], x0[ctx])  # context frames are clean in x_t
    assert not torch.allclose(seen["x_t"][~ctx], x0[~ctx])


def test_token_shift_moves_training_t():
    fm = FlowMatching(TimestepSampler(), shift_base_tokens=256, max_shift=6.0)
    x0 = torch.zeros(256, 1, 1, 1, 1)
    low = fm.training_losses(lambda x, t: x, x0, num_tokens=256, generator=gen())["t"]
    high = fm.training_losses(lambda x, t: x, x0, num_tokens=4096, generator=gen())["t"]
    assert (high >= low).all() and high.mean() > low.mean() + 0.1


def test_loss_by_timestep_bins():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t = torch.tensor([0.05, 0.07, 0.55, 1.0])
    bins = loss_by_timestep_bins(loss, t)
    assert len(bins) == 10 and "loss_t0.0-0.1" in bins and "loss_t0.9-1.0" in bins
    assert [x.item() for x in bins["loss_t0.0-0.1"]] == [3.0, 2.0]
    assert [x.item() for x in bins["loss_t0.5-0.6"]] == [3.0, 1.0]
    assert [x.item() for x in bins["loss_t0.9-1.0"]] == [4.0, 1.0]  # upper edge included
    assert sum(c.item() for _, c in bins.values()) == 4


# ---- samplers -----------------------------------------------------------------------------


def straight_field(x0):
    """Exact velocity of the straight path to a fixed x0: x_t = (1-t) x0 + t eps."""
    return lambda x, t, guided: (x - x0) / t.view(-1, 1, 1, 1, 1)


def test_schedule():
    ts = timestep_schedule(10, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts.diff() < 0).all()
    assert timestep_schedule(4, shift=3.0, start_t=0.6)[0].item() == pytest.approx(0.6)


def test_euler_recovers_x0_on_straight_field():
    x0 = torch.randn(SHAPE, generator=gen())
    noise = torch.randn(SHAPE, generator=gen(1))
    for steps, shift in [(1, 1.0), (4, 3.0)]:
        torch.testing.assert_close(sample(straight_field(x0), noise, steps=steps, shift=shift), x0)


def test_heun_beats_euler_on_curved_field():
    # dx/dt = x  =>  x(0) = x(1) * e^{-1} exactly; Euler and Heun differ in their error order.
    noise = torch.randn(SHAPE, generator=gen(1), dtype=torch.float64)
    exact = noise * math.exp(-1)
    err = {m: (sample(lambda x, t, g: x, noise, steps=8, method=m) - exact).abs().max().item() for m in METHODS}
    assert err["heun"] < err["euler"] / 5, err


def test_context_frames_reproduced_exactly():
    context = torch.randn(SHAPE, generator=gen(2))
    noise = torch.randn(SHAPE, generator=gen(1))
    cond = torch.zeros(3, 4, dtype=torch.bool)
    cond[:, 0] = True
    cond[1, -1] = True
    field = lambda x, t, g: torch.sin(3 * x) + t.view(-1, 1, 1, 1, 1)  # arbitrary, non-trivial
    for method in ("euler", "heun"):
        out = sample(field, noise, steps=5, method=method, context=context, cond_mask=cond)
        ctx = cond[:, None, :, None, None].expand(SHAPE)
        assert torch.equal(out[ctx], context[ctx])
        assert not torch.allclose(out[~ctx], context[~ctx])


def test_guidance_one_is_conditional_only():
    noise = torch.randn(SHAPE, generator=gen(1))
    calls = {"cond": 0, "uncond": 0}

    def cond_fn(x, t):
        calls["cond"] += 1
        return -x

    def uncond_fn(x, t):
        calls["uncond"] += 1
        return 2 * x

    model_fn = guided_model_fn(cond_fn, uncond_fn)
    plain = sample(lambda x, t, g: cond_fn(x, t), noise, steps=4, method="heun")
    calls.update(cond=0, uncond=0)
    guided1 = sample(model_fn, noise, steps=4, method="heun", guidance_scale=1.0)
    assert torch.equal(plain, guided1) and calls["uncond"] == 0
    guided = sample(model_fn, noise, steps=4, guidance_scale=3.0)
    assert calls["uncond"] == 4 and not torch.allclose(guided, plain)
    # s = 3: v = u + 3 (c - u) = 2x + 3(-x - 2x) = -7x
    torch.testing.assert_close(guided, sample(lambda x, t, g: -7 * x, noise, steps=4))


def test_edit_strength():
    x_init = torch.randn(SHAPE, generator=gen(2))
    noise = torch.randn(SHAPE, generator=gen(1))
    never = lambda x, t, g: pytest.fail("model called at strength 0")
    torch.testing.assert_close(sample(never, noise, start_t=0.0, x_init=x_init), x_init, rtol=0, atol=0)
    # with the exact field towards x_init, a partial edit returns x_init too
    torch.testing.assert_close(sample(straight_field(x_init), noise, steps=3, start_t=0.5, x_init=x_init), x_init)
    with pytest.raises(SoraError, match="x_init"):
        sample(never, noise, start_t=0.5)


# ---- configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kind", [("flow", "logit_normal"), ("flow_uniform", "uniform")])
def test_diffusion_configs_instantiate(name, kind):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+diffusion={name}"])
    fm = instantiate(cfg.diffusion)
    assert isinstance(fm, FlowMatching) and isinstance(fm.timestep_sampler, TimestepSampler)
    assert fm.timestep_sampler.kind == kind
    assert type(fm.sampler_defaults) is dict and set(fm.sampler_defaults) == {"steps", "method", "guidance_scale", "shift"}
    assert cfg.diffusion.sampler.method in ("euler", "heun")
