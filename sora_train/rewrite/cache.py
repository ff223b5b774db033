"""On-disk cache of rewrites: one small JSON file per key, written atomically.

Layout: ``<cache_dir>/<key[:2]>/<key>.json`` (256 fan-out folders keep directories small for
millions of captions). One file per key means concurrent writers — threads, or several
``sora-data recaption`` processes sharing a folder on a network filesystem — never corrupt
each other: the last atomic rename wins and every version is a complete, valid record.
A file that cannot be read is treated as a miss and rewritten.

The key is the sha256 of (prompt, image hashes, backend identity): backend, model, system
prompt + examples hash, temperature, length limits. Identities hold no secrets, so neither
do the records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json
from sora_train.utils.logging import get_logger

log = get_logger(__name__)


class RewriteCache:
    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SoraError(f"rewriter cache_dir={str(cache_dir)!r} cannot be created: {e}") from e

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, original: str) -> str | None:
        """The cached rewrite of ``original`` under ``key``, or None on a miss or a bad file."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.debug("ignoring unreadable rewrite cache file %s: %s", path, e)
            return None
        # The original is stored to guard against a key that was computed differently.
        if not isinstance(record, dict) or record.get("original") != original or not isinstance(record.get("text"), str):
            return None
        return record["text"] or None

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Writes a record; a full disk or a read-only folder costs a miss later, not the job."""
        try:
            atomic_write_json(self.path(key), {"key": key, **record})
        except OSError as e:
            log.warning("could not write rewrite cache file %s: %s", self.path(key), e)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("??/*.json"))
