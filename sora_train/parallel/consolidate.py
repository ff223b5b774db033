"""Checkpoint -> one ``.safetensors`` file of fp32 weights, plus a JSON sidecar.

Two inputs, chosen by what the path is:

- a **directory**: a DeepSpeed ZeRO checkpoint as Lightning's DeepSpeedStrategy writes it
  (``step=1000.ckpt/`` holding ``latest`` and a tag folder of per-rank shards). The fp32
  master weights are merged from every rank's optimizer shard by DeepSpeed's own
  ``zero_to_fp32`` code, so ZeRO 1, 2 and 3 all work and the world size need not match.
- a **file**: a plain Lightning ``.ckpt`` (DDP, single device).

Nothing is ever unpickled beyond tensors and plain containers: every file is read with
``torch.load(weights_only=True)``; for DeepSpeed shards, four of DeepSpeed's plain data classes
(loss scaler, ZeRO stage enum, fragment address) are allowed by name and nothing else.

    consolidate_checkpoint("runs/x/checkpoints/step=1000.ckpt", "dit.safetensors", prefix="model.dit.")
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import sora_train
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json, sha256_file
from sora_train.utils.logging import get_logger

log = get_logger(__name__)

# Lightning < 2.1 wrapped the module, so old state-dict keys start with this.
_LEGACY_WRAPPER_PREFIX = "_forward_module."
_DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def consolidate_checkpoint(
    ckpt_path: str | os.PathLike,
    out_path: str | os.PathLike,
    prefix: str | None = "model.",
    *,
    tag: str | None = None,
) -> Path:
    """Write the weights of a Lightning or DeepSpeed ZeRO checkpoint as one fp32 safetensors file.

    Args:
        ckpt_path: a ZeRO checkpoint directory (the one holding ``latest``, or its tag folder)
            or a Lightning ``.ckpt`` file.
        out_path: the ``.safetensors`` file to write (atomically). The sidecar goes beside it
            with the suffix ``.json``: source, step, ZeRO stage/world size, prefix, sha256.
        prefix: keep only keys that start with this and strip it, e.g. ``"model."`` for the
            LightningModule's ``self.model``, ``"model.dit."`` or ``"ema."`` for a submodule.
            A missing trailing dot is added. ``None`` or ``""`` keeps every key as is.
        tag: DeepSpeed checkpoint tag; default: the one named in ``latest``.

    Returns:
        ``out_path`` as a Path.

    Raises:
        SoraError: the path is neither kind of checkpoint, a file holds objects other than
            tensors and plain containers, or no key starts with ``prefix``.
    """
    src, out = Path(ckpt_path), Path(out_path)
    if out.suffix != ".safetensors":
        raise SoraError(f"consolidate: output {out} must end in .safetensors")
    state_dict, meta = read_checkpoint_weights(src, tag=tag)
    kept = _select(state_dict, prefix, src)
    tensors = _as_fp32_unshared(kept)
    _save_safetensors(tensors, out, meta)

    sidecar = {
        "format": "sora_train.consolidated/1",
        "source": str(src.resolve()),
        "prefix": prefix or "",
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "dtype": "float32",
        "dropped_keys": len(state_dict) - len(kept),
        "sha256": sha256_file(out),
        "sora_train_version": sora_train.__version__,
        **meta,
    }
    atomic_write_json(out.with_suffix(".json"), sidecar)
    log.info("consolidated %s -> %s (%d tensors, %d parameters)", src, out, len(tensors), sidecar["num_parameters"])
    return out


def read_checkpoint_weights(ckpt_path: str | os.PathLike, *, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every weight of a Lightning ``.ckpt`` or a DeepSpeed ZeRO checkpoint directory, merged
    to full tensors (fp32 for ZeRO: the master weights), read without unpickling objects.

    Returns:
        (state_dict keyed as the LightningModule's own ``state_dict()``, metadata: source kind,
        global_step, ZeRO stage and world size where known).

    Raises:
        SoraError: as ``consolidate_checkpoint``.
    """
    src = Path(ckpt_path)
    if not src.exists():
        raise SoraError(f"consolidate: checkpoint {src} does not exist")
    state_dict, meta = _read_zero_checkpoint(src, tag) if src.is_dir() else _read_lightning_checkpoint(src)
    return {_strip(k, _LEGACY_WRAPPER_PREFIX): v for k, v in state_dict.items()}, meta


# --------------------------------------------------------------------------- readers


