"""Data preparation as array jobs: `--part K/N` for ingest, recaption and cache-latents, and
`sora-data merge OUT`, which joins the parts into one shard set.

    sora-data ingest footage/ --out data/shards/mine --part 0/4      # ... --part 3/4, anywhere
    sora-data merge data/shards/mine                                 # once all four are done
    # on Slurm (SLURM_ARRAY_TASK_ID / _COUNT pick the part): docs/launching.md
    sbatch --array=0-3 launch/sbatch/data_array.sbatch ingest footage/ --out data/shards/mine

**The split.** Each tool lists its work units exactly as a one-machine run orders them (ingest:
the input files, walked and sorted; recaption and cache-latents: the input shard files, in
index order) and part K of N takes the contiguous range ``[K*M//N, (K+1)*M//N)`` of the M
units. Contiguous, not every N-th: the parts laid end to end in part order are the one-machine
run's order, so the merged set holds the same samples in the same order (only the shard
boundaries differ), and each input shard is read by one part only.

**A part** is an ordinary resumable shard set (`sora_train.data.shardset`) written to
``OUT/parts/part-K-of-N/``; ``part.json`` is written there (atomically) last, once the part's
index.json is. Re-running a part that has its part.json is a no-op; a part without one (killed,
failed) resumes from its ledger like any re-run. part.json records the tool, its options hash
and the hash of the whole unit list, so parts made from different inputs or options never merge.

**The merge** checks that parts 0..N-1 of one N are all finished and agree, that no sample key
is in two parts (ingest: the same bytes under a second name in a later part are left out and
rejected as `duplicate`, as one run does), then moves (renames: no copy, except a shard
rewritten without such a duplicate) every part's shards into OUT numbered in part order,
writes OUT/done.jsonl (the parts' ledgers, so a later one-machine run into OUT resumes it),
OUT/rejects.jsonl (the parts' rows, in part order) and, last, OUT/index.json: counts,
shape histogram and hours recomputed over all samples, ``runs`` = every part's runs (each with
its ``part``), ``merged_from``. A killed merge is re-run (``.merge-plan.json`` marks one in
progress); a finished one is a no-op. Parts keep their part.json and ledger (the shards moved),
so a requeued array task after the merge does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

from sora_train.data.shards import INDEX_NAME, REJECTS_NAME, SHARD_PREFIX, Tally, index_record
from sora_train.data.shardset import LEDGER_NAME, read_jsonl
from sora_train.data_tools.probe import console, display_path, progress, table
from sora_train.utils import get_logger, stable_hash
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json, atomic_write_text, file_lock

log = get_logger(__name__)

PARTS_DIR = "parts"
PARTS_ENV = "SORA_DATA_PARTS"  # N, when the array's task ids are part numbers but not one range 0..N-1
PART_RECORD = "part.json"
PLAN_NAME = ".merge-plan.json"
_PART_RE = re.compile(r"^part-(\d+)-of-(\d+)$")
_PART_ARG_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
# index.json fields that the merge recomputes; every other field is the tool's own (the VAE
# hash, the re-writer, ...), equal in every part, and taken from part 0.
_RECOMPUTED = {"format", "tool", "tool_version", "options", "created", "num_samples", "num_rejects", "hours",
               "shape_histogram", "shards", "options_hash", "rejects_by_reason", "runs", "merged_from"}
# ... except these, which are sums over the parts.
_SUMMED = ("rewrite_status",)

T = TypeVar("T")


class MergeFailed(SoraError):
    """The merged set holds no sample (exit status 1, not the usage error's 2)."""

    exit_code = 1


@dataclass(frozen=True)
class Part:
    """Part ``index`` (from 0) of ``count``; ``origin`` says where it came from (for messages)."""

    index: int
    count: int
    origin: str = "--part"

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return f"part-{self.index}-of-{self.count}"

    def dir(self, out: str | os.PathLike) -> Path:
        return Path(out) / PARTS_DIR / self.name

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, end) of this part's units among ``total``: contiguous, sizes differ by at most 1."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    def select(self, units: Sequence[T]) -> list[T]:
        start, end = self.bounds(len(units))
        return list(units[start:end])


