"""Causal 3D video VAE (`causal_vae`), its losses, named sizes, and pretrained adapters.

`pretrained` imports diffusers lazily, so importing this package never needs it.
"""

from sora_train.models.vae.base import VideoVAE
from sora_train.models.vae.causal_vae import CausalVAE, DiagonalGaussian, compute_latent_stats
from sora_train.models.vae.pretrained import PretrainedVideoVAE, load_pretrained_vae
from sora_train.models.vae.sizes import VAE_SIZES, build_vae, param_count

__all__ = [
    "VAE_SIZES",
    "CausalVAE",
    "DiagonalGaussian",
    "PretrainedVideoVAE",
    "VideoVAE",
    "build_vae",
    "compute_latent_stats",
    "load_pretrained_vae",
    "param_count",
]
