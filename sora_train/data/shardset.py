"""Resumable shard sets: what `sora-data ingest`, `recaption` and `cache-latents` write.

A resumable set is a shard set (see `shards.py`) plus its ledger:

    done.jsonl     one row per finished shard (ingest: per source and shard) naming the samples
                   in it, appended right after the shard is renamed into place - never before,
                   so it never claims a sample that is not on disk

and, in index.json, ``options_hash`` and ``runs`` (one summary per run, oldest first).

Re-running a tool into the same directory resumes: it must have the same identity (options,
and whatever else decides the bytes written: the re-writer, the VAE); keys in the ledger are
skipped; a killed run's partial shard is deleted and the newest finished shard's samples that
the ledger lacks (a kill between the rename and the append) are adopted by reading it; new
samples go into shards numbered after the last one; inputs looked at again replace their old
rows in rejects.jsonl; index.json is rebuilt from the ledger over every run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sora_train.data.shards import INDEX_NAME, REJECTS_NAME, SHARD_PREFIX, ShardWriter, Tally, index_record, iter_samples, sample_entry
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json, atomic_write_text
from sora_train.utils.logging import get_logger

log = get_logger(__name__)

LEDGER_NAME = "done.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a .jsonl file ([] when there is none), passing over a half-written last line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a half-written last line from a killed run
    return rows


def _jsonl(rows: Iterable[dict[str, Any]], sort_keys: bool = False) -> str:
    return "".join(json.dumps(r, sort_keys=sort_keys, ensure_ascii=False) + "\n" for r in rows)


def diff_options(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key=old there, new here`` for every (nested) option that differs."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_options(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}={a!r} there, {b!r} here")
    return out


class ShardLedger:
    """done.jsonl with one row per finished shard: ``{"shard", "options_hash", "samples":
    [entry, ...]}``; an entry is :func:`~sora_train.data.shards.sample_entry` plus what the tool
    adds (recaption: the rewrite ``status``). ``describe(key, meta)`` makes the entry of a
    sample found in a shard the ledger does not know."""

    entries_field = "samples"

    def __init__(self, out: Path, options_hash: str, describe: Callable[[str, dict[str, Any]], dict[str, Any]] = sample_entry) -> None:
        self.path = Path(out) / LEDGER_NAME
        self.options_hash = options_hash
        self.describe = describe
        if self.path.is_file():
            text = self.path.read_bytes()
            if text and not text.endswith(b"\n"):  # a killed append: drop the partial row
                atomic_write_text(self.path, text[: text.rfind(b"\n") + 1].decode("utf-8"))
        self.rows = read_jsonl(self.path)
        self.keys = {e["key"] for _, e in self.entries()}
        self._pending: list[tuple[Any, dict[str, Any]]] = []  # (group, entry) in write order

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(shard name, entry) of every recorded sample."""
        for r in self.rows:
            for e in r[self.entries_field]:
                yield r["shard"], e

    def record(self, entry: dict[str, Any], group: Any = None) -> None:
        """A sample just written; it is appended when its shard is finished."""
        self._pending.append((group, entry))

    def shard_done(self, shard: dict[str, Any]) -> None:
        """``ShardWriter.on_shard``: every pending sample is in the shard just finished (a write
        that starts a new shard finishes the old one before its own sample is recorded)."""
        done, self._pending = self._pending, []
        self._append(self._rows(shard["name"], done))

    def _rows(self, shard: str, done: list[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
        return [{"shard": shard, "options_hash": self.options_hash, self.entries_field: [e for _, e in done]}]

    def adopt(self, shard: Path) -> int:
        """Record the samples of a finished shard that the ledger does not know (a run killed
        between renaming the shard and appending its row). Returns how many."""
        found = []
        for sample in iter_samples(shard, exts=()):
            if sample["__key__"] not in self.keys and "json" in sample:
                found.append((sample["__key__"], json.loads(sample["json"])))
        if found:
            self._append(self._adopted(shard.name, found))
        return len(found)

    def _adopted(self, shard: str, found: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return self._rows(shard, [(None, self.describe(key, meta)) for key, meta in found])

    def forget(self, missing: set[str]) -> int:
        """Drop what the ledger records in shards that are no longer on disk (deleted by hand to
        redo them); their samples are written again. Returns how many samples."""
        before = len(self.keys)
        self.rows = self._without(missing)
        atomic_write_text(self.path, _jsonl(self.rows, sort_keys=True))
        self.keys = {e["key"] for _, e in self.entries()}
        return before - len(self.keys)

    def _without(self, missing: set[str]) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["shard"] not in missing]

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_jsonl(rows, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows
        self.keys.update(e["key"] for r in rows for e in r[self.entries_field])


@dataclass(frozen=True)
class ShardSetSpec:
    """Who writes a resumable set and what must match to resume it.

    Args:
        tool: the program (index.json ``tool``; named when a directory is not its own).
        label: how messages name the directory (``--out data/x``).
        verb: what the tool did, for ``<label> was <verb> with a different <option>``.
        options: index.json ``options``: what decides the samples written.
        options_hash: hash of ``identity``; every ledger row carries it.
        identity: what must be the same to resume (default ``options``).
        reject_field: the rejects.jsonl field that names an input: an input looked at again
            replaces its old rows.
        record_name: a file that holds ``identity`` from before the first shard (so a set
            whose first run was killed still says what made it).
        failure: raised when the directory cannot be used (the tools exit 1 for it).
        sources: input sets, which must not be the output.
    """

    tool: str
    label: str
    verb: str
    options: dict[str, Any]
    options_hash: str
    identity: dict[str, Any] | None = None
    reject_field: str = "source"
    record_name: str | None = None
    failure: type[SoraError] = SoraError
    sources: tuple[Path, ...] = field(default=())


class ShardSetWriter:
    """A resumable shard set, opened for one run (see module docstring).

    ``with ShardSetWriter(...) as out:`` writes through :meth:`write` / :meth:`reject`;
    leaving the block finishes the last shard (an exception drops the partial shard and writes
    no index); :meth:`close` then writes index.json over every run. ``out.done`` holds the
    keys of earlier runs, ``out.ledger`` the ledger.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        spec: ShardSetSpec,
        ledger: Callable[[Path, str], ShardLedger] = ShardLedger,
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
    ) -> None:
        self.out, self.spec = Path(out), spec
        self.ledger, start_index = self._open(ledger)
        self.done = frozenset(self.ledger.keys)
        index = self._read_index()
        self._old_runs = list(index.get("runs") or [])
        self._old_rejects = len(read_jsonl(self.out / REJECTS_NAME))
        self.writer = ShardWriter(self.out, prefix=SHARD_PREFIX, max_count=max_count, max_bytes=max_bytes, tool=spec.tool,
                                  options=spec.options, start_index=start_index, on_shard=self.ledger.shard_done)

    # -- opening ---------------------------------------------------------------------------------
    def _open(self, make_ledger: Callable[[Path, str], ShardLedger]) -> tuple[ShardLedger, int]:
        """Check the directory, load the ledger, clean up after a killed run; -> (ledger, next shard number)."""
        out, spec = self.out, self.spec
        if out.exists() and not out.is_dir():
            raise spec.failure(f"{spec.label} is a file, not a directory")
        for src in spec.sources:
            if out.resolve() == Path(src).resolve():
                raise SoraError(f"{spec.label} is an input shard set; write the new set to another directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise spec.failure(f"cannot create {spec.label}: {e.strerror}") from None
        if not os.access(out, os.W_OK):
            raise spec.failure(f"{spec.label} is not writable")
        ledger = make_ledger(out, spec.options_hash)
        shards = sorted(out.glob(f"{SHARD_PREFIX}-*.tar"))
        markers = [LEDGER_NAME] + ([spec.record_name] if spec.record_name else [])
        if not any((out / m).exists() for m in markers) and (shards or (out / INDEX_NAME).exists()):
            raise SoraError(f"{spec.label} holds a shard set not written by {spec.tool} (no {LEDGER_NAME}); use an empty or new directory")
        self._check_identity(ledger)
        for tmp in out.glob(f".{SHARD_PREFIX}-*.tar*.tmp"):  # the shard being written when a run was killed
            tmp.unlink()
        known = {shard for shard, _ in ledger.entries()}
        missing = known - {s.name for s in shards}
        if missing:
            log.warning("%s: %d samples of shards no longer on disk (%s) will be written again",
                        spec.label, ledger.forget(missing), ", ".join(sorted(missing)))
        # Each shard's rows are appended before the next shard can be finished, so only the newest
        # can hold samples the ledger does not know - or every shard, for a set written before
        # the ledger (record_name alone).
        for shard in [s for s in shards[:-1] if s.name not in known] + shards[-1:]:
            adopted = ledger.adopt(shard)
            if adopted:
                log.warning("%s: recorded %d samples that a killed run had not", shard.name, adopted)
        if spec.record_name:
            atomic_write_json(out / spec.record_name, self._identity)
        return ledger, (int(shards[-1].stem.rsplit("-", 1)[1]) + 1 if shards else 0)

    @property
    def _identity(self) -> dict[str, Any]:
        return self.spec.options if self.spec.identity is None else self.spec.identity

    def _check_identity(self, ledger: ShardLedger) -> None:
        spec, new = self.spec, self._identity
        theirs = {r.get("options_hash") for r in ledger.rows} - {spec.options_hash}
        record = self.out / spec.record_name if spec.record_name else None
        if record is not None and record.is_file():
            try:
                old = json.loads(record.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SoraError(f"{record}: not valid JSON ({e}); use a new directory") from None
            theirs |= {"in " + record.name} if old != new else set()
        else:
            old = self._read_index().get("options") or {}
        if not theirs:
            return
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] if old else []
        detail = ", ".join(diff_options(old, new)) if changed else "options hash " + ", ".join(sorted(map(str, theirs)))
        raise SoraError(
            f"{spec.label} was {spec.verb} with a different {'/'.join(changed) or 'options hash'} ({detail}); "
            "use the same settings or a new directory"
        )

    def _read_index(self) -> dict[str, Any]:
        try:
            index = json.loads((self.out / INDEX_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return index if isinstance(index, dict) else {}

    # -- writing ---------------------------------------------------------------------------------
    def write(self, key: str, media: dict[str, bytes], meta: dict[str, Any], group: Any = None, **entry: Any) -> None:
        """Write one sample and record it in the ledger (with ``entry``'s extra fields; ``group``:
        what the ledger groups it by, e.g. ingest's source)."""
        self.writer.write(key, media, meta)
        self.ledger.record({**sample_entry(key, meta), **entry}, group)

    def reject(self, source: str, reason: str, detail: str = "", **extra: Any) -> None:
        self.writer.reject(source, reason, detail, **extra)

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.writer.finish()
        else:  # Ctrl-C, or a bug: keep finished shards, drop the partial one, write no index
            self.writer.abort()

    def close(self, run: dict[str, Any], reevaluated: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
        """Replace the old reject rows of ``reevaluated`` inputs, write index.json over every run
        (``run`` appended to ``runs``, ``extra`` added) and return it."""
        self._rewrite_rejects(set(reevaluated))
        counts: Counter[str] = Counter()
        tally = Tally()
        seen: set[str] = set()
        for shard, entry in self.ledger.entries():
            if entry["key"] not in seen:
                seen.add(entry["key"])
                counts[shard] += 1
                tally.add(entry)
        shards = [{"name": n, "count": counts[n], "bytes": (self.out / n).stat().st_size} for n in sorted(counts)]
        rejects = read_jsonl(self.out / REJECTS_NAME)
        index = index_record(
            self.spec.tool, self.spec.options, shards, tally, len(rejects),
            options_hash=self.spec.options_hash,
            rejects_by_reason=dict(Counter(r.get("reason") for r in rejects).most_common()),
            runs=self._old_runs + [run],
            **extra,
        )
        atomic_write_json(self.out / INDEX_NAME, index)
        return index

    def _rewrite_rejects(self, reevaluated: set[str]) -> None:
        """Old reject rows of inputs looked at again this run are replaced by this run's rows."""
        path, field_name = self.out / REJECTS_NAME, self.spec.reject_field
        rows = read_jsonl(path)
        keep = [r for r in rows[: self._old_rejects] if r.get(field_name) not in reevaluated] + rows[self._old_rejects :]
        if len(keep) != len(rows):
            atomic_write_text(path, _jsonl(keep))


__all__ = ["LEDGER_NAME", "ShardLedger", "ShardSetSpec", "ShardSetWriter", "diff_options", "read_jsonl"]