def parse_part(text: str) -> Part:
    """``K/N`` -> Part(K, N); a one-line SoraError naming --part otherwise."""
    m = _PART_ARG_RE.match(text or "")
    if not m:
        raise SoraError(f"--part {text!r}: expected K/N, this task's part K of N counting from 0 (e.g. --part 0/4 ... --part 3/4)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise SoraError(f"--part {text}: N must be >= 1")
    if k >= n:
        raise SoraError(f"--part {text}: K must be in 0..{n - 1} (parts count from 0: {n} parts are 0/{n} ... {n - 1}/{n})")
    return Part(k, n)


def resolve_part(arg: str | None, env: Mapping[str, str] | None = None) -> Part | None:
    """The part this process works on: ``--part K/N``; else, in a Slurm array task, the task's
    place in the array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT),
    or with SORA_DATA_PARTS=N set, part SLURM_ARRAY_TASK_ID of N (to redo some parts:
    ``--array=3,17``); else None (the whole job). ``--part all``: the whole job even in an array
    task (an array whose tasks ingest different folders)."""
    if arg is not None:
        return None if arg.strip().lower() == "all" else parse_part(arg)
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT", PARTS_ENV)
    seen = " ".join(f"{n}={env.get(n)}" for n in names if n in env)
    if env.get(PARTS_ENV):
        try:
            part = Part(int(env["SLURM_ARRAY_TASK_ID"]), int(env[PARTS_ENV]), origin=seen)
        except ValueError:
            raise SoraError(f"{PARTS_ENV} must be the number of parts ({seen})") from None
        if not 0 <= part.index < part.count:
            raise SoraError(f"SLURM_ARRAY_TASK_ID must be in 0..{part.count - 1} with {PARTS_ENV}={part.count} ({seen})")
        return _announce(part)
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        hi = int(env.get("SLURM_ARRAY_TASK_MAX", str(lo + count - 1)))
    except (KeyError, ValueError):
        raise SoraError(f"a Slurm array task without a usable SLURM_ARRAY_TASK_COUNT ({seen}): give --part K/N") from None
    if hi - lo + 1 != count or not lo <= task <= hi:
        raise SoraError(f"the Slurm array is not one range of task ids ({seen}): submit --array=0-{count - 1} (a throttle %M is fine), set {PARTS_ENV}=N (the task id is the part), or give --part K/N")
    return _announce(Part(task - lo, count, origin=f"SLURM_ARRAY_TASK_ID={task}"))


def _announce(part: Part) -> Part:
    print(f"sora-data: part {part.label} of the work, from the Slurm array ({part.origin}); --part all does it all", file=sys.stderr)
    return part


def add_part_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", metavar="K/N", default=None,
                   help="do part K of N (from 0) of the work into OUT/parts/part-K-of-N; join them with `sora-data merge OUT`. "
                        "Default in a Slurm array task: the task's place in the array (--part all: the whole work)")


def units_hash(units: Sequence[str]) -> str:
    return stable_hash(list(units))


# -- one part ----------------------------------------------------------------------------------
def part_done(part: Part, out: str | os.PathLike, tool: str, options_hash: str, units: Sequence[str]) -> dict[str, Any] | None:
    """The part's index.json when it finished with the same tool, options and unit list (a re-run
    does nothing); None when it has not finished. A finished part of other inputs or options: a
    one-line error naming the part."""
    d = part.dir(out)
    rec = _read_json(d / PART_RECORD)
    if rec is None:
        return None
    where = f"--part {part.label}: {display_path(d)}"
    if rec.get("tool") != tool:
        raise SoraError(f"{where} was written by {rec.get('tool')}, not {tool}; use another --out")
    if rec.get("options_hash") != options_hash:
        raise SoraError(f"{where} was written with other options (options hash {rec.get('options_hash')}, now {options_hash}); "
                        "use the same options or another --out")
    u = rec.get("units") or {}
    if u.get("hash") != units_hash(units):
        raise SoraError(f"{where} was made from another input list ({u.get('total')} {u.get('kind')} then, {len(units)} now); "
                        "every part must see the same inputs: use another --out")
    return _read_json(d / INDEX_NAME) or {}


def finish_part(part: Part, out: str | os.PathLike, tool: str, options_hash: str, units: Sequence[str], kind: str,
                index: dict[str, Any]) -> None:
    """Mark the part finished (after its index.json): what the merge checks the parts against."""
    start, end = part.bounds(len(units))
    atomic_write_json(part.dir(out) / PART_RECORD, {
        "part": part.index, "parts": part.count, "tool": tool, "options_hash": options_hash,
        "units": {"kind": kind, "total": len(units), "hash": units_hash(units), "start": start, "end": end},
        "num_samples": index.get("num_samples"), "num_rejects": index.get("num_rejects"),
    })


