"""Elastic resume: continue a run on a different number of ranks than the one that saved it.

    sora-train experiment=pretrain_1B strategy=deepspeed_stage_2 trainer.devices=4 resume=auto   # saved on 8

What changes with the world size, and what happens to each:

- **ZeRO weights and optimizer state** are partitioned by rank: a ZeRO-1/2/3 checkpoint
  (``step=N.ckpt/``, one optimizer shard per rank) is converted once by DeepSpeed's own
  ``ds_to_universal`` into a sibling folder ``step=N.ckpt.universal/`` (written under
  ``.partial``, renamed when complete; a later resume reuses it), and loaded with DeepSpeed's
  ``checkpoint.load_universal``. Every shard is read with ``torch.load(weights_only=True)``
  (DeepSpeed's plain data classes allowed by name), as ``sora-export`` reads them. The universal
  load restores only what the optimizer holds; ``RestoreFrozen`` puts the frozen parameters (the
  EMA) and buffers back from the original checkpoint.
- **DDP checkpoints** hold full weights and optimizer state: nothing to convert.
- **Data position**: ``VideoDataModule`` maps it (``data/dataset.py``, "Elastic resume"): no
  sample of the interrupted epoch is seen twice or skipped.
- **Random state**: per rank; with another rank count the ranks are reseeded
  (``callbacks/rng.py`` warns), so draws after the resume differ from an uninterrupted run.

Same world size: the checkpoint is loaded as it is (only universal copies whose checkpoint
``keep_last`` has deleted are removed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch

from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger(__name__)

UNIVERSAL_SUFFIX = ".universal"  # not ".ckpt": resume=auto never picks the converted copy itself
_LOCK_SUFFIX = ".lock"
SOURCE_FILE = "converted_from.txt"  # in the copy: the shards it was made from (see _identity)
# Another process converts: how long to wait for it (a 1B-parameter checkpoint takes minutes).
CONVERT_WAIT_S = 3600.0


def zero_world_size(ckpt: str | os.PathLike) -> int | None:
    """The data-parallel world size a DeepSpeed ZeRO checkpoint directory was saved with (one
    optimizer shard per rank), or None when ``ckpt`` is not one."""
    shards = _zero_tag_dir(Path(ckpt))
    if shards is None:
        return None
    optim = list(shards.glob("*_optim_states.pt"))
    if not optim:
        raise SoraError(
            f"resume={ckpt}: {shards} has no *_optim_states.pt shards (saved without optimizer state?): a ZeRO "
            "checkpoint cannot be resumed on another number of ranks without them; resume on the same number of ranks"
        )
    return len(optim)


def _zero_tag_dir(path: Path) -> Path | None:
    latest = path / "latest"
    if not (path.is_dir() and latest.is_file()):
        return None
    tag = path / latest.read_text().strip()
    return tag if tag.is_dir() else None


def universal_checkpoint(ckpt: str | os.PathLike, wait_s: float = CONVERT_WAIT_S) -> Path:
    """A DeepSpeed universal checkpoint of the ZeRO checkpoint ``ckpt``: the sibling
    ``<ckpt>.universal/`` (Lightning's layout: ``latest``, ``latest_universal``, the tag folder).

    Converted once: the first process to take ``<ckpt>.universal.lock`` (an ``mkdir``, atomic on
    shared filesystems too) converts into ``.partial`` and renames it; every other process waits
    for the rename, up to ``wait_s`` seconds.

    Raises:
        SoraError: not a ZeRO checkpoint, deepspeed missing, the conversion failed, or another
            process held the lock for longer than ``wait_s``.
    """
    src = Path(ckpt)
    tag_dir = _zero_tag_dir(src)
    if tag_dir is None:
        raise SoraError(f"resume={src}: not a DeepSpeed ZeRO checkpoint directory (no 'latest' naming a tag folder)")
    out = src.with_name(src.name + UNIVERSAL_SUFFIX)
    lock = src.with_name(out.name + _LOCK_SUFFIX)
    ident = _identity(tag_dir)
    deadline = time.monotonic() + wait_s
    while not _converted_from(out, ident):
        try:
            lock.mkdir()
        except FileExistsError:
            if _stale(lock):
                log.warning("removing %s: the process that held it is gone", lock)
                shutil.rmtree(lock, ignore_errors=True)
                continue
            if time.monotonic() > deadline:
                owner = (lock / "owner").read_text().strip() if (lock / "owner").is_file() else "unknown"
                raise SoraError(
                    f"resume={src}: waited {wait_s:.0f}s for another process ({owner}) converting it to {out}; "
                    f"if that process is gone, delete {lock} and resume again"
                ) from None
            time.sleep(1.0)
            continue
        try:
            (lock / "owner").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
            if not _converted_from(out, ident):  # else: converted while we waited for the lock
                if out.exists():  # a copy of an earlier checkpoint of that name (last.ckpt, a re-saved step)
                    log.info("replacing %s: its checkpoint was saved again since", out)
                    shutil.rmtree(out)
                _convert(src, tag_dir, out, ident)
        finally:
            shutil.rmtree(lock, ignore_errors=True)
    return out


def _stale(lock: Path) -> bool:
    """A lock whose owner ran on this host and has exited (killed during a conversion). An owner
    on another host cannot be checked from here: its lock is waited for."""
    try:
        host, _, pid = (lock / "owner").read_text().split()
    except (OSError, ValueError):
        return False  # not written yet, or already removed
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _identity(tag_dir: Path) -> str:
    """What a conversion was made from: the shards' inodes and modification times. A checkpoint
    saved again under the same name (``last.ckpt``; a step re-saved after resuming from an older
    one) is written as new files, so its old conversion no longer matches."""
    parts = []
    for f in sorted(tag_dir.glob("*_states.pt")):
        st = f.stat()
        parts.append(f"{f.name} {st.st_ino} {st.st_mtime_ns} {st.st_size}")
    return "\n".join(parts) + "\n"


def _converted_from(out: Path, ident: str) -> bool:
    try:
        return (out / SOURCE_FILE).read_text() == ident
    except OSError:
        return False


def _convert(src: Path, tag_dir: Path, out: Path, ident: str) -> None:
    try:
        from deepspeed.checkpoint import ds_to_universal
    except ImportError as e:
        raise SoraError(f"resume={src}: converting a ZeRO checkpoint to another world size needs deepspeed (pip install deepspeed)") from e
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(partial / tag_dir.name), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        inject_missing_state=True,  # our checkpoints carry no tensor-parallel merge patterns: none are needed
    )
    t0 = time.monotonic()
    log.info("converting %s to a DeepSpeed universal checkpoint in %s (once; the world size changed)", src, out)
    try:
        with _weights_only_loads(), contextlib.redirect_stdout(None):
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed's asserts, file errors, refused shards: one line naming the checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        detail = str(e).splitlines()[0] if str(e).strip() else ""
        raise SoraError(f"resume={src}: DeepSpeed's ds_to_universal could not convert it to another world size ({type(e).__name__}: {detail})") from e
    # ds_to_universal names the tag in <output_folder>/../latest_universal; Lightning checks for 'latest'.
    (partial / "latest").write_text(tag_dir.name)
    (partial / SOURCE_FILE).write_text(ident)
    os.replace(partial, out)
    log.info("universal checkpoint written in %.1fs: %s", time.monotonic() - t0, out)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """ds_to_universal reads every shard with ``torch.load(weights_only=False)``; here each of
    those reads is weights-only, with DeepSpeed's plain data classes allowed by name."""
    from unittest import mock

    from sora_train.parallel.consolidate import deepspeed_safe_globals

    real_load = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                return real_load(f, *args, **kwargs)
            except pickle.UnpicklingError as e:  # an object other than tensors and plain containers, or not a checkpoint
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise SoraError(f"{f} cannot be read with torch.load(weights_only=True), the only way shards are read here ({first})") from e

    with mock.patch.object(torch, "load", load):
        yield


def prepare_resume(ckpt: str | None, trainer: Any) -> str | None:
    """The checkpoint to hand ``Trainer.fit(ckpt_path=...)``: ``ckpt`` itself, or - for a ZeRO
    checkpoint saved on another number of ranks than ``trainer`` has - its universal conversion,
    with the strategy's DeepSpeed config set to load it (``checkpoint.load_universal``). Called
    on every rank before ``fit``. A DDP checkpoint is returned as it is (full state)."""
    if not ckpt:
        return ckpt
    remove_orphaned_conversions(Path(ckpt).parent)
    saved = zero_world_size(ckpt)
    if saved is None:
        return ckpt
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(getattr(strategy, "config", None), dict):
        raise SoraError(
            f"resume={ckpt} is a DeepSpeed ZeRO checkpoint (saved on {saved} ranks) but strategy is "
            f"{type(strategy).__name__}; resume it with strategy=deepspeed_stage_N, or start from its weights with "
            f"sora-export and init_from"
        )
    if "zero_optimization" not in strategy.config:
        raise SoraError(f"resume={ckpt} is a ZeRO checkpoint but the DeepSpeed config has no zero_optimization")
    world = int(trainer.world_size)
    if saved == world:
        return ckpt
    log.warning("resume=%s was saved on %d rank(s) and this run has %d: elastic resume through a universal checkpoint", ckpt, saved, world)
    out = universal_checkpoint(ckpt)
    strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    trainer.callbacks.append(RestoreFrozen(ckpt))
    return str(out)


class RestoreFrozen(pl.Callback):
    """Puts back what DeepSpeed's universal load leaves out: it restores the parameters the
    optimizer holds (from the converted fp32 copies) and skips the module state dict, so frozen
    parameters - the EMA copy of the DiT - and buffers would keep their initial values. They are
    read from the original checkpoint (merged by DeepSpeed's zero_to_fp32, weights-only, as
    ``sora-export`` reads it) when training starts, after Lightning's restore; under ZeRO-3 each
    is gathered, set on rank 0 and partitioned again (a collective: every rank runs this hook)."""

    def __init__(self, source: str) -> None:
        self.source = source

    @torch.no_grad()
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from sora_train.parallel.consolidate import read_checkpoint_weights

        state, _ = read_checkpoint_weights(self.source)
        frozen = [(n, p) for n, p in pl_module.named_parameters() if not p.requires_grad and n in state]
        buffers = [(n, b) for n, b in pl_module.named_buffers() if n in state]
        for name, param in frozen:
            value = state[name]
            if hasattr(param, "ds_tensor"):
                _set_zero3_param(param, value)
            else:
                param.data.copy_(value.reshape(param.data.shape))
        for name, buf in buffers:
            buf.copy_(state[name].reshape(buf.shape))
        del state
        log.info("elastic resume: restored %d frozen parameter(s) (the EMA) and %d buffer(s) from %s", len(frozen), len(buffers), self.source)


def remove_orphaned_conversions(ckpt_dir: str | os.PathLike) -> None:
    """Delete universal copies whose checkpoint the checkpoint policy has since removed (keep_last):
    only a resume from that checkpoint would read them."""
    for conv in Path(ckpt_dir).glob(f"*.ckpt{UNIVERSAL_SUFFIX}"):
        if not conv.with_name(conv.name[: -len(UNIVERSAL_SUFFIX)]).exists():
            log.info("removing %s: its checkpoint is gone", conv)
            shutil.rmtree(conv, ignore_errors=True)


def _set_zero3_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a ZeRO-3 parameter to the full tensor ``value``: this rank's slice of the flattened
    tensor goes into its partition (``ds_tensor``: rank r holds elements [r*n, (r+1)*n), zero
    padded - DeepSpeed's layout), and a full copy ZeRO-3 keeps materialised (a "persistent"
    parameter) is set too. Rank-local: no collective."""
    import torch.distributed as dist

    part = param.ds_tensor  # type: ignore[attr-defined]
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_available() and dist.is_initialized() else 0
    flat = value.reshape(-1).to(device=part.device, dtype=part.dtype)
    n = part.numel()
    start = n * rank
    take = max(0, min(n, flat.numel() - start))
    part.data.zero_()
    part.data.view(-1)[:take].copy_(flat[start : start + take])
    if param.data.numel() == value.numel():  # materialised full copy
        param.data.copy_(value.reshape(param.data.shape))
