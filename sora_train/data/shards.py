"""The shard-set contract: webdataset tars + index.json + rejects.jsonl, written and read here.

A shard set is a directory:

    shard-000000.tar, shard-000001.tar, ...   samples (one key each: media + json)
    index.json                                counts, shape histogram, tool + options
    rejects.jsonl                             one line per rejected input, with a reason

Every writer of shards (the shapes world, `sora-data ingest`, `recaption`, `cache-latents`)
goes through :class:`ShardWriter`, and every reader of tars (the loaders, the tools) through
:func:`iter_tar_samples`, so the contract lives in one place. Each tar is written to a
temporary name and renamed when complete, so a killed job never leaves a truncated shard
under a real name. Members are written as raw bytes (json is serialised here): nothing is
pickled, and the loaders keep only an allowlist of extensions. Resumable sets (a ledger of
finished shards, re-run rejects, the history of runs) are :mod:`sora_train.data.shardset`.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from sora_train import __version__
from sora_train.data.video_io import MEDIA_EXTS
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json

INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_FORMAT = "sora_train.shards/1"
SHARD_PREFIX = "shard"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
REQUIRED_META = ("caption", "captions", "fps", "num_frames", "width", "height", "duration", "frame_range", "source")
# Tar members the loaders keep; anything else (a pickle among them) is never even read.
ALLOWED_EXTS = frozenset(MEDIA_EXTS + ("json", "txt"))


class UnreadableShard(SoraError):
    """A tar that is corrupt, cut short or cannot be opened; the message names it. Samples
    before the damage were already yielded, so a loader can count it and move on."""


def shape_key(num_frames: int, height: int, width: int) -> str:
    return f"{num_frames}x{height}x{width}"


class Tally:
    """The shape histogram and hours of a set, as index.json reports them."""

    def __init__(self) -> None:
        self.shapes: Counter[str] = Counter()
        self.seconds = 0.0

    def add(self, sample: dict[str, Any]) -> None:
        """Count a sample's json (or its ledger entry: the same fields)."""
        self.shapes[shape_key(sample["num_frames"], sample["height"], sample["width"])] += 1
        self.seconds += float(sample.get("duration") or 0.0)


def index_record(tool: str, options: dict[str, Any], shards: list[dict[str, Any]], tally: Tally, num_rejects: int, **extra: Any) -> dict[str, Any]:
    """index.json of a set: its ``shards`` ({name, count, bytes}, in order) and their samples' tally."""
    return {
        "format": SHARD_FORMAT,
        "tool": tool,
        "tool_version": __version__,
        "options": options,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_samples": sum(int(s["count"]) for s in shards),
        "num_rejects": num_rejects,
        "hours": round(tally.seconds / 3600.0, 6),
        "shape_histogram": dict(sorted(tally.shapes.items())),
        "shards": shards,
        **extra,
    }


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
        start_index: number of the first shard (a resumed set goes on after its last one).
        on_shard: called with ``{"name", "count", "bytes"}`` of each shard once it has its
            final name (a resumable set's ledger records it then, never earlier).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = SHARD_PREFIX,
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
        tool: str = "sora_train",
        options: dict[str, Any] | None = None,
        extra_index: dict[str, Any] | None = None,
        start_index: int = 0,
        on_shard: Callable[[dict[str, Any]], None] | None = None,
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
        self.on_shard = on_shard
        self._shard_idx = start_index
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self.shards: list[dict[str, Any]] = []
        self.tally = Tally()
        self.keys: set[str] = set()
        self._rejects = open(self.out_dir / REJECTS_NAME, "a", encoding="utf-8")
        self.num_rejects = 0

    @property
    def num_samples(self) -> int:
        return len(self.keys)

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
        self.tally.add(meta)

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
        # A temporary name of this writer's own: two writers racing on one directory (which
        # callers prevent with a lock) still never write into, or rename, each other's file.
        self._tmp_path = self.out_dir / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self._final_path = self.out_dir / name
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.PAX_FORMAT)
        self._count, self._bytes = 0, 0
        self._shard_idx += 1

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp_path is not None
        final = self._final_path
        assert final is not None
        with open(self._tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, final)
        shard = {"name": final.name, "count": self._count, "bytes": final.stat().st_size}
        self.shards.append(shard)
        self._tar = None
        if self.on_shard is not None:
            self.on_shard(shard)

    def finish(self) -> None:
        """Finish the last shard and the rejects log, writing no index (a resumable set writes
        one over all its runs)."""
        self._finish_shard()
        self._rejects.close()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write index.json of what this writer wrote; returns it."""
        self.finish()
        index = index_record(self.tool, self.options, self.shards, self.tally, self.num_rejects, **self.extra_index)
        atomic_write_json(self.out_dir / INDEX_NAME, index)
        return index

    def abort(self) -> None:
        """Keep finished shards, drop the partial one, write no index claiming completeness."""
        if self._tar is not None:
            self._tar.close()
            if self._tmp_path is not None and self._tmp_path.exists():
                self._tmp_path.unlink()
            self._tar = None
        self._rejects.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def sample_entry(key: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What an index (and a ledger) keeps of a sample: its key, shape and duration."""
    return {"key": key, "num_frames": meta["num_frames"], "height": meta["height"], "width": meta["width"],
            "duration": float(meta.get("duration") or 0.0)}


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


def _open_stream(url: str):
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


def iter_tar_samples(url: str | os.PathLike, keep: Collection[str] | None = ALLOWED_EXTS) -> Iterator[dict[str, Any]]:
    """Stream one tar (a path, or a URL ``webdataset.gopen`` opens: http(s)://, pipe:, ...):
    yields ``{"__key__": key, ext: bytes, ...}`` per sample, in tar order.

    The key is the member's path up to the first dot of its name; extensions are lower case.
    Only members whose extension is in ``keep`` are read (None: every member), but a sample
    is yielded even when none of its members is kept, so a reader can count it. Raises
    :class:`UnreadableShard` at the damage of a corrupt or truncated tar.
    """
    url = os.fspath(url)
    current: dict[str, Any] | None = None
    try:
        with _open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                key = f"{dirname}/{stem}" if dirname else stem
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                ext = ext.lower()
                if keep is None or ext in keep:
                    f = tar.extractfile(member)
                    current[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UnreadableShard(f"unreadable shard {url}: {e}") from e
    if current is not None:
        yield current


def iter_samples(shard_path: str | os.PathLike, exts: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar, json (left as bytes) and ``exts`` kept (None: every member)."""
    return iter_tar_samples(shard_path, None if exts is None else {"json", *exts})
