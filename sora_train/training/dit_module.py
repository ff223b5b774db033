"""The DiT training task: encode -> sample t -> noise -> predict -> loss.

Frozen parts (the VAE, a frozen text encoder) are held here but never optimised; the DiT
(and a small built-in text encoder, when it trains) is. EMA, sample videos, throughput and
checkpoint policy live in callbacks.

Precision: frozen parts are kept *outside* the module tree the strategy wraps (``_frozen``), so
no strategy casts, shards or checkpoints them: DeepSpeed's bf16 mode casts every parameter of
the module it is given and runs it without autocast, and ZeRO-3 would partition a frozen T5
like a trained weight. Each frozen part runs in its own dtype (``vae_dtype``, ``text_dtype``)
with autocast off; everything made inside a step is cast to the dtype of the weights it
reaches (``sora_train.utils.precision``), and the loss is computed in fp32. Their weights come
back from where they were loaded (``vae_ckpt``, ``text.path``, the seeded config), not from
training checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from sora_train.diffusion.flow import FlowMatching, loss_by_timestep_bins
from sora_train.diffusion.masks import ConditionSampler
from sora_train.training.log_steps import writes_logs
from sora_train.utils.precision import autocast_off, module_device, module_dtype, parse_dtype

DEFAULT_LOSS_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class DiTModule(pl.LightningModule):
    """Flow-matching training of a spacetime-patch DiT in a frozen VAE's latent space.

    Args:
        dit: a DiT, or a callable ``(in_channels, text_dim) -> DiT`` (the config's partial).
        vae: the frozen video VAE (None when training from latent shards only).
        text_encoder: text encoder; trained with the DiT when ``text_encoder.trainable``.
        flow: the flow-matching objective.
        conditioning: samples which latent frames are given as clean context (t2v, i2v,
            extension, interpolation) for each training sample.
        optimizer: ``params -> Optimizer`` (config partial).
        scheduler: optional ``optimizer -> LRScheduler`` (config partial), stepped per step.
        caption_dropout: probability of training on the empty caption, so classifier-free
            guidance has an unconditional model to contrast with.
        loss_bins: timestep bin edges for ``train/loss_t{a}-{b}``.
        vae_dtype: the frozen VAE's weights and encode: ``float32`` (default: the latents are
            the training targets, and the encode is a small part of a step's cost) or
            ``bfloat16`` (half the memory and faster on GPUs).
        text_dtype: a frozen text encoder's weights: null keeps the encoder's own (an HF
            encoder's ``dtype`` option, float32 for the tiny one), or float32 / bfloat16.
        box_control: box motion control (``training.box_control.BoxControl``, set by the
            recipe from ``control: boxes``): batches' boxes become the DiT's box maps.
    """

    def __init__(
        self,
        dit: nn.Module | Callable[..., nn.Module],
        text_encoder: nn.Module,
        flow: FlowMatching,
        optimizer: Callable[..., torch.optim.Optimizer],
        vae: nn.Module | None = None,
        conditioning: ConditionSampler | None = None,
        scheduler: Callable[..., Any] | None = None,
        caption_dropout: float = 0.1,
        loss_bins: tuple[float, ...] = DEFAULT_LOSS_BINS,
        vae_dtype: str = "float32",
        text_dtype: str | None = None,
        box_control: Any = None,
    ) -> None:
        super().__init__()
        self._frozen: dict[str, nn.Module] = {}  # not submodules: see the module docstring
        self.sequence_parallel_size = 1  # set by the recipe (parallel.sequence_parallel_size)
        self.vae_dtype = parse_dtype(vae_dtype, "task.vae_dtype")
        self.text_dtype = parse_dtype(text_dtype, "task.text_dtype") if text_dtype else None
        self.vae = vae
        self.text_encoder = text_encoder
        latent_channels = vae.latent_channels if vae is not None else None
        if not isinstance(dit, nn.Module):
            if latent_channels is None:
                raise ValueError("DiTModule: pass a built DiT when there is no VAE to size it from")
            dit = dit(in_channels=latent_channels, text_dim=text_encoder.dim)
        self.dit = dit
        self.flow = flow
        self.conditioning = conditioning
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.caption_dropout = caption_dropout
        self.loss_bins = tuple(loss_bins)
        self.box_control = box_control

    # -- frozen parts ---------------------------------------------------------------------------
    @property
    def vae(self) -> nn.Module | None:
        return self._frozen.get("vae")

    @property
    def text_encoder(self) -> nn.Module:
        trained = self._modules.get("text_encoder")
        return trained if trained is not None else self._frozen["text_encoder"]

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module would register these as submodules; route them instead.
        if name == "vae":
            self._frozen.pop("vae", None)
            if value is not None:
                self._frozen["vae"] = value.requires_grad_(False).eval()
        elif name == "text_encoder":
            self._modules.pop("text_encoder", None)
            self._frozen.pop("text_encoder", None)
            if getattr(value, "trainable", True):
                super().__setattr__(name, value)  # a submodule: trained (and checkpointed) with the DiT
            else:
                self._frozen["text_encoder"] = value.requires_grad_(False).eval()
        else:
            super().__setattr__(name, value)

    def freeze_text_encoder(self) -> None:
        """Stop training the text encoder (LoRA runs): it becomes a frozen part."""
        te = self.text_encoder
        te.trainable = False
        self.text_encoder = te

    def place_frozen(self, device: torch.device | str) -> None:
        """Move the frozen parts to ``device`` in their own dtypes (the strategy moves the rest)."""
        if self.vae is not None:
            self.vae.to(device=device, dtype=self.vae_dtype)
        te = self._frozen.get("text_encoder")
        if te is not None:
            te.to(device=device, dtype=self.text_dtype) if self.text_dtype else te.to(device=device)

    def setup(self, stage: str) -> None:
        self.place_frozen(self.trainer.strategy.root_device)
        if self.sequence_parallel_size > 1 and not hasattr(self.dit, "_sequence_parallel"):
            self._setup_sequence_parallel()

    def _setup_sequence_parallel(self) -> None:
        """Split the DiT's tokens over the SP group (needs the process group, so not at build
        time). Every bucket's token count must divide: checked here, not at its first batch."""
        from sora_train.parallel.sequence import apply_sequence_parallel, init_sequence_parallel
        from sora_train.utils.dist_groups import sequence_parallel
        from sora_train.utils.errors import SoraError

        sp = self.sequence_parallel_size
        group = init_sequence_parallel(sp)
        _, size, rank = sequence_parallel()
        dm = getattr(self.trainer, "datamodule", None)
        if self.vae is not None and dm is not None and hasattr(dm, "make_buckets"):
            pt, ph, pw = self.dit.patch_size
            for b in dm.make_buckets().buckets:
                f, h, w = self.vae.latent_shape(b.num_frames, b.height, b.width)
                n = (f // pt) * (h // ph) * (w // pw)
                if n % sp:
                    raise SoraError(f"parallel.sequence_parallel_size={sp} does not divide the {n} tokens of bucket "
                                    f"{b.num_frames}x{b.height}x{b.width}; choose bucket shapes whose token count is a multiple of it")
        apply_sequence_parallel(self.dit, group, size, rank)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the frozen parts left the module tree hold their weights;
        # they are reloaded from their sources now, so those keys are not part of the model.
        frozen = tuple(f"{name}." for name in self._frozen)
        state = checkpoint.get("state_dict")
        if frozen and state:
            for key in [k for k in state if k.startswith(frozen)]:
                del state[key]

    # -- the recipe ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, batch: dict[str, Any]) -> torch.Tensor:
        """Batch -> normalised latents (B, C, f, h, w) in fp32: from latent shards or through the VAE."""
        if "latent" in batch:
            return batch["latent"].float()
        assert self.vae is not None, "pixel batches need a VAE"
        video = batch["video"]  # (B, 3, F, H, W)
        if module_device(self.vae) != video.device:
            self.place_frozen(video.device)
        with autocast_off(video.device):
            posterior = self.vae.encode(video.to(module_dtype(self.vae)))  # (B, C, f, h, w)
            return self.vae.normalize(posterior.sample()).float()

    def call_dit(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, cond_mask: torch.Tensor | None,
                 box_maps: torch.Tensor | None = None) -> torch.Tensor:
        """The DiT on inputs cast to its weights' dtype (bf16 under DeepSpeed's bf16 mode);
        the velocity comes back in fp32 for the loss. t stays fp32: the timestep embedding
        computes its sinusoids in fp32 and casts them itself."""
        dtype = module_dtype(self.dit)
        if box_maps is None:
            return self.dit(x.to(dtype), t, text.to(dtype), text_mask, cond_mask).float()  # (B, C, f, h, w)
        return self.dit(x.to(dtype), t, text.to(dtype), text_mask, cond_mask, box_maps=box_maps).float()  # (B, C, f, h, w)

    def box_maps(self, batch: dict[str, Any], grid: tuple[int, int, int]) -> torch.Tensor | None:
        """The batch's boxes on the latent grid (B, 2M, f, h, w), or None (no control / no boxes)."""
        if self.box_control is None:
            return None
        maps = self.box_control.maps(batch, grid, training=self.training)
        return None if maps is None else maps.to(self.device)

    def encode_text(self, captions: list[str], cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (emb (B, L, D), mask (B, L)); caption dropout replaces some with "".

        ``cached``: the batch's (text_emb, text_mask) from latent shards. Used only with a
        frozen encoder (a trainable one must see its captions); dropped rows then get the
        empty caption's embedding, computed once.
        """
        drop = None
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        if cached is not None and not getattr(self.text_encoder, "trainable", True):
            emb, mask = cached  # (B, L, D), (B, L)
            if drop is None or not drop.any():
                return emb, mask
            if getattr(self, "_empty_text", None) is None:
                with torch.no_grad():
                    self._empty_text = self.text_encoder([""])  # (1, L0, D), (1, L0)
            e, m = self._empty_text
            B, L0, D = emb.shape
            L = max(L0, e.shape[1])
            out, out_mask = emb.new_zeros(B, L, D), mask.new_zeros(B, L)  # (B, L, D), (B, L): zero = padding
            out[:, :L0], out_mask[:, :L0] = emb, mask
            d = drop.to(emb.device)  # (B,)
            out[d], out_mask[d] = 0.0, False
            out[d, : e.shape[1]], out_mask[d, : e.shape[1]] = e[0].to(out), m[0].to(out_mask)
            return out, out_mask
        if getattr(self.text_encoder, "trainable", True):
            return self.text_encoder(captions)
        te = self.text_encoder
        with torch.no_grad(), autocast_off(module_device(te)):
            return te(captions)

    def diffusion_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents = self.encode_video(batch)  # (B, C, f, h, w)
        cached = (batch["text_emb"], batch["text_mask"]) if "text_emb" in batch else None  # from latent shards
        text, text_mask = self.encode_text(list(batch["caption"]), cached)  # (B, L, D), (B, L)
        B, _, f, h, w = latents.shape
        cond_mask = self.conditioning.sample(B, f).to(latents.device) if self.conditioning is not None else None  # (B, f)
        pt, ph, pw = self.dit.patch_size
        num_tokens = (f // pt) * (h // ph) * (w // pw)
        box_maps = self.box_maps(batch, (f, h, w))  # (B, 2M, f, h, w) or None

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.call_dit(x_t, t, text, text_mask, cond_mask, box_maps)

        out = self.flow.training_losses(model_fn, latents, cond_mask=cond_mask, num_tokens=num_tokens)
        out["num_tokens"] = torch.tensor(num_tokens * B)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.diffusion_loss(batch)
        bs = len(batch["caption"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        if writes_logs(self._trainer):  # self.log costs ~1 ms a call on CPU: the curves by timestep only when written
            for name, (total, count) in loss_by_timestep_bins(out["loss_per_sample"].detach(), out["t"], self.loss_bins).items():
                if count > 0:
                    self.log(f"train/{name}", total / count, batch_size=int(count))
        # Sequence parallelism: each of the P ranks of a group backpropagates the group's loss
        # through its own tokens only, and DDP/ZeRO average gradients over all ranks; times P,
        # the average is over data-parallel groups, as without it.
        return out["loss"] * self.sequence_parallel_size

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Fixed noise and timesteps per batch so validation curves compare across steps.
        g = torch.Generator().manual_seed(1234 + batch_idx)
        latents = self.encode_video(batch)
        cached = (batch["text_emb"], batch["text_mask"]) if "text_emb" in batch else None  # from latent shards
        text, text_mask = self.encode_text(list(batch["caption"]), cached)
        B = latents.shape[0]
        t = (torch.arange(B, dtype=torch.float32) + 0.5) / B  # evenly spread timesteps
        noise = torch.randn(latents.shape, generator=g).to(latents)
        box_maps = self.box_maps(batch, tuple(latents.shape[2:]))  # validation: the boxes as given

        def model_fn(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return self.call_dit(x_t, tt, text, text_mask, None, box_maps)

        out = self.flow.training_losses(model_fn, latents, cond_mask=None, noise=noise, t=t.to(latents))
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=B, sync_dist=True)
        for name, (total, count) in loss_by_timestep_bins(out["loss_per_sample"], out["t"], self.loss_bins).items():
            if count > 0:
                self.log(f"val/{name}", total / count, batch_size=int(count), sync_dist=True)

    # -- optimisation -------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.dit]
        if getattr(self.text_encoder, "trainable", True):
            mods.append(self.text_encoder)
        return mods

    def configure_optimizers(self):
        params = [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def train(self, mode: bool = True):  # frozen parts stay in eval mode
        super().train(mode)
        for part in self._frozen.values():
            part.eval()
        return self
