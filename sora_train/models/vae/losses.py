"""VAE training losses and metrics: L1, SSIM, PSNR, KL and an optional 3D PatchGAN.

No perceptual (LPIPS) term: it needs downloaded weights. SSIM stands in for the structural
part; the adversarial term, when enabled, for sharpness. Videos are (B, C, F, H, W) in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sora_train.models.vae.causal_vae import DiagonalGaussian
from sora_train.utils.errors import SoraError

# Pixel values span [-1, 1]: the dynamic range SSIM's constants and PSNR's peak are relative to.
DATA_RANGE = 2.0


def l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error over every element (a scalar)."""
    return (x - y).abs().mean()


def _gaussian_window(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5, reduction: str = "mean") -> Tensor:
    """Structural similarity (Wang et al. 2004), per frame, with a Gaussian window.

    Computed on each (C, H, W) frame with 'valid' filtering (no padding), averaged over
    channels and positions. The window shrinks to the frame size for frames smaller than 11
    pixels. Differentiable; 1 for identical inputs.

    Args:
        x, y: (B, C, F, H, W) in [-1, 1].
        reduction: "mean" -> scalar; "none" -> (B, F) per-frame SSIM.
    """
    if x.shape != y.shape or x.ndim != 5:
        raise SoraError(f"ssim: expected two equal (B, C, F, H, W) shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    B, C, Fr, H, W = x.shape
    size = min(window_size, H, W)
    size -= 1 - size % 2  # keep it odd
    xf = rearrange(x.float(), "b c f h w -> (b f) c h w")  # (B*F, C, H, W)
    yf = rearrange(y.float(), "b c f h w -> (b f) c h w")  # (B*F, C, H, W)
    g = _gaussian_window(size, sigma, xf.device, xf.dtype)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, depthwise
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, size), groups=C)  # (B*F, C, H, W-size+1)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, size, 1), groups=C)  # (B*F, C, h', w')

    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mu_x, mu_y = blur(xf), blur(yf)
    var_x = blur(xf * xf) - mu_x**2
    var_y = blur(yf * yf) - mu_y**2
    cov = blur(xf * yf) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))  # (B*F, C, h', w')
    per_frame = rearrange(s.mean(dim=(1, 2, 3)), "(b f) -> b f", b=B)  # (B, F)
    if reduction == "none":
        return per_frame
    if reduction == "mean":
        return per_frame.mean()
    raise SoraError(f"ssim reduction={reduction!r}: expected 'mean' or 'none'")