def _read_lightning_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ckpt = _safe_load(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise SoraError(f"consolidate: {path} is not a Lightning checkpoint (no 'state_dict' mapping)")
    meta = {
        "source_kind": "lightning_ckpt",
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
        "lightning_version": ckpt.get("pytorch-lightning_version"),
    }
    return dict(ckpt["state_dict"]), meta


def _read_zero_checkpoint(path: Path, tag: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    root, tag = _zero_root_and_tag(path, tag)
    try:
        import deepspeed
        from deepspeed.utils import zero_to_fp32
    except ImportError as e:
        raise SoraError(
            f"consolidate: {path} is a DeepSpeed checkpoint directory; reading it needs deepspeed "
            "(pip install deepspeed)"
        ) from e

    shard_dir = root / tag
    # Our own read of the rank-0 model states, for metadata: Lightning stores its client state
    # (global_step, epoch, version) beside DeepSpeed's keys there.
    model_file = next(shard_dir / name for name in _DS_MODEL_STATES if (shard_dir / name).is_file())
    client = _safe_load(model_file, deepspeed_shard=True)
    optim_files = sorted(shard_dir.glob("*_optim_states.pt"))
    if not optim_files:
        raise SoraError(
            f"consolidate: {shard_dir} has no *_optim_states.pt files; fp32 weights of a ZeRO checkpoint live in "
            "the optimizer shards (was it saved without optimizer state?)"
        )
    optim = _safe_load(optim_files[0], deepspeed_shard=True).get("optimizer_state_dict", {})

    with _deepspeed_reads_weights_only(zero_to_fp32), contextlib.redirect_stdout(None):
        # zero_to_fp32 prints progress; the sidecar records what matters.
        state_dict = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    meta = {
        "source_kind": "deepspeed_zero",
        "tag": tag,
        "zero_stage": int(optim.get("zero_stage", 0)),
        "world_size": int(client.get("dp_world_size", len(optim_files))),
        "global_step": client.get("global_step"),
        "epoch": client.get("epoch"),
        "lightning_version": client.get("pytorch-lightning_version"),
        "deepspeed_version": str(client.get("ds_version", deepspeed.__version__)),
    }
    return state_dict, meta


def _zero_root_and_tag(path: Path, tag: str | None) -> tuple[Path, str]:
    """Accept the checkpoint directory (with ``latest``) or its tag folder (with the shards)."""
    if any((path / name).is_file() for name in _DS_MODEL_STATES):
        return path.parent, path.name
    if tag is None:
        latest = path / "latest"
        if not latest.is_file():
            raise SoraError(
                f"consolidate: {path} is a directory but not a DeepSpeed checkpoint: no 'latest' file "
                f"and no {_DS_MODEL_STATES[0]} / {_DS_MODEL_STATES[1]}"
            )
        tag = latest.read_text().strip()
    if not any((path / tag / name).is_file() for name in _DS_MODEL_STATES):
        raise SoraError(f"consolidate: DeepSpeed checkpoint tag folder {path / tag} has no model states file")
    return path, tag


# --------------------------------------------------------------------------- safe loading


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's plain data classes that appear in its checkpoint shards (attributes only)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def deepspeed_safe_globals() -> list[Any]:
    """The classes ``torch.load(weights_only=True)`` must allow to read DeepSpeed's checkpoint
    shards (plain data classes only); for other readers of shards (training/elastic.py)."""
    return _deepspeed_safe_globals()


def _safe_load(path: Path, deepspeed_shard: bool = False) -> Any:
    """``torch.load(weights_only=True)`` that explains a refusal instead of unpickling.

    ``deepspeed_shard`` also allows DeepSpeed's plain data classes (see _deepspeed_safe_globals).
    """
    allowed = _deepspeed_safe_globals() if deepspeed_shard else []
    mmap = zipfile.is_zipfile(path)  # mmap: big checkpoints are not read into memory up front
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # legacy (non-zip) format: torch can't list them
            found = []
        allowed_names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
        objs = ", ".join(g for g in found if g not in allowed_names) or "see the error above"
        raise SoraError(
            f"consolidate: {path} contains pickled Python objects ({objs}), and it is only read with "
            "torch.load(weights_only=True) so that loading a checkpoint cannot run code. Re-save it with "
            "tensors and plain containers only (e.g. no OmegaConf/custom objects in save_hyperparameters), or, "
            "if you trust the file, load it yourself and save its 'state_dict' with torch.save"
        ) from e


class _WeightsOnlyTorch:
    """Stands in for ``torch`` inside DeepSpeed's zero_to_fp32 module: ``load`` is weights-only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        return _safe_load(Path(f), deepspeed_shard=True)


@contextlib.contextmanager
def _deepspeed_reads_weights_only(module: Any) -> Iterator[None]:
    # zero_to_fp32 calls torch.load(..., weights_only=False) on every shard. Swapping the module's
    # `torch` name (not torch.load itself) keeps the change local to that module and this call.
    with mock.patch.object(module, "torch", _WeightsOnlyTorch()):
        yield


# --------------------------------------------------------------------------- writing


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _select(state_dict: dict[str, torch.Tensor], prefix: str | None, src: Path) -> dict[str, torch.Tensor]:
    if not prefix:
        return state_dict
    if not prefix.endswith("."):
        prefix += "."
    kept = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not kept:
        heads = sorted({k.split(".", 1)[0] + "." for k in state_dict})
        raise SoraError(
            f"consolidate: no key of {src} starts with {prefix!r}; top-level prefixes are: {', '.join(heads)}"
        )
    return kept


def _as_fp32_unshared(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Floating tensors as fp32, every tensor contiguous and owning its memory (safetensors
    refuses shared storage; ZeRO-2 merges return views into one flat buffer, tied weights share)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise SoraError(f"consolidate: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach()
        if value.is_floating_point():
            value = value.to(torch.float32)
        out[key] = value.contiguous().clone()
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], out: Path, meta: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    header = {k: str(v) for k, v in meta.items() if v is not None}  # safetensors metadata is str -> str
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
