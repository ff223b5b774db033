"""The export format, read without building a model, and the fingerprint of a model part.

An export directory (written by `sora_train.models.export`) holds

    model.safetensors   tensors, prefixed by part: "vae.", "text.", "dit.", "ema."
    model.json          {"parts": {name: {"target": "pkg.Class", "config": {...}}}, "meta": {...}}

It lives here, below both `data` (latent sets record which VAE made them and refuse another)
and `models` (which rebuilds the parts), so the two read one format by one set of rules.

A fingerprint is sha256 over a part's class, its constructor config (keys naming a local path
and ``trainable`` dropped: moving a model folder or unfreezing it does not change what it
computes) and every state_dict tensor (name, dtype, shape, bytes) in name order. It depends
only on the module, never on which export file held it, so :func:`export_fingerprint` of a
VAE run's export, of a DiT run's export holding the same VAE, and :func:`module_fingerprint`
of the module agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from sora_train.utils.errors import SoraError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"


def is_derived_key(key: str) -> bool:
    """A state-dict key a module rebuilds itself (non-persistent caches, e.g. rotary tables):
    absent from exports and checkpoints without being missing."""
    return key.endswith(("_cache", ".freqs"))


def read_export_spec(export_dir: str | os.PathLike) -> dict[str, Any]:
    """model.json of an export directory (``{"parts": {...}, "meta": {...}}``), checked to be one."""
    d = Path(export_dir)
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise SoraError(f"{d} is not a sora_train export (needs {CONFIG_NAME} and {WEIGHTS_NAME}); make one with sora-train or `sora-train ... export`")
    try:
        spec = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SoraError(f"{d / CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("parts"), dict):
        raise SoraError(f"{d / CONFIG_NAME}: expected an object with a 'parts' mapping")
    for name, part in spec["parts"].items():
        if not isinstance(part, dict) or not isinstance(part.get("target"), str) or not isinstance(part.get("config"), dict):
            raise SoraError(f"{d / CONFIG_NAME}: part {name!r} needs a 'target' string and a 'config' object")
    return spec


def _identity_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not str(k).endswith("path") and k != "trainable"}


def fingerprint(target: str, config: dict[str, Any], tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 of a part from its class path, constructor config and (name, tensor) pairs."""
    h = hashlib.sha256()
    h.update(json.dumps({"target": target, "config": _identity_config(config)}, sort_keys=True, default=str).encode("utf-8"))
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bf16 too)
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """The fingerprint of a model part: class + config() + state_dict bytes (see module doc)."""
    if not hasattr(module, "config"):
        raise SoraError(f"{type(module).__name__}: has no config() to fingerprint")
    cls = type(module)
    return fingerprint(f"{cls.__module__}.{cls.__qualname__}", module.config(), module.state_dict().items())


def export_fingerprint(export_dir: str | os.PathLike, part: str = "vae") -> str:
    """:func:`module_fingerprint` of ``part`` of an export directory, read without building the model."""
    from safetensors import safe_open

    d = Path(export_dir)
    spec = read_export_spec(d)["parts"].get(part)
    if spec is None:
        raise SoraError(f"{d / CONFIG_NAME}: the export holds no {part!r} part")
    prefix = f"{part}."
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        names = [k for k in f.keys() if k.startswith(prefix)]
        if not names:
            raise SoraError(f"{d / WEIGHTS_NAME}: no tensors for part {part!r} (exported config-only), so it cannot be fingerprinted")
        return fingerprint(spec["target"], spec["config"], ((k[len(prefix):], f.get_tensor(k)) for k in names))


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_fingerprint", "fingerprint", "module_fingerprint", "read_export_spec"]
