"""The shard-set contract on its own: the one tar reader, and the resumable writer that ingest,
recaption and cache-latents share (ledger, adoption after a kill, a shard deleted by hand,
rejects of re-examined inputs, runs, the identity check)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from sora_train.data.shards import REQUIRED_META, UnreadableShard, iter_samples, iter_tar_samples, read_index, shard_paths
from sora_train.data.shardset import LEDGER_NAME, ShardSetSpec, ShardSetWriter, read_jsonl
from sora_train.utils.errors import SoraError


def _meta(i: int) -> dict:
    return {"caption": f"clip {i}", "captions": {"original": f"clip {i}"}, "fps": 8.0, "num_frames": 9, "width": 32,
            "height": 32, "duration": 9 / 8, "frame_range": [0, 9], "source": {"path": f"s{i}", "sha256": "0" * 64}}


def _spec(out: Path, **options) -> ShardSetSpec:
    opts = {"level": 1, **options}
    return ShardSetSpec(tool="test-tool", label=f"--out {out}", verb="tested", options=opts, options_hash=json.dumps(opts, sort_keys=True))


def _run(out: Path, keys: list[int], rejected: tuple[int, ...] = (), fail_at: int | None = None, **options) -> dict:
    """One run of a tool that writes sample i for every key i (rejecting those in ``rejected``)."""
    shard_set = ShardSetWriter(out, _spec(out, **options), max_count=3)
    looked_at = set()
    with shard_set:
        for i in keys:
            key = f"k{i:03d}"
            if key in shard_set.done:
                continue
            looked_at.add(key)
            if i == fail_at:
                raise KeyboardInterrupt
            if i in rejected:
                shard_set.reject(key, "bad", f"sample {i}")
            else:
                shard_set.write(key, {"mp4": b"x" * i}, _meta(i))
    return shard_set.close({"wrote": len(looked_at)}, looked_at)


def _keys(out: Path) -> list[str]:
    return [s["__key__"] for p in shard_paths(out) for s in iter_samples(p)]


def test_resume_after_a_kill_and_a_deleted_shard(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        _run(out, list(range(8)), fail_at=7)
    assert not (out / "index.json").exists() and not list(out.glob(".*.tmp"))  # no index claims the partial run
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]

    # A kill between a shard's rename and its ledger row: the row is lost, the shard is adopted.
    rows = (out / LEDGER_NAME).read_text().splitlines()
    (out / LEDGER_NAME).write_text(rows[0] + "\n" + rows[1][:10])
    index = _run(out, list(range(10)), rejected=(8,))
    assert _keys(out) == [f"k{i:03d}" for i in range(10) if i != 8]
    assert index["num_samples"] == 9 and [s["count"] for s in index["shards"]] == [3, 3, 3]
    assert index["runs"] == [{"wrote": 4}] and index["num_rejects"] == 1 and index["rejects_by_reason"] == {"bad": 1}
    assert index["shape_histogram"] == {"9x32x32": 9} and index["hours"] == pytest.approx(9 * 9 / 8 / 3600, abs=1e-6)

    # A shard deleted by hand is written again; the re-examined reject replaces its old row.
    (out / "shard-000001.tar").unlink()
    index = _run(out, list(range(10)))
    assert sorted(_keys(out)) == [f"k{i:03d}" for i in range(10)]
    assert index["num_samples"] == 10 and [r["wrote"] for r in index["runs"]] == [4, 4]
    assert read_jsonl(out / "rejects.jsonl") == [] and index["num_rejects"] == 0
    assert read_index(out) == index and all(k in json.loads(s["json"]) for p in shard_paths(out) for s in iter_samples(p) for k in REQUIRED_META)


def test_other_options_or_a_foreign_set_are_refused(tmp_path):
    out = tmp_path / "set"
    _run(out, [0, 1])
    with pytest.raises(SoraError, match=r"was tested with a different level \(level=1 there, 2 here\)"):
        _run(out, [0, 1], level=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(SoraError, match="not written by test-tool"):
        _run(foreign, [0])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SoraError, match="is a file"):
        _run(tmp_path / "file", [0])


def test_one_tar_reader_for_paths_and_damage(tmp_path):
    out = tmp_path / "set"
    _run(out, [0, 1, 2])
    (path,) = shard_paths(out)
    assert [s["__key__"] for s in iter_tar_samples(path)] == ["k000", "k001", "k002"]
    assert set(next(iter_samples(path, exts=()))) == {"__key__", "json"}  # media not even read
    cut = tmp_path / "cut.tar"
    data = Path(path).read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(UnreadableShard, match="cut.tar"):
        list(iter_tar_samples(cut))
    with tarfile.open(tmp_path / "upper.tar", "w") as tar:  # extensions compare in lower case
        info = tarfile.TarInfo("a.JSON")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert list(iter_tar_samples(tmp_path / "upper.tar")) == [{"__key__": "a", "json": b"{}"}]
