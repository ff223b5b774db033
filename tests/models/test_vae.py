"""Causal video VAE: shapes, causality, chunked/tiled equivalence, latent stats, losses, configs.

Everything runs on the `debug` size at 16-64 px on CPU; the whole file takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sora_train.models.vae import VAE_SIZES, CausalVAE, DiagonalGaussian, build_vae, compute_latent_stats, param_count
from sora_train.models.vae.losses import Discriminator3D, VAELoss, kl_loss, l1, psnr, ssim
from sora_train.utils.errors import SoraError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "vae"


def _perturbed(vae: CausalVAE, seed: int = 0, std: float = 0.02) -> CausalVAE:
    """Add noise to every weight: at init the residual branches are zero, which would make
    causality/chunking tests pass trivially for those layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return vae.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae() -> CausalVAE:
    torch.manual_seed(0)
    return _perturbed(build_vae("debug"))


def _video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]


def _moving_squares(b: int, f: int, size: int) -> torch.Tensor:
    """Coloured squares drifting one pixel per frame over a flat background, in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(b, 3, f, size, size)
    for i in range(b):
        bg, fg = torch.rand(3, generator=g) - 1, torch.rand(3, generator=g)
        x[i] = bg.view(3, 1, 1, 1)
        for t in range(f):
            y0 = x0 = 2 + t
            x[i, :, t, y0 : y0 + size // 3, x0 : x0 + size // 3] = fg.view(3, 1, 1)
    return x


# ----------------------------------------------------------------------------- shapes


def test_debug_factors(vae):
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (4, 2, 4)


@pytest.mark.parametrize("frames", [1, 5])
@torch.no_grad()
def test_encode_decode_shapes_image_and_video(vae, frames):
    x = _video(2, frames, 16, 24)
    post = vae.encode(x)
    f, h, w = vae.latent_shape(frames, 16, 24)
    assert post.mean.shape == post.logvar.shape == (2, 4, f, h, w)
    assert f == 1 + (frames - 1) // 2
    recon = vae.decode(post.mode())
    assert recon.shape == x.shape
    assert vae.pixel_shape(f, h, w) == (frames, 16, 24)
    recon2, post2 = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    assert recon2.shape == x.shape and isinstance(post2, DiagonalGaussian)


def test_latent_shape_validation(vae):
    assert vae.latent_shape(9, 32, 64) == (5, 8, 16)
    with pytest.raises(SoraError, match="num_frames=4"):
        vae.latent_shape(4, 32, 32)
    with pytest.raises(SoraError, match="num_frames=0"):
        vae.latent_shape(0, 32, 32)
    with pytest.raises(SoraError, match="height=18"):
        vae.latent_shape(5, 18, 32)
    with pytest.raises(SoraError, match="width=30"):
        vae.latent_shape(5, 32, 30)
    with pytest.raises(SoraError, match="num_frames=4"):
        vae.encode(_video(1, 4, 16, 16))
    with pytest.raises(SoraError, match="video shape"):
        vae.encode(torch.zeros(1, 3, 16, 16))


def test_constructor_validation():
    with pytest.raises(SoraError, match="temporal_downsample"):
        CausalVAE(base_channels=8, channel_mults=(1, 2), temporal_downsample=(True, True), latent_channels=4)
    with pytest.raises(SoraError, match="latent_channels"):
        CausalVAE(base_channels=8, channel_mults=(1, 2), temporal_downsample=(True,), latent_channels=3)
    with pytest.raises(SoraError, match="latent_shift"):
        CausalVAE(base_channels=8, channel_mults=(1, 2), temporal_downsample=(True,), latent_channels=4, latent_shift=[0.0])


# ----------------------------------------------------------------------------- causality


@torch.no_grad()
def test_frame0_is_encoded_alone(vae):
    x = _video(1, 9, 16, 16)
    video_latent = vae.encode(x).mean  # (1, Cz, 5, 4, 4)
    image_latent = vae.encode(x[:, :, :1]).mean  # (1, Cz, 1, 4, 4)
    torch.testing.assert_close(image_latent, video_latent[:, :, :1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [1, 2, 4, 7])
@torch.no_grad()
def test_encoder_is_causal(vae, t):
    x = _video(1, 9, 16, 16)
    y = x.clone()
    y[:, :, t] = _video(1, 1, 16, 16, seed=5)[:, :, 0]
    zx, zy = vae.encode(x).mean, vae.encode(y).mean  # (1, Cz, 5, 4, 4)
    first_affected = -(-t // vae.temporal_factor)  # latent j covers frames <= j * s_t
    torch.testing.assert_close(zx[:, :, :first_affected], zy[:, :, :first_affected], atol=0, rtol=0)
    assert (zx[:, :, first_affected] - zy[:, :, first_affected]).abs().max() > 1e-4


@pytest.mark.parametrize("j", [1, 2, 4])
@torch.no_grad()
def test_decoder_is_causal(vae, j):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 5, 4, 4, generator=g)
    z2 = z.clone()
    z2[:, :, j] += 1.0
    a, b = vae.decode(z), vae.decode(z2)  # (1, 3, 9, 16, 16)
    first_affected = 1 + (j - 1) * vae.temporal_factor  # latent j decodes frames (j-1)*s_t+1 .. j*s_t
    torch.testing.assert_close(a[:, :, :first_affected], b[:, :, :first_affected], atol=0, rtol=0)
    assert (a[:, :, first_affected] - b[:, :, first_affected]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- chunking and tiling


@pytest.mark.parametrize("chunk", [2, 4, 8])
@torch.no_grad()
def test_chunked_encode_equals_one_shot(vae, chunk):
    x = _video(2, 11, 16, 16)
    full, chunked = vae.encode(x), vae.encode(x, chunk_frames=chunk)
    assert (full.mean - chunked.mean).abs().max() < 1e-5
    assert (full.logvar - chunked.logvar).abs().max() < 1e-5


@pytest.mark.parametrize("chunk", [1, 2, 3])
@torch.no_grad()
def test_chunked_decode_equals_one_shot(vae, chunk):
    z = torch.randn(2, 4, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    assert (vae.decode(z) - vae.decode(z, chunk_frames=chunk)).abs().max() < 1e-5


@torch.no_grad()
def test_chunked_with_patch_size_two_temporal_levels_and_no_norm():
    torch.manual_seed(0)
    vae = _perturbed(build_vae("debug", patch_size=2, temporal_downsample=(True, True), norm="none"))
    assert (vae.spatial_factor, vae.temporal_factor) == (8, 4)
    x = _video(1, 13, 16, 16)
    assert (vae.encode(x).mean - vae.encode(x, chunk_frames=4).mean).abs().max() < 1e-5
    z = vae.encode(x).mode()
    assert (vae.decode(z) - vae.decode(z, chunk_frames=1)).abs().max() < 1e-5
    with pytest.raises(SoraError, match="chunk_frames=2"):
        vae.encode(x, chunk_frames=2)


def test_chunk_validation(vae):
    with pytest.raises(SoraError, match="chunk_frames=3"):
        vae.encode(_video(1, 9, 16, 16), chunk_frames=3)
    with pytest.raises(SoraError, match="chunk_frames=0"):
        vae.decode(torch.zeros(1, 4, 3, 4, 4), chunk_frames=0)


@torch.no_grad()
def test_streaming_state_is_cleared(vae):
    x = _video(1, 9, 16, 16)
    vae.encode(x, chunk_frames=2)
    vae.decode(vae.encode(x).mode(), chunk_frames=1)
    from sora_train.models.vae.causal_vae import CausalConv3d

    assert all(m.past is None and not m.streaming for m in vae.modules() if isinstance(m, CausalConv3d))


@torch.no_grad()
def test_tiled_approximates_one_shot(vae):
    """Tiles see zero padding at their borders instead of the neighbours' pixels, so tiling is
    approximate: the error lives near seams and shrinks as the overlap grows. Random weights
    are a worst case (trained nets have a smaller effective receptive field); measured here,
    mean |error| / mean |signal| is ~0.2 -> ~0.17 (encode) and ~0.08 -> ~0.04 (decode) going
    from 8 to 24 px of overlap on 32 px tiles. A tile covering the frame is exact."""
    x = _video(1, 3, 48, 48)
    ref = vae.encode(x).mean
    assert torch.equal(vae.encode(x, tile=48).mean, ref)
    err = {ov: (vae.encode(x, tile=32, tile_overlap=ov).mean - ref).abs().mean() / ref.abs().mean() for ov in (8, 24)}
    assert err[24] < err[8] < 0.3

    z = vae.encode(x).mode()  # (1, Cz, 2, 12, 12)
    ref_px = vae.decode(z)
    assert torch.equal(vae.decode(z, tile=48), ref_px)
    err = {ov: (vae.decode(z, tile=32, tile_overlap=ov, chunk_frames=1) - ref_px).abs().mean() / ref_px.abs().mean() for ov in (8, 24)}
    assert err[24] < err[8] < 0.15  # tiles and chunks compose


def test_tile_validation(vae):
    x = _video(1, 1, 32, 32)
    with pytest.raises(SoraError, match="tile=6"):
        vae.encode(x, tile=6)
    with pytest.raises(SoraError, match="tile_overlap=16"):
        vae.encode(x, tile=16, tile_overlap=16)


# ----------------------------------------------------------------------------- latent stats, config


@torch.no_grad()
def test_normalize_round_trip_and_stats_in_state_dict():
    torch.manual_seed(0)
    vae = build_vae("debug")
    assert torch.equal(vae.latent_shift, torch.zeros(4)) and torch.equal(vae.latent_scale, torch.ones(4))
    batches = [_video(2, 5, 16, 16, seed=s) for s in range(3)]
    shift, scale = compute_latent_stats(vae, iter(batches), max_batches=2)
    assert shift.shape == scale.shape == (4,)
    vae.set_latent_stats(shift, scale)
    z = torch.cat([vae.encode(b).mode() for b in batches[:2]])  # (4, Cz, 3, 4, 4)
    zn = vae.normalize(z)
    torch.testing.assert_close(zn.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(zn.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.denormalize(zn), z, atol=1e-5, rtol=1e-5)
    state = vae.state_dict()
    assert torch.equal(state["latent_shift"], shift) and torch.equal(state["latent_scale"], scale)
    with pytest.raises(SoraError, match="shift"):
        vae.set_latent_stats(torch.zeros(3), torch.ones(4))


def test_compute_latent_stats_accepts_batch_dicts():
    torch.manual_seed(0)
    vae = build_vae("debug")
    shift, scale = compute_latent_stats(vae, [{"video": _video(1, 1, 16, 16)}], max_batches=5)
    assert torch.isfinite(shift).all() and (scale > 0).all()


@torch.no_grad()
def test_config_rebuild_round_trip_with_safetensors(tmp_path, vae):
    from safetensors.torch import load_file, save_file

    vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 1.0, 0.5, 1.5]))
    (tmp_path / "config.json").write_text(json.dumps(vae.config()))
    save_file(vae.state_dict(), str(tmp_path / "vae.safetensors"))

    rebuilt = CausalVAE(**json.loads((tmp_path / "config.json").read_text()))
    rebuilt.load_state_dict(load_file(str(tmp_path / "vae.safetensors")))
    rebuilt.eval()
    x = _video(1, 5, 16, 16)
    assert torch.equal(rebuilt.encode(x).mean, vae.encode(x).mean)
    assert torch.equal(rebuilt.latent_scale, vae.latent_scale)
    assert rebuilt.config() == vae.config()
    vae.set_latent_stats(torch.zeros(4), torch.ones(4))


def test_build_vae_rejects_unknown_names():
    with pytest.raises(SoraError, match="'huge'"):
        build_vae("huge")
    with pytest.raises(SoraError, match="'latent_dim'"):
        build_vae("debug", latent_dim=8)


def test_param_counts():
    counts = {name: param_count(name) for name in VAE_SIZES}
    assert counts["debug"] < 500_000
    assert counts["debug"] < counts["shapes"] < 5_000_000
    assert 10_000_000 < counts["standard_4x8x8_16c"] < 150_000_000
    assert counts["debug"] == build_vae("debug").num_params()


def _conf_vae(name: str, *overrides: str):
    """conf/vae/<name>.yaml as Hydra composes it (the option includes _base_/vae.yaml)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base="1.3"):
        return compose(overrides=[f"+vae={name}", *overrides]).vae


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_conf_vae_instantiates(path):
    hydra_utils = pytest.importorskip("hydra.utils")

    cfg = _conf_vae(path.stem)
    with torch.device("meta"):  # no weight memory or init cost for the large sizes
        vae = hydra_utils.instantiate(cfg)
    assert isinstance(vae, CausalVAE)
    assert vae.latent_channels == VAE_SIZES[cfg.size]["latent_channels"]
    if path.stem == "standard_4x8x8_16c":
        assert (vae.temporal_factor, vae.spatial_factor, vae.latent_channels) == (4, 8, 16)


