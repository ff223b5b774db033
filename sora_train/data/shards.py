"""Writing and reading shard sets: webdataset tars + index.json + rejects.jsonl.

A shard set is a directory:

    shard-000000.tar, shard-000001.tar, ...   samples (one key each: media + json)
    index.json                                counts, shape histogram, tool + options
    rejects.jsonl                             one line per rejected input, with a reason

Every writer of shards (the shapes world, `sora-data ingest`, `recaption`, `cache-latents`)
goes through :class:`ShardWriter`, so the contract lives in one place. Each tar is written to
a temporary name and renamed when complete, so a killed job never leaves a truncated shard
under a real name. Members are written as raw bytes (json is serialised here): nothing is
pickled, and readers decode only an allowlist of extensions.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from sora_train import __version__
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json

INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
REQUIRED_META = ("caption", "captions", "fps", "num_frames", "width", "height", "duration", "frame_range", "source")


def shape_key(num_frames: int, height: int, width: int) -> str:
    return f"{num_frames}x{height}x{width}"


class ShardWriter:
    """Write samples into numbered tar shards and an index describing them.

    Args:
        out_dir: the shard set directory (created).
        prefix: shard file prefix.
        max_count: samples per shard before starting the next.
        max_bytes: bytes per shard before starting the next.
        tool: name of the program writing the set (recorded in index.json).
        options: the options it ran with (recorded in index.json; must not hold secrets).
        extra_index: more fields for index.json (e.g. the VAE hash of a latent set).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
        tool: str = "sora_train",
        options: dict[str, Any] | None = None,
        extra_index: dict[str, Any] | None = None,
        start_index: int = 0,
    ) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SoraError(f"cannot create shard directory {self.out_dir}: {e.strerror}") from e
        if not os.access(self.out_dir, os.W_OK):
            raise SoraError(f"shard directory {self.out_dir} is not writable")
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.tool, self.options, self.extra_index = tool, dict(options or {}), dict(extra_index or {})
        self._shard_idx = start_index
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self.shards: list[dict[str, Any]] = []
        self.shape_hist: Counter[str] = Counter()
        self.num_samples = 0
        self.total_seconds = 0.0
        self.keys: set[str] = set()
        self._rejects = open(self.out_dir / REJECTS_NAME, "a", encoding="utf-8")
        self.num_rejects = 0

    # -- samples -----------------------------------------------------------------------------
    def write(self, key: str, media: dict[str, bytes], meta: dict[str, Any]) -> None:
        """Write one sample: ``media`` maps extension -> bytes; ``meta`` becomes ``<key>.json``."""
        if not _KEY_RE.match(key) or "." in key:
            raise ValueError(f"shard key {key!r} must be [A-Za-z0-9_-/] without dots")
        if key in self.keys:
            raise ValueError(f"duplicate shard key {key!r}")
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"sample {key!r}: json is missing required fields {missing}")
        if self._tar is None or self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._next_shard()
        members = dict(media)
        members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "sora"
            self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
            self._bytes += len(data)
        self._count += 1
        self.keys.add(key)
        self.num_samples += 1
        self.total_seconds += float(meta.get("duration") or 0.0)
        self.shape_hist[shape_key(meta["num_frames"], meta["height"], meta["width"])] += 1

    def reject(self, source: str, reason: str, detail: str = "", **extra: Any) -> None:
        """Record an input that was not written, with a machine-readable ``reason``."""
        row = {"source": source, "reason": reason, "detail": detail, **extra}
        self._rejects.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._rejects.flush()
        self.num_rejects += 1

    # -- shard files -------------------------------------------------------------------------
    def _next_shard(self) -> None:
        self._finish_shard()
        name = f"{self.prefix}-{self._shard_idx:06d}.tar"
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.PAX_FORMAT)
        self._count, self._bytes = 0, 0
        self._shard_idx += 1

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp_path is not None
        final = self._tmp_path.with_name(self._tmp_path.name[1:-4])
        with open(self._tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, final)
        self.shards.append({"name": final.name, "count": self._count, "bytes": final.stat().st_size})
        self._tar = None

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write index.json; returns the index."""
        self._finish_shard()
        self._rejects.close()
        index = {
            "format": "sora_train.shards/1",
            "tool": self.tool,
            "tool_version": __version__,
            "options": self.options,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "num_samples": self.num_samples,
            "num_rejects": self.num_rejects,
            "hours": round(self.total_seconds / 3600.0, 6),
            "shape_histogram": dict(sorted(self.shape_hist.items())),
            "shards": self.shards,
            **self.extra_index,
        }
        atomic_write_json(self.out_dir / INDEX_NAME, index)
        return index

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave finished shards, drop the partial one, write no index claiming completeness
            if self._tar is not None:
                self._tar.close()
                if self._tmp_path is not None and self._tmp_path.exists():
                    self._tmp_path.unlink()
                self._tar = None
            self._rejects.close()


# -- reading ---------------------------------------------------------------------------------
def read_index(shard_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise SoraError(f"no {INDEX_NAME} in shard directory {shard_dir} (is it a shard set written by sora-data?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SoraError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def shard_paths(shard_dir: str | os.PathLike) -> list[str]:
    """The tar files of a shard set, in index order."""
    index = read_index(shard_dir)
    paths = [str(Path(shard_dir) / s["name"]) for s in index["shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise SoraError(f"shard {p} is listed in {Path(shard_dir) / INDEX_NAME} but missing")
    return paths


def iter_samples(shard_path: str | os.PathLike, exts: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar: {"__key__": key, ext: bytes, ...}; json is left as bytes."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(shard_path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key_base, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key_base)
                if exts is not None and ext not in exts and ext != "json":
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                f = tar.extractfile(member)
                current[ext] = f.read() if f else b""
    except (tarfile.TarError, OSError) as e:
        raise SoraError(f"unreadable shard {shard_path}: {e}") from e
    if current is not None:
        yield current
