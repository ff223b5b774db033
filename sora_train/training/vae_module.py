"""The VAE training task: reconstruct -> L1 + SSIM + KL (+ hinge GAN after warm-up).

Manual optimisation, because the optional discriminator needs its own optimizer and its own
step; with the GAN off this is one optimizer step per batch like any other task.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from sora_train.models.vae.losses import VAELoss, psnr, ssim


class VAEModule(pl.LightningModule):
    """Args:
        vae: the CausalVAE to train.
        loss: VAELoss (holds the discriminator when adversarial training is on).
        optimizer: ``params -> Optimizer`` (config partial), used for the VAE and, separately,
            for the discriminator.
        scheduler: optional ``optimizer -> LRScheduler``, stepped per step.
        gradient_clip_val: max grad norm for the VAE (manual optimisation clips here).
    """

    def __init__(
        self,
        vae: nn.Module,
        loss: VAELoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        gradient_clip_val: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.vae = vae
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.gradient_clip_val = gradient_clip_val

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        video = batch["video"]  # (B, 3, F, H, W) in [-1, 1]
        step = self.global_step
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)

        recon, posterior = self.vae(video)  # (B, 3, F, H, W)
        if opt_d is not None:
            self.loss.discriminator.requires_grad_(False)  # the generator step must not train D
        losses = self.loss(video, recon, posterior, step=step)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if self.gradient_clip_val:
            self.clip_gradients(opt_g, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt_g.step()

        if opt_d is not None and self.loss.adversarial_active(step):
            self.loss.discriminator.requires_grad_(True)
            d = self.loss.discriminator_loss(video, recon.detach(), step=step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d["loss"])
            opt_d.step()
            self.log("train/disc_loss", d["loss"], batch_size=video.shape[0])

        sched = self.lr_schedulers()
        if sched is not None:
            (sched[0] if isinstance(sched, list) else sched).step()
        bs = video.shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        for k in ("l1", "ssim", "kl", "adv"):
            self.log(f"train/{k}", losses[k], batch_size=bs)
        return losses["loss"]

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        video = batch["video"]
        recon = self.vae.decode(self.vae.encode(video).mode()).clamp(-1, 1)  # (B, 3, F, H, W)
        bs = video.shape[0]
        self.log("val/psnr", psnr(recon, video), prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/ssim", ssim(recon, video), batch_size=bs, sync_dist=True)
        self.log("val/l1", (recon - video).abs().mean(), batch_size=bs, sync_dist=True)
        self.log("val/loss", (recon - video).abs().mean(), batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        opt_g = self.optimizer_factory([p for p in self.vae.parameters() if p.requires_grad])
        optimizers = [opt_g]
        if self.loss.discriminator is not None:
            optimizers.append(self.optimizer_factory(self.loss.discriminator.parameters()))
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(opt_g), "interval": "step"}]