def test_every_size_has_a_conf_file():
    """A size lives in VAE_SIZES alone: each option names one size, its own file name."""
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} == set(VAE_SIZES)
    for name in VAE_SIZES:
        assert _conf_vae(name).size == name


def test_conf_vae_architecture_overrides_are_plain():
    """_base_/vae.yaml lists every key a size sets (null: the size's value), so
    `vae.latent_channels=8` needs no `+`, on any size, and null changes nothing."""
    pytest.importorskip("hydra")
    from hydra.utils import instantiate

    base = _conf_vae("debug")
    assert {k for k in base if base[k] is None} == {k for size in VAE_SIZES.values() for k in size}
    assert instantiate(base).config() == build_vae("debug").config()
    with torch.device("meta"):
        vae = instantiate(_conf_vae("standard_4x8x8_16c", "vae.latent_channels=8"))
    assert vae.latent_channels == 8 and vae.spatial_factor == 8


# ----------------------------------------------------------------------------- losses


def test_posterior_kl_and_sampling():
    mean, logvar = torch.zeros(2, 4, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2)
    post = DiagonalGaussian(mean, logvar)
    assert torch.equal(post.kl(), torch.zeros(2))
    post = DiagonalGaussian(torch.ones(2, 4, 1, 2, 2), logvar)
    torch.testing.assert_close(post.kl(), torch.full((2,), 0.5 * 16))  # 0.5 * mu^2 per element
    assert kl_loss(post, num_values=8).item() == pytest.approx(1.0)
    a = post.sample(torch.Generator().manual_seed(0))
    b = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())


