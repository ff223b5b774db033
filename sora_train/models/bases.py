"""Public base models as exports: a local diffusers pipeline folder read where an export is.

A bare diffusers video-VAE folder (AutoencoderKLWan / LTXVideo / CogVideoX, config.json with
its ``_class_name``), and the vae/ of any pipeline folder when only a VAE is asked for, are read
as an export holding a ``vae`` part: ``vae_ckpt=``, ``cache-latents --vae`` and ``sora-eval vae``
take them.

`load_parts` (models/export.py) hands a folder with ``model_index.json`` to `load_base_parts`,
so ``sora-sample --ckpt``, ``init_from=``, ``vae_ckpt=``, ``sora-data cache-latents --vae`` and
``sora-eval vae`` take a Wan2.1 folder as they take one of our exports. The parts are our
adapters, built only from that folder, and the meta carries the base's own sampling
conventions as plain data (its scheduler's shift, its pipeline's steps and guidance, the
flow-match Euler schedule). Supported pipelines: BASE_PIPELINES.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sora_train.utils.errors import SoraError

# The pipeline class in model_index.json -> our name of the family.
BASE_PIPELINES = {"WanPipeline": "wan2.1"}
# WanPipeline's defaults: 50 steps, guidance 5, 81 frames of 480x832 (the 1.3B's resolution).
WAN_SAMPLER = {"steps": 50, "method": "euler", "guidance_scale": 5.0, "schedule": "flow_match_euler"}
WAN_SHAPE = {"num_frames": 81, "height": 480, "width": 832}
# Wan2.1's flow shift when the scheduler config names none (the 480p value of its model card).
WAN_DEFAULT_SHIFT = 3.0


def is_base_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder or a diffusers video-VAE folder (rather
    than one of our exports)."""
    p = Path(path).expanduser()
    if (p / "model.json").is_file():  # ours
        return False
    return (p / "model_index.json").is_file() or vae_folder_class(p) is not None


def vae_folder_class(path: Path) -> str | None:
    """The class of a bare diffusers video-VAE folder (config.json naming one of the adapted
    VAE classes), else None."""
    from sora_train.models.vae.pretrained import SUPPORTED_CLASSES

    cfg = path / "config.json"
    if (path / "model_index.json").is_file() or not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in SUPPORTED_CLASSES else None


def scheduler_shift(root: Path, default: float) -> float:
    """The flow shift of a pipeline folder's scheduler (UniPC's ``flow_shift`` or flow-match
    Euler's ``shift``)."""
    cfg_file = root / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return default
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise SoraError(f"{cfg_file}: not valid JSON ({e})") from None
    shift = cfg.get("flow_shift") if cfg.get("flow_shift") is not None else cfg.get("shift")
    return float(shift) if shift is not None else default


def wan_diffusion(shift: float) -> dict[str, Any]:
    """Wan2.1's flow settings as plain data (`FlowMatching.from_config` reads them): one fixed
    shift for every shape, uniform training timesteps (shifted), and its pipeline's sampler."""
    return {"timestep_sampler": {"kind": "uniform", "mean": 0.0, "std": 1.0}, "shift_base_tokens": 256, "base_shift": shift,
            "max_shift": shift, "use_token_shift": False, "sampler": {**WAN_SAMPLER, "shift": shift}}


def load_base_parts(path: str | Path, names: list[str] | None = None) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """({name: module in eval mode}, meta) of a pipeline folder, parts named as in exports:
    ``dit``, ``text``, ``vae`` (only those in ``names``, when given)."""
    from sora_train.models.local_folder import check_pipeline_folder

    from sora_train.models.vae.pretrained import load_pretrained_vae

    root = Path(path).expanduser()
    if vae_folder_class(root) is not None or not (root / "model_index.json").is_file():  # a VAE alone: only a "vae" part
        return ({"vae": load_pretrained_vae(str(root)).eval()} if names is None or "vae" in names else {}), {"task": "vae", "base": {"path": str(root)}}
    try:
        cls = json.loads((root / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise SoraError(f"{root / 'model_index.json'}: not valid JSON ({e})") from None
    if cls not in BASE_PIPELINES:
        if names is not None and set(names) <= {"vae"}:  # any pipeline's adapted VAE (LTX-Video, CogVideoX) where a VAE export goes
            return {"vae": load_pretrained_vae(str(root)).eval()}, {"task": "vae", "base": {"pipeline": cls, "path": str(root)}}
        raise SoraError(f"{root / 'model_index.json'}: a {cls!r} folder; supported base models: {', '.join(BASE_PIPELINES)} (or one of our exports)")
    from sora_train.models.dit.wan import WAN_COMPONENTS, load_wan_dit
    from sora_train.models.text.umt5 import WanTextEncoder

    wanted = [n for n in ("dit", "text", "vae") if names is None or n in names]
    sub = {"dit": ["transformer"], "text": ["text_encoder", "tokenizer"], "vae": ["vae"]}
    check_pipeline_folder(root, tuple(BASE_PIPELINES), {s: WAN_COMPONENTS[s] for n in wanted for s in sub[n]})
    parts: dict[str, nn.Module] = {}
    if "dit" in wanted:
        parts["dit"] = load_wan_dit(str(root)).eval()
    if "text" in wanted:
        parts["text"] = WanTextEncoder(str(root)).eval()
    if "vae" in wanted:
        parts["vae"] = load_pretrained_vae(str(root)).eval()
    shift = scheduler_shift(root, WAN_DEFAULT_SHIFT)
    meta = {"task": "dit", "base": {"pipeline": cls, "family": BASE_PIPELINES[cls], "path": str(root)}, "diffusion": wan_diffusion(shift),
            "sampler": dict(wan_diffusion(shift)["sampler"]), "train_shape": dict(WAN_SHAPE), "weights_sha256": None}
    return parts, meta


__all__ = ["BASE_PIPELINES", "is_base_folder", "load_base_parts", "scheduler_shift", "wan_diffusion"]
