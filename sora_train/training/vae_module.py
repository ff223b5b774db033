"""The VAE training task: reconstruct -> L1 + SSIM + KL (+ hinge GAN after warm-up).

Manual optimisation, because the optional discriminator needs its own optimizer and its own
step; with the GAN off this is one optimizer step per batch like any other task.

The discriminator is kept *outside* the module tree the strategy wraps, with a plain torch
optimizer of its own, and its gradients are averaged across ranks here:
- DeepSpeed takes exactly one optimizer per engine, so a discriminator inside it could not
  have its own step;
- under DDP the discriminator's parameters get no gradient from the generator step (it is
  frozen there) and none at all before ``adv_start_step``, which DDP reports as "parameters
  that were not used in producing the loss";
- DeepSpeed's bf16 mode would cast it to bf16 with the VAE; it stays fp32 here.
It is small (a 3D PatchGAN), so every rank holds all of it. Its weights and optimizer state
are saved in each checkpoint under ``"discriminator"``.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from sora_train.models.vae.losses import VAELoss, psnr, ssim
from sora_train.utils.precision import autocast_off, module_dtype

DISCRIMINATOR_KEY = "discriminator"  # checkpoint entry: {"model": state dict, "optimizer": state dict}


class VAEModule(pl.LightningModule):
    """Args:
        vae: the CausalVAE to train.
        loss: VAELoss (holds the discriminator when adversarial training is on).
        optimizer: ``params -> Optimizer`` (config partial), used for the VAE and, separately,
            for the discriminator.
        scheduler: optional ``optimizer -> LRScheduler``, stepped per step.
        gradient_clip_val: max grad norm for the VAE (manual optimisation clips here; under
            DeepSpeed the engine clips, with this value).
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
        self._outside: dict[str, Any] = {"loss": loss}  # not a submodule: see the module docstring
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.gradient_clip_val = gradient_clip_val

    @property
    def loss(self) -> VAELoss:
        return self._outside["loss"]

    @property
    def discriminator(self) -> nn.Module | None:
        return self.loss.discriminator

    def disc_optimizer(self) -> torch.optim.Optimizer:
        if "disc_opt" not in self._outside:
            self._outside["disc_opt"] = self.optimizer_factory(self.discriminator.parameters())
        return self._outside["disc_opt"]

    def setup(self, stage: str) -> None:
        if self.discriminator is not None:
            self.discriminator.to(self.trainer.strategy.root_device)  # in place: the optimizer keeps its parameters
            self.disc_optimizer()
        config = getattr(self.trainer.strategy, "config", None)
        if isinstance(config, dict) and self.gradient_clip_val:
            # Lightning hands DeepSpeed the Trainer's clip value, which manual optimisation leaves unset.
            config.setdefault("gradient_clipping", float(self.gradient_clip_val))

    # -- the recipe ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        video = batch["video"].float()  # (B, 3, F, H, W) in [-1, 1]
        step = self.global_step
        opt_g = self.optimizers()
        opt_g = opt_g[0] if isinstance(opt_g, list) else opt_g

        recon, posterior = self.vae(video.to(module_dtype(self.vae)))  # (B, 3, F, H, W), in the VAE's dtype
        recon = recon.float()  # the losses in fp32 whatever the weights' dtype
        disc = self.discriminator
        if disc is not None:
            disc.requires_grad_(False)  # the generator step must not train D
        with autocast_off(video.device):  # SSIM's variances cancel catastrophically in bf16 (NaN gradients seen under DDP bf16-mixed)
            losses = self.loss(video, recon, posterior, step=step)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if self.gradient_clip_val:
            self.clip_gradients(opt_g, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt_g.step()

        if disc is not None and self.loss.adversarial_active(step):
            disc.requires_grad_(True)
            with autocast_off(video.device):
                d = self.loss.discriminator_loss(video, recon.detach(), step=step)
            opt_d = self.disc_optimizer()
            opt_d.zero_grad(set_to_none=True)
            d["loss"].backward()  # not through the strategy: D is not part of its model
            _average_gradients(disc.parameters())
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
        video = batch["video"].float()
        z = self.vae.encode(video.to(module_dtype(self.vae))).mode()
        recon = self.vae.decode(z).float().clamp(-1, 1)  # (B, 3, F, H, W)
        bs = video.shape[0]
        with autocast_off(video.device):
            self._log_val(recon, video, bs)

    def _log_val(self, recon: torch.Tensor, video: torch.Tensor, bs: int) -> None:
        self.log("val/psnr", psnr(recon, video), prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/ssim", ssim(recon, video), batch_size=bs, sync_dist=True)
        self.log("val/l1", (recon - video).abs().mean(), batch_size=bs, sync_dist=True)
        self.log("val/loss", (recon - video).abs().mean(), batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        opt_g = self.optimizer_factory([p for p in self.vae.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt_g
        return [opt_g], [{"scheduler": self.scheduler_factory(opt_g), "interval": "step"}]

    # -- the discriminator in checkpoints ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.discriminator is not None:
            checkpoint[DISCRIMINATOR_KEY] = {"model": self.discriminator.state_dict(), "optimizer": self.disc_optimizer().state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict") or {}
        old = {k[len("loss.discriminator."):]: state.pop(k) for k in list(state) if k.startswith("loss.")}  # written when D was a submodule
        saved = checkpoint.get(DISCRIMINATOR_KEY)
        if self.discriminator is None:
            return
        if saved:
            self.discriminator.load_state_dict(saved["model"])
            self.disc_optimizer().load_state_dict(saved["optimizer"])
        elif old:
            self.discriminator.load_state_dict(old)


def _average_gradients(params) -> None:
    """Mean of each gradient over the ranks, in one all-reduce (a no-op on one process)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one message instead of one per tensor
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