def psnr(x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB for [-1, 1] inputs, per sample then averaged.

    inf where a sample is reproduced exactly. reduction "none" -> (B,).
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    out = 10.0 * torch.log10(DATA_RANGE**2 / mse)  # (B,); 1/0 -> inf
    if reduction == "none":
        return out
    if reduction == "mean":
        return out.mean()
    raise SoraError(f"psnr reduction={reduction!r}: expected 'mean' or 'none'")


def kl_loss(posterior: DiagonalGaussian, num_values: int = 1) -> Tensor:
    """Batch mean of the per-sample KL (summed over the latent), divided by `num_values`.

    Pass the number of pixel values per sample (C*F*H*W) to get nats per pixel value, the
    same scale as a per-pixel-mean reconstruction loss; then kl_weight means what it means
    for a sum-reduced loss (e.g. LDM's 1e-6).
    """
    return posterior.kl().mean() / num_values


class Discriminator3D(nn.Module):
    """Small 3D PatchGAN: a grid of real/fake logits over (F, H/2^n, W/2^n) patches.

    Not causal (it only judges). Spatial stride 2 per layer, temporal stride 1, so it also
    works on single images. GroupNorm instead of BatchNorm: no cross-rank statistics under DDP.
    """

    def __init__(self, in_channels: int = 3, channels: int = 32, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, (3, 4, 4), stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers):
            out = channels * min(2**i, 8)
            layers += [nn.Conv3d(ch, out, (3, 4, 4), stride=(1, 2, 2), padding=1, bias=False), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv3d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """N(0, 0.02) conv weights and zero biases, the DCGAN/pix2pix init PatchGANs are tuned for."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, video: Tensor) -> Tensor:  # (B, C, F, H, W)
        return self.net(video)  # (B, 1, F, H/2^n, W/2^n) logits


class VAELoss(nn.Module):
    """L1 + ssim_weight * (1 - SSIM) + kl_weight * KL + adv_weight * hinge-GAN (after adv_start_step).

    The discriminator (present iff adv_weight > 0) lives here so its weights are saved with
    the loss; it needs its own optimizer over `loss.discriminator.parameters()`. The
    generator's adversarial term back-propagates into the discriminator's weights too: freeze
    them (or zero their grads) during the generator step, as Lightning's toggle_optimizer does.

    Args:
        ssim_weight: weight of (1 - SSIM); structure, where L1 alone blurs edges.
        kl_weight: weight of the KL in nats per pixel value (see `kl_loss`). 1e-6 is LDM's
            value: a nearly deterministic posterior; the latent scale for the diffusion
            model is fixed afterwards by `compute_latent_stats`, not by the KL.
        adv_weight: weight of the generator's hinge loss; 0 disables the GAN.
        adv_start_step: the GAN terms are zero before this step, so the discriminator meets
            reconstructions that are already reasonable.
    """

    def __init__(self, ssim_weight: float = 0.2, kl_weight: float = 1e-6, adv_weight: float = 0.0, adv_start_step: int = 0, disc_channels: int = 32, disc_layers: int = 3):
        super().__init__()
        for name, v in (("ssim_weight", ssim_weight), ("kl_weight", kl_weight), ("adv_weight", adv_weight), ("adv_start_step", adv_start_step)):
            if v < 0:
                raise SoraError(f"VAELoss {name}={v}: must be >= 0")
        self.ssim_weight = float(ssim_weight)
        self.kl_weight = float(kl_weight)
        self.adv_weight = float(adv_weight)
        self.adv_start_step = int(adv_start_step)
        self.discriminator = Discriminator3D(channels=disc_channels, num_layers=disc_layers) if adv_weight > 0 else None

    def adversarial_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.adv_start_step

    def forward(self, video: Tensor, recon: Tensor, posterior: DiagonalGaussian, step: int = 0) -> dict[str, Tensor]:
        """Generator-side loss. Returns {"loss", "l1", "ssim", "kl", "adv"} (all scalars; "loss" is the weighted sum)."""
        rec_l1 = l1(recon, video)
        sim = ssim(recon, video) if self.ssim_weight > 0 else recon.new_ones(())
        kl = kl_loss(posterior, num_values=video[0].numel())
        loss = rec_l1 + self.ssim_weight * (1.0 - sim) + self.kl_weight * kl
        adv = recon.new_zeros(())
        if self.adversarial_active(step):
            adv = -self.discriminator(recon).mean()  # hinge generator loss
            loss = loss + self.adv_weight * adv
        return {"loss": loss, "l1": rec_l1.detach(), "ssim": sim.detach(), "kl": kl.detach(), "adv": adv.detach()}

    def discriminator_loss(self, video: Tensor, recon: Tensor, step: int = 0) -> dict[str, Tensor]:
        """Hinge loss for the discriminator. Returns {"loss", "logits_real", "logits_fake"}.

        Before adv_start_step the loss is multiplied by 0 (graph kept, so DDP sees every
        discriminator parameter used on every step).
        """
        if self.discriminator is None:
            raise SoraError("VAELoss.discriminator_loss: the discriminator is disabled (adv_weight=0)")
        logits_real = self.discriminator(video.detach())  # (B, 1, F, h, w)
        logits_fake = self.discriminator(recon.detach())  # (B, 1, F, h, w)
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        factor = 1.0 if step >= self.adv_start_step else 0.0
        return {"loss": factor * loss, "logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}


__all__ = ["DATA_RANGE", "Discriminator3D", "VAELoss", "kl_loss", "l1", "psnr", "ssim"]
