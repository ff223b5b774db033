"""Model export: weights as safetensors + a JSON of how to rebuild each part.

Sampling, evaluation and fine-tuning read exports, never Lightning/DeepSpeed checkpoints, so
nothing a user is handed is ever unpickled. Layout of an export directory (read by
`sora_train.utils.exports`, which `data` shares to fingerprint a part without building it):

    model.safetensors   tensors, prefixed by part: "vae.", "text.", "dit.", "ema."
    model.json          {"parts": {name: {"target": "pkg.Class", "config": {...}}}, "meta": {...}}
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sora_train.utils.errors import SoraError
from sora_train.utils.exports import CONFIG_NAME, WEIGHTS_NAME, is_derived_key, read_export_spec
from sora_train.utils.io import atomic_write_json, sha256_file


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> type:
    """The model class an export names: a ``torch.nn.Module`` subclass defined under
    ``sora_train.models`` and nothing else (not a function, not another package's class), so
    building a part from a crafted model.json can only ever construct one of our models."""
    module, _, name = path.rpartition(".")
    if not module.startswith("sora_train.models."):
        raise SoraError(f"{CONFIG_NAME}: refusing to build {path!r}: only sora_train.models classes are allowed")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SoraError(f"{CONFIG_NAME}: cannot import {path!r} ({e})") from e
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise SoraError(f"{CONFIG_NAME}: refusing to build {path!r}: not a model class")
    return obj


def part_names(export_dir: str | Path) -> list[str]:
    """The parts an export (or a public base folder) holds, read from its model.json alone."""
    from sora_train.models.bases import is_base_folder

    d = Path(export_dir)
    return ["dit", "text", "vae"] if is_base_folder(d) else list(read_export_spec(d)["parts"])


def _check_config(cls: type, config: Any, where: str) -> dict[str, Any]:
    """A part's constructor arguments: a mapping of names the constructor takes (no catch-all)."""
    if not isinstance(config, dict):
        raise SoraError(f"{where}: config must be a mapping, got {type(config).__name__}")
    config = {k: v for k, v in config.items() if k not in getattr(cls, "RETIRED_CONFIG_KEYS", ())}
    params = inspect.signature(cls.__init__).parameters
    named = {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(config) - named)
    if unknown:
        raise SoraError(f"{where}: unknown argument {unknown[0]!r} for {cls.__name__}; valid: {sorted(named)}")
    return config


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write tensors (moved to CPU, contiguous) to ``path`` via a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return path


def export_parts(out_dir: str | Path, parts: dict[str, nn.Module], meta: dict[str, Any] | None = None, weights: dict[str, bool] | None = None) -> Path:
    """Write ``parts`` (name -> module with a ``config()`` method) to ``out_dir``.

    ``weights[name] = False`` records a part's config without its tensors (e.g. a frozen
    pretrained text encoder that is loaded from its own folder).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, Any] = {}
    for name, module in parts.items():
        if not hasattr(module, "config"):
            raise TypeError(f"part {name!r} ({class_path(module)}) has no config() to rebuild it from")
        spec[name] = {"target": class_path(module), "config": module.config()}
        if weights is None or weights.get(name, True):
            for k, v in module.state_dict().items():
                tensors[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    save_safetensors_atomic(tensors, out / WEIGHTS_NAME)
    atomic_write_json(out / CONFIG_NAME, {"parts": spec, "meta": meta or {}})
    return out


def load_parts(export_dir: str | Path, names: list[str] | None = None, map_location: str = "cpu") -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Rebuild parts from an export; returns ({name: module in eval mode}, meta).

    A public base model's diffusers pipeline folder (Wan2.1) is read as an export too
    (`sora_train.models.bases`): its parts are our adapters, built from that folder only."""
    from safetensors import safe_open

    from sora_train.models.bases import is_base_folder, load_base_parts

    d = Path(export_dir)
    if is_base_folder(d):
        return load_base_parts(d, names)
    spec = read_export_spec(d)
    wanted = tuple(f"{n}." for n in spec["parts"] if names is None or n in names)
    try:  # only the tensors of the parts asked for: an EMA beside the DiT doubles what a full read costs
        with safe_open(str(d / WEIGHTS_NAME), framework="pt", device=map_location) as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise SoraError(f"{d / WEIGHTS_NAME}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "re-export or re-copy it") from None
    modules: dict[str, nn.Module] = {}
    for name, part in spec["parts"].items():
        if names is not None and name not in names:
            continue
        if not isinstance(part, dict) or not isinstance(part.get("target"), str):
            raise SoraError(f"{d / CONFIG_NAME}: part {name!r} must be {{\"target\": \"pkg.Class\", \"config\": {{...}}}}")
        cls = import_class(part["target"])
        module = cls(**_check_config(cls, part.get("config", {}), f"{d / CONFIG_NAME}: part {name!r}"))
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            missing, unexpected = module.load_state_dict(sub, strict=False)
            if unexpected or [m for m in missing if not is_derived_key(m)]:
                raise SoraError(f"{d / WEIGHTS_NAME}: part {name!r} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        modules[name] = module.eval()
    meta = dict(spec.get("meta", {}))
    meta["weights_sha256"] = sha256_file(d / WEIGHTS_NAME)
    return modules, meta

