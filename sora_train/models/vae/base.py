"""What every video VAE here shares: `CausalVAE` and the pretrained adapters alike.

The rest of the framework (the DiT task, sampling, cache-latents) uses a VAE only through
this interface: the latent geometry (1 + k * temporal_factor frames -> 1 + k latent frames,
H and W divided by spatial_factor), encode / decode, and the per-channel latent
normalisation the DiT trains in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sora_train.utils.errors import SoraError

if TYPE_CHECKING:
    from sora_train.models.vae.causal_vae import DiagonalGaussian


class VideoVAE(nn.Module):
    """A video VAE: (B, C, F, H, W) pixels in [-1, 1] <-> (B, Cz, f, h, w) latents.

    A subclass sets ``in_channels``, ``latent_channels``, ``temporal_factor``,
    ``spatial_factor`` and ``display_name`` (for messages), registers the (Cz,) buffers
    ``latent_shift`` and ``latent_scale``, and implements ``encode(video, chunk_frames, tile,
    tile_overlap) -> DiagonalGaussian`` and ``decode(z, chunk_frames, tile, tile_overlap)``.
    """

    in_channels: int
    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    display_name: str = "the VAE"

    # ------------------------------------------------------------------ shapes

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(f, h, w) of the latent of a (num_frames, height, width) clip; raises SoraError if invalid."""
        tf, sf = self.temporal_factor, self.spatial_factor
        if num_frames < 1 or (num_frames - 1) % tf != 0:
            raise SoraError(f"num_frames={num_frames}: {self.display_name} needs 1 + k*{tf} frames (1, {1 + tf}, {1 + 2 * tf}, ...)")
        for name, v in (("height", height), ("width", width)):
            if v < sf or v % sf != 0:
                raise SoraError(f"{name}={v}: must be a positive multiple of {self.display_name}'s spatial_factor={sf}")
        return 1 + (num_frames - 1) // tf, height // sf, width // sf

    def pixel_shape(self, f: int, h: int, w: int) -> tuple[int, int, int]:
        """(F, H, W) that a (f, h, w) latent decodes to."""
        if f < 1 or h < 1 or w < 1:
            raise SoraError(f"latent shape (f={f}, h={h}, w={w}): every dimension must be >= 1")
        return 1 + (f - 1) * self.temporal_factor, h * self.spatial_factor, w * self.spatial_factor

    def _check_video(self, video: Tensor) -> None:
        """Raise SoraError unless ``video`` is (B, in_channels, F, H, W) of an encodable shape."""
        if video.ndim != 5 or video.shape[1] != self.in_channels:
            raise SoraError(f"video shape {tuple(video.shape)}: expected (B, {self.in_channels}, F, H, W)")
        self.latent_shape(*video.shape[2:])

    def _check_latent(self, z: Tensor) -> None:
        """Raise SoraError unless ``z`` is (B, latent_channels, f, h, w)."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise SoraError(f"latent shape {tuple(z.shape)}: expected (B, {self.latent_channels}, f, h, w)")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ encode / decode

    def forward(self, video: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, Cz, f, h, w)
        return self.decode(z), posterior  # (B, 3, F, H, W)

    # ------------------------------------------------------------------ latent normalisation

    def normalize(self, z: Tensor) -> Tensor:
        """VAE latent -> diffusion-model latent: (z - shift) * scale per channel (unit variance)."""
        shape = (1, -1, 1, 1, 1)
        return (z - self.latent_shift.view(shape).to(z.dtype)) * self.latent_scale.view(shape).to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of `normalize`: diffusion-model latent -> VAE latent, ready for `decode`."""
        shape = (1, -1, 1, 1, 1)
        return z / self.latent_scale.view(shape).to(z.dtype) + self.latent_shift.view(shape).to(z.dtype)

    @torch.no_grad()
    def set_latent_stats(self, shift: Tensor, scale: Tensor) -> None:
        """Replace the per-channel latent shift and scale (e.g. from `compute_latent_stats`)."""
        for name, v in (("shift", shift), ("scale", scale)):
            v = torch.as_tensor(v)
            if v.shape != (self.latent_channels,):
                raise SoraError(f"latent {name} shape {tuple(v.shape)}: expected ({self.latent_channels},)")
        if not torch.all(torch.as_tensor(scale) != 0):
            raise SoraError("latent scale: every channel's scale must be non-zero")
        self.latent_shift.copy_(torch.as_tensor(shift))
        self.latent_scale.copy_(torch.as_tensor(scale))