def test_psnr_and_ssim_of_identical_and_known_inputs():
    x = _video(2, 3, 16, 16)
    assert torch.isinf(psnr(x, x))
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    y = x + 0.1  # MSE 0.01 on a peak-to-peak range of 2 -> 10*log10(4 / 0.01)
    assert psnr(x, y).item() == pytest.approx(26.0206, abs=1e-3)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert ssim(x, noisy).item() < 0.9
    assert ssim(x, noisy, reduction="none").shape == (2, 3)
    assert l1(x, y).item() == pytest.approx(0.1, abs=1e-6)
    img = _video(1, 1, 8, 8)  # frames smaller than the 11-px window still work
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_is_differentiable():
    x = _video(1, 1, 16, 16)
    y = torch.zeros_like(x, requires_grad=True)
    (1 - ssim(x, y)).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_vae_loss_with_adversarial_warmup():
    torch.manual_seed(0)
    vae = build_vae("debug")
    loss_fn = VAELoss(ssim_weight=0.2, kl_weight=1e-6, adv_weight=0.1, adv_start_step=10, disc_channels=8, disc_layers=2)
    assert isinstance(loss_fn.discriminator, Discriminator3D)
    x = _video(2, 5, 16, 16)
    recon, post = vae(x)
    before = loss_fn(x, recon, post, step=0)
    assert set(before) == {"loss", "l1", "ssim", "kl", "adv"} and before["adv"].item() == 0.0
    after = loss_fn(x, recon, post, step=10)
    assert after["adv"].item() != 0.0
    after["loss"].backward()
    assert vae.decoder.conv_out.weight.grad is not None
    d = loss_fn.discriminator_loss(x, recon, step=10)
    assert d["loss"].item() > 0 and d["loss"].requires_grad
    assert loss_fn.discriminator_loss(x, recon, step=0)["loss"].item() == 0.0
    with pytest.raises(SoraError, match="disabled"):
        VAELoss().discriminator_loss(x, recon)


