"""Array jobs without Slurm: ingest, recaption and cache-latents in 3 parts (`--part K/N`) then
`sora-data merge` give the shard set one process gives (same samples in the same order, same
bytes, same index counts, same rejects); bad parts and bad `--part` values are one-line errors.
The same ingest as a real Slurm array: tests/launch/test_slurm_array.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sora_train.data.shards import iter_samples, read_index, shard_paths
from sora_train.data_tools.cli import main
from sora_train.data_tools.parts import Part, parse_part, resolve_part
from sora_train.utils.errors import SoraError

# index.json fields that differ by construction between a merged set and one run: when it was
# written, where the shard boundaries fall, one run summary per part, and the merge record.
NOT_COMPARED = {"created", "shards", "runs", "merged_from"}


def read_set(out: Path) -> list[tuple[str, dict[str, bytes], dict]]:
    """(key, media members, json) of every sample, in shard order."""
    rows = []
    for path in shard_paths(out):
        for s in iter_samples(path):
            rows.append((s["__key__"], {k: v for k, v in s.items() if k not in ("__key__", "json")}, json.loads(s["json"])))
    return rows


def assert_same_set(merged: Path, whole: Path, moved: bool = True) -> None:
    a, b = read_set(merged), read_set(whole)
    assert [r[0] for r in a] == [r[0] for r in b]  # same samples, same order
    assert a == b  # same bytes and json
    ia, ib = read_index(merged), read_index(whole)
    assert {k: v for k, v in ia.items() if k not in NOT_COMPARED} == {k: v for k, v in ib.items() if k not in NOT_COMPARED}
    assert sum(s["count"] for s in ia["shards"]) == ia["num_samples"] == len(a)
    assert [r for r in ia["runs"] if "part" in r] == ia["runs"] and len(ia["runs"]) >= ia["merged_from"]["parts"]
    assert (merged / "rejects.jsonl").read_text() == (whole / "rejects.jsonl").read_text()
    if moved:
        assert not list((merged / "parts").glob("*/shard-*.tar"))  # moved, not copied


def run_parts(cmd: list[str], out: Path, n: int = 3, merge: bool = True) -> None:
    for k in range(n):
        assert main([*cmd, "--out", str(out), "--part", f"{k}/{n}"]) == 0
        assert (out / "parts" / f"part-{k}-of-{n}" / "part.json").is_file()
    if merge:
        assert main(["merge", str(out)]) == 0


def test_part_parsing_and_the_split():
    assert parse_part("2/3") == Part(2, 3) and parse_part(" 0 / 1 ") == Part(0, 1)
    for bad, says in (("3/3", "K must be in 0..2"), ("x", "expected K/N"), ("1/0", "N must be >= 1"), ("-1/2", "expected K/N")):
        with pytest.raises(SoraError, match=says):
            parse_part(bad)
    # contiguous ranges that tile the units, sizes differing by at most one
    units = list(range(10))
    assert [Part(k, 3).select(units) for k in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [Part(k, 4).select([0, 1]) for k in range(4)] == [[], [0], [], [1]]
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "6", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_part(None, env) == Part(1, 3, origin="SLURM_ARRAY_TASK_ID=5")
    assert resolve_part("0/2", env) == Part(0, 2)  # --part wins
    assert resolve_part("all", env) is None  # the whole job, in an array whose tasks do different things
    assert resolve_part(None, {}) is None
    with pytest.raises(SoraError, match="not one range"):  # --array=4,8 or a step
        resolve_part(None, {**env, "SLURM_ARRAY_TASK_MAX": "8"})
    # redoing parts 5 and 17 of 32: --array=5,17 with SORA_DATA_PARTS=32
    assert resolve_part(None, {**env, "SLURM_ARRAY_TASK_MAX": "17", "SORA_DATA_PARTS": "32"}).label == "5/32"
    with pytest.raises(SoraError, match="must be in 0..3 with SORA_DATA_PARTS=4"):
        resolve_part(None, {**env, "SORA_DATA_PARTS": "4"})


@pytest.fixture(scope="module")
def footage(corpus, tmp_path_factory) -> Path:
    """Eight inputs of the corpus: videos (one cut into 3 clips), an image, a JSON sidecar, and
    three rejects; split 2/3/3 by the parts."""
    root = tmp_path_factory.mktemp("array_footage")
    picks = [("good", "h264.mp4"), ("good", "long.mp4"), ("good", "photo.jpg"), ("good", "vp9.webm"), ("good", "mjpeg.avi"),
             ("bad", "empty.mp4"), ("bad", "random.mp4"), ("bad", "nocaption.mp4")]
    for folder, name in picks:
        for f in (corpus.root / folder / name, *(corpus.root / folder / (Path(name).stem + side) for side in (".txt", ".json"))):
            if f.is_file():
                shutil.copy(f, root / f.name)
    return root


INGEST = ["--max-clip-seconds", "2", "--min-clip-seconds", "0.5", "--min-frames", "4", "--workers", "0", "--shard-size", "2"]


def test_ingest_in_parts_equals_one_run_and_bad_parts_are_one_line(footage, tmp_path, capsys):
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(["ingest", str(footage), "--out", str(whole), *INGEST]) == 0
    run_parts(["ingest", str(footage), *INGEST], out)
    assert_same_set(out, whole)
    assert read_index(out)["num_sources"] == read_index(whole)["num_sources"] == 5
    assert read_index(out)["rejects_by_reason"] == {"empty_file": 1, "not_media": 1, "missing_caption": 1}
    assert main(["probe", str(out), "--decode"]) == 0  # the merged set verifies like any other
    capsys.readouterr()

    # a finished part and a finished merge are no-ops (a requeued array task, a second merge job)
    before = (out / "index.json").read_bytes()
    assert main(["ingest", str(footage), "--out", str(out), *INGEST, "--part", "1/3"]) == 0
    assert main(["merge", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already done" in printed and "already merged" in printed and (out / "index.json").read_bytes() == before
    # the merged set is an ordinary resumable set: one run into it finds everything done
    assert main(["ingest", str(footage), "--out", str(out), *INGEST]) == 0
    assert read_index(out)["runs"][-1]["skipped"] == 5 and read_index(out)["num_samples"] == read_index(whole)["num_samples"]

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    fresh = tmp_path / "fresh"
    assert "--part 3/3: K must be in 0..2" in error(["ingest", str(footage), "--out", str(fresh), *INGEST, "--part", "3/3"])
    assert "--part 'x': expected K/N" in error(["ingest", str(footage), "--out", str(fresh), *INGEST, "--part", "x"])
    assert "holds no parts/part-K-of-N" in error(["merge", str(fresh)])
    assert main(["ingest", str(footage), "--out", str(fresh), *INGEST, "--part", "0/3"]) == 0
    assert "part 1/3 is missing" in error(["merge", str(fresh)])
    for k in (1, 2):
        assert main(["ingest", str(footage), "--out", str(fresh), *INGEST, "--part", f"{k}/3"]) == 0
    (fresh / "parts" / "part-2-of-3" / "part.json").unlink()  # as if killed before it finished
    assert "part 2/3 is half-written" in error(["merge", str(fresh)])
    assert not (fresh / "index.json").exists() and not list(fresh.glob("shard-*.tar"))  # nothing moved
    assert main(["ingest", str(footage), "--out", str(fresh), *INGEST, "--part", "2/3"]) == 0  # resumes: writes nothing new
    assert main(["recaption", str(whole), "--out", str(fresh / "parts" / "part-0-of-2"), "--rewriter", "identity"]) == 0
    assert "2 different splits (of 2, of 3)" in error(["merge", str(fresh)])
    shutil.rmtree(fresh / "parts" / "part-0-of-2")
    (footage / "new.txt").write_text("a caption")
    shutil.copy(footage / "h264.mp4", footage / "new.mp4")  # the input list changed after part 0 ran
    try:
        assert "made from another input list" in error(["ingest", str(footage), "--out", str(fresh), *INGEST, "--part", "0/3"])
    finally:
        (footage / "new.mp4").unlink()
        (footage / "new.txt").unlink()
    assert main(["merge", str(fresh)]) == 0
    assert_same_set(fresh, whole)


def test_same_bytes_in_two_parts_merge_as_one_run_rejects_them(corpus, tmp_path, capsys):
    """One run keeps the first of two byte-identical files and rejects the second as a
    duplicate; parts cannot see each other, so the merge does it: the later part's clips are
    left out (its shard that holds nothing else is dropped, the one shared with other samples
    is rewritten) and the reject row goes where one run writes it."""
    src = tmp_path / "dup"
    src.mkdir()
    files = {"a.mp4": "long.mp4", "m.mp4": "h264.mp4", "x.mp4": "long.mp4", "y.mp4": "mpeg4.avi", "zz.mp4": None}
    for name, original in files.items():  # parts: [a, m] | [x (= a), y, zz (empty)]
        (src / name).write_bytes((corpus.good / original).read_bytes() if original else b"")
        (src / name).with_suffix(".txt").write_text(f"caption of {name}")
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(["ingest", str(src), "--out", str(whole), *INGEST]) == 0
    assert [r["reason"] for r in map(json.loads, (whole / "rejects.jsonl").read_text().splitlines())] == ["duplicate", "empty_file"]
    run_parts(["ingest", str(src), *INGEST], out, n=2)
    assert read_index(out / "parts" / "part-1-of-2")["num_samples"] == 4  # x's 3 clips and y: shards [x x] [x y]
    assert_same_set(out, whole, moved=False)
    assert read_index(out)["merged_from"]["duplicates_across_parts"] == 1 and len(read_index(out)["shards"]) == 3

    # other tools: a key in two parts is an input given twice; one line naming both parts
    shapes = tmp_path / "shapes"
    from sora_train.data.shapes import ShapesWorld, generate_shards

    generate_shards(shapes, num_train=2, num_val=0, world=ShapesWorld(num_frames=9), heldout=[], clips_per_shard=2)
    twice = ["recaption", str(shapes / "train"), str(shapes / "train"), "--rewriter", "identity"]
    run_parts(twice, tmp_path / "rc", n=2, merge=False)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "rc")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is in part 0/2" in err and "and in part 1/2" in err and "\n" not in err


def test_recaption_in_parts_equals_one_run_and_a_killed_merge_finishes(tmp_path, monkeypatch):
    from sora_train.data.shapes import ShapesWorld, generate_shards
    from sora_train.data_tools import parts

    generate_shards(tmp_path / "shapes", num_train=12, num_val=0, world=ShapesWorld(num_frames=9), heldout=[], clips_per_shard=2)
    src = tmp_path / "shapes" / "train"
    cmd = ["recaption", str(src), "--rewriter", "template", "--shard-size", "5"]
    assert main([*cmd, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    for k in range(3):
        assert main([*cmd, "--out", str(out), "--part", f"{k}/3"]) == 0
    inodes = sorted(p.stat().st_ino for p in out.glob("parts/*/shard-*.tar"))
    moved, replace = [], os.replace

    def killed_at_the_second_shard(a, b):  # the merge is killed while it moves the shards
        if str(b).endswith(".tar"):
            if moved:
                raise KeyboardInterrupt
            moved.append(b)
        return replace(a, b)

    monkeypatch.setattr(parts.os, "replace", killed_at_the_second_shard)
    assert main(["merge", str(out)]) == 130
    monkeypatch.undo()
    assert len(list(out.glob("shard-*.tar"))) == 1 and not (out / "index.json").exists()
    assert main(["merge", str(out)]) == 0
    assert_same_set(out, tmp_path / "whole")
    assert sorted(p.stat().st_ino for p in out.glob("shard-*.tar")) == inodes  # renamed, not copied
    assert read_index(tmp_path / "out")["rewrite_status"]["rewritten"] == 12


def test_cache_latents_in_parts_equals_one_run(tmp_path):
    import torch

    from sora_train.data.shapes import ShapesWorld, generate_shards
    from sora_train.models.export import export_parts
    from sora_train.models.vae import build_vae

    generate_shards(tmp_path / "shapes", num_train=6, num_val=0, world=ShapesWorld(num_frames=9), heldout=[], clips_per_shard=2)
    torch.manual_seed(0)
    export_parts(tmp_path / "vae", {"vae": build_vae("debug").eval()})
    # batches of 2 = the input shards' size, so each part encodes the batches one run does
    cmd = ["cache-latents", str(tmp_path / "shapes" / "train"), "--vae", str(tmp_path / "vae"),
           "--num-frames", "9", "--height", "32", "--width", "32", "--dtype", "float32", "--batch-size", "2", "--shard-size", "4"]
    assert main([*cmd, "--out", str(tmp_path / "whole")]) == 0
    run_parts(cmd, tmp_path / "out")
    assert_same_set(tmp_path / "out", tmp_path / "whole")
    assert (tmp_path / "out" / "cache-latents.json").read_text() == (tmp_path / "whole" / "cache-latents.json").read_text()