def part_label(part: Part, out: str | os.PathLike) -> str:
    return f"--out {display_path(out)} part {part.label} ({display_path(part.dir(out))})"


def say_done(part: Part, out: str | os.PathLike, index: dict[str, Any], quiet: bool) -> None:
    if not quiet:
        print(f"part {part.label} of {display_path(out)} is already done ({index.get('num_samples', 0)} samples, "
              f"{index.get('num_rejects', 0)} rejects): nothing to do")


# -- the merge ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SoraError(f"{display_path(path)}: not readable JSON ({e})") from None
    return obj if isinstance(obj, dict) else None


def _ledger_entries(rows: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(shard name, entry) of a ledger: ingest's rows carry the shard per clip, the others per row."""
    for r in rows:
        if "clips" in r:
            for c in r["clips"]:
                yield c["shard"], c
        else:
            for e in r.get("samples") or []:
                yield r["shard"], e


def _renamed(rows: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if "clips" in r:
            out.append({**r, "clips": [{**c, "shard": names[c["shard"]]} for c in r["clips"]]})
        else:
            out.append({**r, "shard": names[r["shard"]]})
    return out


@dataclass
class _Move:
    """A part's shard going to its place in the merged set: renamed, or rewritten without
    ``leave_out`` (keys of another part's duplicates)."""

    src: Path
    dst: Path
    count: int
    leave_out: frozenset[str] = frozenset()


def _copy_without(src: Path, dst: Path, leave_out: frozenset[str]) -> None:
    """``src`` with the samples ``leave_out`` dropped, written atomically as ``dst`` (members
    copied as they are: nothing is decoded or unpickled)."""
    import tarfile

    tmp = dst.with_name(f".{dst.name}.tmp")
    with tarfile.open(src, "r:") as tin, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            dirname, base = os.path.split(member.name)
            stem = base.partition(".")[0]
            if (f"{dirname}/{stem}" if dirname else stem) in leave_out:
                continue
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def _input_position(rows: list[dict[str, Any]], source: str) -> int:
    """Where one ingest run writes the reject of input ``source`` among ``rows``: inputs are
    taken in the order of their relative paths' bytes (probe.find_media)."""
    at = os.fsencode(source)
    return next((i for i, r in enumerate(rows) if os.fsencode(str(r.get("source", ""))) > at), len(rows))


def find_parts(out: Path) -> tuple[int, list[Path]]:
    """(N, [OUT/parts/part-K-of-N for K in 0..N-1]); one-line errors for no parts, parts of
    several splits, a missing part."""
    pdir = out / PARTS_DIR
    found = sorted((int(m.group(2)), int(m.group(1))) for d in (pdir.iterdir() if pdir.is_dir() else ())
                   if (m := _PART_RE.match(d.name)) and d.is_dir())
    if not found:
        raise SoraError(f"{display_path(out)} holds no {PARTS_DIR}/part-K-of-N: nothing to merge "
                        f"(write the parts with --part K/N --out {display_path(out)} first)")
    splits = sorted({n for n, _ in found})
    if len(splits) > 1:
        raise SoraError(f"{display_path(pdir)} holds parts of {len(splits)} different splits ({', '.join(f'of {n}' for n in splits)}); "
                        "remove the folders of the split you do not want")
    n = splits[0]
    dirs = []
    for k in range(n):
        d = pdir / f"part-{k}-of-{n}"
        if not d.is_dir():
            raise SoraError(f"part {k}/{n} is missing (no {display_path(d)}): run it with --part {k}/{n}, then merge again")
        dirs.append(d)
    return n, dirs


def merge(out: str | os.PathLike, quiet: bool = False) -> dict[str, Any]:
    """Join OUT/parts/part-K-of-N (K = 0..N-1) into the shard set OUT; returns its index.json."""
    out = Path(out)
    n, dirs = find_parts(out)
    # Two merge jobs of one OUT (submitted twice): the second waits, then finds it merged.
    with file_lock(out / PARTS_DIR / ".merge.lock", f"another sora-data merge of {display_path(out)}"):
        return _merge(out, n, dirs, quiet)


def _merge(out: Path, n: int, dirs: list[Path], quiet: bool) -> dict[str, Any]:
    plan_path = out / PLAN_NAME
    plan = _read_json(plan_path)
    resuming = plan is not None
    if resuming and plan.get("parts") != n:
        raise SoraError(f"{display_path(plan_path)}: a merge of {plan.get('parts')} parts was cut short, and parts/ now holds {n}; "
                        "restore those parts or start again in a new --out")
    records = []
    for k, d in enumerate(dirs):
        rec = _read_json(d / PART_RECORD)
        if rec is None:
            raise SoraError(f"part {k}/{n} is half-written (no {PART_RECORD} in {display_path(d)}): "
                            f"run it again with --part {k}/{n} (it resumes), then merge again")
        records.append(rec)
    first = records[0]
    for k, rec in enumerate(records[1:], 1):
        for what, a, b in (("tool", first.get("tool"), rec.get("tool")), ("options", first.get("options_hash"), rec.get("options_hash")),
                           ("input list", (first.get("units") or {}).get("hash"), (rec.get("units") or {}).get("hash"))):
            if a != b:
                raise SoraError(f"part {k}/{n} was made with another {what} than part 0/{n} ({b} vs {a}): "
                                f"re-run it into a new --out with the same inputs and options")
    index_path = out / INDEX_NAME
    old = _read_json(index_path) if index_path.is_file() else None
    if not resuming and old is not None and (old.get("merged_from") or {}).get("parts") == n and old.get("options_hash") == first.get("options_hash"):
        if not quiet:
            print(f"{display_path(out)} is already merged from its {n} parts ({old.get('num_samples')} samples): nothing to do")
        return old
    if not resuming and (old is not None or any(out.glob(f"{SHARD_PREFIX}-*.tar")) or (out / LEDGER_NAME).exists()):
        raise SoraError(f"{display_path(out)} already holds a shard set of its own; the parts can only be merged into a folder "
                        f"that holds nothing but {PARTS_DIR}/")

    # Everything is read and checked before the first shard moves.
    ledger: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    moves: list[_Move] = []
    runs: list[dict[str, Any]] = []
    owner: dict[str, int] = {}  # sample key -> its part
    kept: dict[str, tuple[int, dict[str, Any]]] = {}  # ingest: source sha256 -> (part, ledger row) of the copy kept
    duplicates = 0
    indexes = []
    for k, d in enumerate(dirs):
        idx = _read_json(d / INDEX_NAME)
        if idx is None:
            raise SoraError(f"part {k}/{n} has a {PART_RECORD} but no {INDEX_NAME} in {display_path(d)}: run it again into a new --out")
        indexes.append(idx)
        rows = read_jsonl(d / LEDGER_NAME)
        # ingest: the same bytes under a second name, in a later part than the first, are what one
        # run makes of them: a `duplicate` reject, its clips not written (the parts cannot see each other).
        dup = [r for r in rows if r.get("sha256") in kept and kept[r["sha256"]][0] < k]
        rows = [r for r in rows if r.get("sha256") not in kept]
        drop = {(shard, e["key"]) for shard, e in _ledger_entries(dup)}
        for r in rows:
            if "sha256" in r:
                kept.setdefault(r["sha256"], (k, r))
        for _, e in _ledger_entries(rows):
            if e["key"] in owner and owner[e["key"]] != k:
                j = owner[e["key"]]
                raise SoraError(f"sample key {e['key']} is in part {j}/{n} ({display_path(dirs[j])}) and in part {k}/{n} "
                                f"({display_path(d)}): the same input is in two parts; remove one of them and redo the parts "
                                "into a new --out")
            owner[e["key"]] = k
        names = {}
        for s in idx.get("shards") or []:
            leave_out = frozenset(key for shard, key in drop if shard == s["name"])
            if len(leave_out) >= int(s["count"]):
                continue  # nothing but another part's duplicates: not in the merged set
            new = f"{SHARD_PREFIX}-{len(moves):06d}.tar"
            src, dst = d / s["name"], out / new
            if not src.is_file() and not (resuming and dst.is_file()):
                raise SoraError(f"part {k}/{n}: shard {display_path(src)} (listed in its {INDEX_NAME}) is missing: "
                                f"delete {PART_RECORD} there and run the part again (it rewrites what is missing)")
            names[s["name"]] = new
            moves.append(_Move(src, dst, int(s["count"]) - len(leave_out), leave_out))
        ledger += _renamed([r for r in rows if all(sh in names for sh, _ in _ledger_entries([r]))], names)
        part_rejects = read_jsonl(d / REJECTS_NAME)
        firsts: dict[str, dict[str, Any]] = {}
        for r in dup:  # one reject per source, however many shards its clips went to
            firsts.setdefault(r["sha256"], r)
        for r in firsts.values():
            row = {"source": r["source"], "reason": "duplicate", "detail": f"same bytes as {kept[r['sha256']][1]['source']}"}
            row.update({"file": r["file"]} if "file" in r else {}, sha256=r["sha256"])
            part_rejects.insert(_input_position(part_rejects, r["source"]), row)
            duplicates += 1
        rejects += part_rejects
        runs += [{**r, "part": f"{k}/{n}"} for r in idx.get("runs") or []]

    atomic_write_json(plan_path, {"parts": n, "moves": [[str(m.src), str(m.dst)] for m in moves]})
    with progress("merge", len(moves)) as advance:
        for m in moves:
            if m.src.is_file():
                if m.leave_out:
                    _copy_without(m.src, m.dst, m.leave_out)
                    m.src.unlink()
                else:
                    os.replace(m.src, m.dst)  # same filesystem (OUT/parts is inside OUT): a rename, no copy
            advance()
    shards = [{"name": m.dst.name, "count": m.count, "bytes": m.dst.stat().st_size} for m in moves]
    for f in sorted(dirs[0].iterdir()):  # the tool's own records (cache-latents.json), equal in every part
        if f.is_file() and not f.name.startswith(".") and f.suffix == ".json" and f.name not in (INDEX_NAME, PART_RECORD):
            shutil.copyfile(f, out / f.name)

    atomic_write_text(out / LEDGER_NAME, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in ledger))
    atomic_write_text(out / REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    index = _merged_index(indexes, ledger, shards, rejects, runs, n, first, duplicates)
    atomic_write_json(index_path, index)
    plan_path.unlink()
    if not quiet:
        print_summary(out, index, n)
    return index


def _merged_index(indexes: list[dict[str, Any]], ledger: list[dict[str, Any]], shards: list[dict[str, Any]],
                  rejects: list[dict[str, Any]], runs: list[dict[str, Any]], n: int, record: dict[str, Any],
                  duplicates: int) -> dict[str, Any]:
    """index.json over every part: what ShardSetWriter.close computes over one ledger."""
    tally, seen = Tally(), set()
    for _, entry in _ledger_entries(ledger):
        if entry["key"] not in seen:
            seen.add(entry["key"])
            tally.add(entry)
    base = indexes[0]
    extra = {k: v for k, v in base.items() if k not in _RECOMPUTED}
    for key in _SUMMED:
        if key in extra:
            total: Counter[str] = Counter()
            for idx in indexes:
                total.update(idx.get(key) or {})
            extra[key] = dict(total)  # part 0's order first, as one run would list them
    if "num_sources" in extra:  # ingest: distinct source files over the whole set
        extra["num_sources"] = len({r["sha256"] for r in ledger if "sha256" in r})
    return index_record(
        base["tool"], base.get("options") or {}, shards, tally, len(rejects),
        options_hash=base.get("options_hash"),
        rejects_by_reason=dict(Counter(r.get("reason") for r in rejects).most_common()),
        runs=runs,
        merged_from={"parts": n, "units": {k: v for k, v in (record.get("units") or {}).items() if k in ("kind", "total", "hash")},
                     "duplicates_across_parts": duplicates},
        **extra,
    )


def print_summary(out: Path, index: dict[str, Any], n: int) -> None:
    rows = [("parts", n), ("shards", len(index["shards"])), ("samples", index["num_samples"]),
            ("rejects", index["num_rejects"]), ("hours", f"{index['hours']:.4f}")]
    if index["merged_from"]["duplicates_across_parts"]:
        rows.append(("  of which the same bytes as in an earlier part", index["merged_from"]["duplicates_across_parts"]))
    rows += [(f"  rejected: {r}", c) for r, c in index["rejects_by_reason"].items()]
    console().print(table(f"merge -> {display_path(out)} ({index['tool']})", rows, ("", "count")))


# -- CLI: `sora-data merge` --------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="the --out of the parts: OUT/parts/part-K-of-N are joined into the shard set OUT")


def run(args: argparse.Namespace) -> int:
    index = merge(args.out)
    if index["num_samples"] == 0:
        raise MergeFailed(f"nothing usable in {display_path(args.out)}: every part wrote 0 samples (see {REJECTS_NAME})")
    return 0


__all__ = ["MergeFailed", "PARTS_DIR", "PART_RECORD", "Part", "add_part_argument", "finish_part", "merge", "parse_part", "part_done",
           "resolve_part", "units_hash"]