def test_overfit_one_batch_lowers_loss():
    torch.manual_seed(0)
    vae = build_vae("debug")
    loss_fn = VAELoss()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    x = _moving_squares(2, 5, 16)  # (2, 3, 5, 16, 16); noise would be incompressible
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        recon, post = vae(x, generator=g)
        out = loss_fn(x, recon, post, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


# ----------------------------------------------------------------------------- pretrained adapter

# Tiny random configs (the shapes diffusers' own tests use): 9x16x16 clips.
_TINY_DIFFUSERS_VAES = {
    "AutoencoderKLWan": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "AutoencoderKLCogVideoX": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ),
    "AutoencoderKLLTXVideo": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ),
}


@pytest.mark.parametrize("class_name", sorted(_TINY_DIFFUSERS_VAES))
@torch.no_grad()
def test_pretrained_adapter_round_trip(tmp_path, class_name):
    diffusers = pytest.importorskip("diffusers")  # guard only: the dev extra installs it
    from sora_train.models.vae.pretrained import PretrainedVideoVAE, load_pretrained_vae

    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**_TINY_DIFFUSERS_VAES[class_name]).eval()
    model.save_pretrained(str(tmp_path / "vae"))  # a pipeline-style folder: path/vae/config.json

    vae = load_pretrained_vae(str(tmp_path))
    assert isinstance(vae, PretrainedVideoVAE) and vae.class_name == class_name
    x = _video(1, 9, 16, 16)
    post = vae.encode(x)
    assert tuple(post.mean.shape) == (1, vae.latent_channels, *vae.latent_shape(9, 16, 16))
    torch.testing.assert_close(post.mean, model.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)
    recon = vae.decode(post.mode())
    assert recon.shape == x.shape
    assert vae.pixel_shape(*post.mean.shape[2:]) == (9, 16, 16)
    assert vae.decode(post.mode(), tile=16).shape == x.shape and not vae.model.use_tiling  # switched back off

    z = post.mode()
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z, atol=1e-5, rtol=1e-5)
    if class_name == "AutoencoderKLWan":  # the model's own statistics, not ours
        torch.testing.assert_close(vae.latent_shift, torch.tensor(model.config.latents_mean))
        torch.testing.assert_close(vae.latent_scale, 1.0 / torch.tensor(model.config.latents_std))
    with pytest.raises(SoraError, match="num_frames=4"):
        vae.latent_shape(4, 16, 16)
    assert vae.config()["class_name"] == class_name


def test_pretrained_loader_errors(tmp_path):
    from sora_train.models.vae.pretrained import load_pretrained_vae

    with pytest.raises(SoraError, match="no config.json"):
        load_pretrained_vae(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(SoraError, match="'AutoencoderKL' unsupported"):
        load_pretrained_vae(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(SoraError, match=r"pip install 'sora_train\[pretrained\]'"):
            load_pretrained_vae(str(tmp_path))
