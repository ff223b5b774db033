"""Pretrained diffusers video VAEs from a local folder, behind `CausalVAE`'s interface.

    vae = load_pretrained_vae("/models/Wan2.1-T2V-1.3B-Diffusers")   # the pipeline folder or its vae/
    z = vae.normalize(vae.encode(video).mode())                        # what the DiT trains on
    video = vae.decode(vae.denormalize(z))

Supported classes (read from `_class_name` in the folder's config.json):
- AutoencoderKLWan: shift = config.latents_mean, scale = 1 / config.latents_std (Wan's pipelines).
- AutoencoderKLLTXVideo: shift = the model's latents_mean buffer,
  scale = config.scaling_factor / latents_std (LTX-Video's pipelines).
- AutoencoderKLCogVideoX: shift = config.shift_factor or 0, scale = config.scaling_factor.
Each model's own statistics are used; `compute_latent_stats` + `set_latent_stats` can replace them.

Only local folders are read (`local_files_only=True`): no network access at training time.
diffusers is an optional dependency: `pip install 'sora_train[pretrained]'`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from sora_train.models.vae.base import VideoVAE
from sora_train.models.vae.causal_vae import DiagonalGaussian
from sora_train.utils.errors import SoraError

SUPPORTED_CLASSES = ("AutoencoderKLWan", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX")
INSTALL_HINT = "pip install 'sora_train[pretrained]'"


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:  # optional dependency
        raise SoraError(f"pretrained VAEs need the diffusers package: {INSTALL_HINT}") from e
    return diffusers


def _resolve_folder(path: str | Path) -> Path:
    """The folder holding the VAE's config.json: `path` itself or `path/vae` (a pipeline folder)."""
    p = Path(path).expanduser()
    for candidate in (p, p / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise SoraError(f"pretrained vae path {str(p)!r}: no config.json there or in its vae/ subfolder")


def _factors(class_name: str, model: nn.Module) -> tuple[int, int]:
    """(spatial_factor, temporal_factor) of a supported diffusers VAE."""
    cfg = model.config
    if class_name == "AutoencoderKLWan":
        patch = cfg.get("patch_size") or 1
        spatial = cfg.get("scale_factor_spatial") or patch * 2 ** len(cfg["temperal_downsample"])
        temporal = cfg.get("scale_factor_temporal") or 2 ** sum(cfg["temperal_downsample"])
        return int(spatial), int(temporal)
    if class_name == "AutoencoderKLLTXVideo":
        return int(model.spatial_compression_ratio), int(model.temporal_compression_ratio)
    # AutoencoderKLCogVideoX: every block but the last halves space
    return 2 ** (len(cfg["block_out_channels"]) - 1), int(cfg["temporal_compression_ratio"])


def _latent_stats(class_name: str, model: nn.Module, channels: int) -> tuple[Tensor, Tensor]:
    """(shift, scale) such that (z - shift) * scale is what the model's own pipelines feed the DiT."""
    cfg = model.config
    if class_name == "AutoencoderKLWan":
        shift = torch.tensor(cfg["latents_mean"], dtype=torch.float32)
        scale = 1.0 / torch.tensor(cfg["latents_std"], dtype=torch.float32)
    elif class_name == "AutoencoderKLLTXVideo":
        shift = model.latents_mean.detach().float().cpu()
        scale = float(cfg.get("scaling_factor", 1.0)) / model.latents_std.detach().float().cpu()
    else:
        shift = torch.full((channels,), float(cfg.get("shift_factor") or 0.0))
        scale = torch.full((channels,), float(cfg.get("scaling_factor") or 1.0))
    if shift.shape != (channels,) or scale.shape != (channels,):
        raise SoraError(f"{class_name} latent statistics have shape {tuple(shift.shape)}: expected ({channels},)")
    return shift, scale


class PretrainedVideoVAE(VideoVAE):
    """A diffusers video VAE behind the `VideoVAE` interface CausalVAE has: encode/decode/latent_shape/normalize.

    chunk_frames is accepted for interface parity and ignored: these models bound temporal
    memory themselves (Wan decodes frame by frame with a causal cache; CogVideoX batches
    frames). `tile` switches on the model's own spatial tiling for that call.

    An export records it as data — the local folder, the class it must hold and the sha256 of
    the folder's files — and never its weights: `load_parts` rebuilds it from that folder and
    refuses one whose class or contents differ.

    Args:
        model: a loaded diffusers VAE of one of SUPPORTED_CLASSES; None loads it from ``path``.
        decode_timestep: for LTX-Video decoders with timestep conditioning (0.9.1+), the
            timestep passed to `decode` (its pipelines use 0.0 to 0.05).
        path: the local folder it is (or was) loaded from (a pipeline folder or its vae/).
        class_name: the diffusers class ``path`` must hold (checked when given).
        torch_dtype: weights' dtype when loading from ``path``.
        sha256: the folder's `folder_sha256` (checked when given; computed on first `config()`).
    """

    def __init__(self, model: nn.Module | None = None, decode_timestep: float = 0.0, path: str | None = None, class_name: str | None = None,
                 torch_dtype: str = "float32", sha256: str | None = None):
        super().__init__()
        if model is None:
            if path is None:
                raise SoraError("PretrainedVideoVAE: needs a loaded model or the path of its local folder")
            model = _load_model(path, torch_dtype, expected_class=class_name)
            if sha256:
                from sora_train.models.local_folder import check_folder_hash

                check_folder_hash(_resolve_folder(path), sha256, "vae")
        if not isinstance(model, nn.Module):
            raise SoraError(f"PretrainedVideoVAE: model must be a diffusers VAE module, got {type(model).__name__}")
        self.class_name = self.display_name = type(model).__name__
        if self.class_name not in SUPPORTED_CLASSES:
            raise SoraError(f"pretrained vae class {self.class_name!r}: unsupported, expected one of {list(SUPPORTED_CLASSES)}")
        self.torch_dtype = torch_dtype
        self.sha256 = sha256
        self.model = model
        self.path = path
        self.decode_timestep = float(decode_timestep)
        cfg = model.config
        self.latent_channels = int(cfg["z_dim"] if self.class_name == "AutoencoderKLWan" else cfg["latent_channels"])
        self.in_channels = int(cfg.get("in_channels", 3)) if self.class_name != "AutoencoderKLWan" else 3
        self.spatial_factor, self.temporal_factor = _factors(self.class_name, model)
        shift, scale = _latent_stats(self.class_name, model, self.latent_channels)
        self.register_buffer("latent_shift", shift)
        self.register_buffer("latent_scale", scale)

    # ------------------------------------------------------------------ encode / decode

    def _tiling(self, tile: int | None, tile_overlap: int | None):
        model = self.model
        if tile is None:
            return _NoTiling(model)
        overlap = tile // 4 if tile_overlap is None else tile_overlap
        if tile <= 0 or tile % self.spatial_factor != 0 or not 0 <= overlap < tile:
            raise SoraError(f"tile={tile}, tile_overlap={overlap}: tile must be a positive multiple of spatial_factor={self.spatial_factor}, overlap in [0, tile)")
        wanted = {
            "tile_sample_min_height": tile,
            "tile_sample_min_width": tile,
            "tile_sample_stride_height": tile - overlap,
            "tile_sample_stride_width": tile - overlap,
        }
        accepted = inspect.signature(model.enable_tiling).parameters
        model.enable_tiling(**{k: v for k, v in wanted.items() if k in accepted})
        return _NoTiling(model, restore=True)

    def encode(self, video: Tensor, chunk_frames: int | None = None, tile: int | None = None, tile_overlap: int | None = None) -> DiagonalGaussian:
        """(B, 3, F, H, W) in [-1, 1] -> posterior over (B, Cz, f, h, w); chunk_frames is ignored."""
        self._check_video(video)
        dtype = next(self.model.parameters()).dtype
        with self._tiling(tile, tile_overlap):
            dist = self.model.encode(video.to(dtype)).latent_dist
        return DiagonalGaussian(dist.mean.to(video.dtype), dist.logvar.to(video.dtype))

    def decode(self, z: Tensor, chunk_frames: int | None = None, tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """(B, Cz, f, h, w) un-normalised latents -> (B, 3, F, H, W); chunk_frames is ignored."""
        self._check_latent(z)
        dtype = next(self.model.parameters()).dtype
        kwargs = {}
        if self.model.config.get("timestep_conditioning", False) and "temb" in inspect.signature(self.model.decode).parameters:
            kwargs["temb"] = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=dtype)
        with self._tiling(tile, tile_overlap):
            out = self.model.decode(z.to(dtype), **kwargs).sample
        return out.to(z.dtype)

    def config(self) -> dict:
        """Constructor arguments that rebuild this adapter from its folder (no weights: the
        folder holds them; its sha256 is computed once, here, when not given)."""
        if self.sha256 is None and self.path is not None:
            from sora_train.models.local_folder import folder_sha256

            self.sha256 = folder_sha256(_resolve_folder(self.path))
        return {"path": self.path, "class_name": self.class_name, "decode_timestep": self.decode_timestep,
                "torch_dtype": self.torch_dtype, "sha256": self.sha256}


class _NoTiling:
    """Context manager that switches the wrapped model's tiling off on exit (when it turned it on)."""

    def __init__(self, model: nn.Module, restore: bool = False):
        self.model, self.restore = model, restore

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.restore:
            self.model.disable_tiling()
        return False


def load_pretrained_vae(path: str, torch_dtype: str = "float32", decode_timestep: float = 0.0, device: str | None = None) -> PretrainedVideoVAE:
    """Load a diffusers video VAE saved with `save_pretrained` (or a pipeline folder with vae/).

    Hydra: `_target_: sora_train.models.vae.pretrained.load_pretrained_vae`, `path: ...`.
    The weights are frozen-ready but not frozen; call `.requires_grad_(False)` to freeze.
    """
    model = _load_model(path, torch_dtype)
    if device is not None:
        model = model.to(device)
    return PretrainedVideoVAE(model, decode_timestep=decode_timestep, path=str(_resolve_folder(path)), torch_dtype=torch_dtype)


def _load_model(path: str, torch_dtype: str, expected_class: str | None = None) -> nn.Module:
    """The diffusers VAE of a local folder (eval mode), after checking its class and weights."""
    from sora_train.models.local_folder import check_component

    folder = _resolve_folder(path)
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise SoraError(f"{folder / 'config.json'}: not a readable diffusers config ({e})") from None
    if class_name not in SUPPORTED_CLASSES:
        raise SoraError(f"{folder / 'config.json'}: class {class_name!r} unsupported, expected one of {list(SUPPORTED_CLASSES)}")
    if expected_class and class_name != expected_class:
        raise SoraError(f"{folder / 'config.json'}: a {class_name!r}, expected {expected_class!r} (the VAE this model was trained with)")
    check_component(folder, (class_name,), what="vae")
    dtype = getattr(torch, torch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SoraError(f"torch_dtype={torch_dtype!r}: not a torch dtype (float32, bfloat16, float16)")
    diffusers = _import_diffusers()
    return getattr(diffusers, class_name).from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True).eval()


__all__ = ["SUPPORTED_CLASSES", "PretrainedVideoVAE", "load_pretrained_vae"]
