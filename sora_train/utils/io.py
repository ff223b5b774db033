"""Atomic file writes, a lock file between processes, and content hashing.

Atomic: write to a temporary file in the same directory, fsync, then rename over the target,
so a reader (or a restart after a kill) sees either the old complete file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "", poll_s: float = 0.5) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) between processes.

    ``flock``: the kernel drops the lock when its holder exits, however it exits, so a killed
    holder leaves nothing stale behind (the file stays; it is never the signal). Works across
    processes on one machine and on shared filesystems whose clients forward ``flock``
    (NFSv4, Lustre with ``-o flock``, GPFS). Waiting is logged once, naming ``what``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("waiting for another process to finish %s (lock %s)", what or path, path)
                    waited = True
                time.sleep(poll_s)  # polled, not blocking: Ctrl-C stays responsive
        yield path
    finally:
        os.close(fd)  # releases the lock


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order (for cache keys, configs)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]
