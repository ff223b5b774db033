"""Data preparation as a Slurm array job, on the local two-node cluster (conftest.py):
launch/sbatch/data_array.sbatch runs `sora-data ingest` as an array of 3 tasks (each task's
part from SLURM_ARRAY_TASK_ID / _COUNT), a job submitted with --dependency=afterok on the
array merges the parts, then `sora-data recaption` runs as an array of 3 over the merged set and
is merged the same way (the four jobs submitted at once, chained by afterok). Each merged shard
set is the one a single process writes: same samples in the same order, same bytes and json,
same index counts, same rejects.

The --part mechanics for recaption and cache-latents, and the one-line errors, are tested
without Slurm in tests/data_tools/test_parts.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from slurm_cluster import REPO

TEMPLATE = REPO / "launch" / "sbatch" / "data_array.sbatch"
INGEST = ["--max-clip-seconds", "2", "--min-clip-seconds", "0.5", "--min-frames", "4", "--shard-size", "2"]
NOT_COMPARED = {"created", "shards", "runs", "merged_from"}  # shard boundaries, one run per part, the merge record


def frames(n: int, seed: int, h: int = 32, w: int = 48) -> np.ndarray:
    """(n, h, w, 3) uint8: a bright square moving right over noise."""
    rng = np.random.default_rng(seed)
    f = rng.integers(0, 60, (n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        f[i, 8:16, (2 * i) % (w - 8) : (2 * i) % (w - 8) + 8] = (250, 240, 40)
    return f


def make_footage(root: Path) -> Path:
    """Seven tiny inputs: five videos (one of 4.5 s, cut into 3 clips and re-encoded), an image,
    and one empty file that is rejected."""
    from sora_train.data.video_io import encode_image, encode_video

    root.mkdir()
    for i, n in enumerate((12, 45, 15, 10, 12)):
        (root / f"v{i}.mp4").write_bytes(encode_video(frames(n, seed=i), 10, "mp4"))
        (root / f"v{i}.txt").write_text(f"a yellow square, clip {i}")
    (root / "still.png").write_bytes(encode_image(frames(1, seed=9)[0], "png"))
    (root / "still.txt").write_text("a still")
    (root / "zero.mp4").write_bytes(b"")
    (root / "zero.txt").write_text("nothing")
    return root


def read_set(out: Path) -> list[tuple[str, dict[str, bytes], dict]]:
    from sora_train.data.shards import iter_samples, shard_paths

    return [(s["__key__"], {k: v for k, v in s.items() if k not in ("__key__", "json")}, json.loads(s["json"]))
            for p in shard_paths(out) for s in iter_samples(p)]


def assert_same_set(merged: Path, whole: Path) -> None:
    from sora_train.data.shards import read_index

    a, b = read_set(merged), read_set(whole)
    assert [s[0] for s in a] == [s[0] for s in b]  # same samples, same order
    assert a == b
    ia, ib = read_index(merged), read_index(whole)
    assert {k: v for k, v in ia.items() if k not in NOT_COMPARED} == {k: v for k, v in ib.items() if k not in NOT_COMPARED}
    assert [r["part"] for r in ia["runs"]] == ["0/3", "1/3", "2/3"] and ia["merged_from"]["parts"] == 3
    assert (merged / "rejects.jsonl").read_text() == (whole / "rejects.jsonl").read_text()


def test_template_refuses_a_tool_outside_an_array_and_unknown_commands():
    """Before anything runs: the part would be the whole work, or the command is not sora-data's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for args, says in ((["ingest", "footage/", "--out", "x"], "runs as an array job"), (["probe", "x"], "not 'probe'"), ([], "usage:")):
        r = subprocess.run(["bash", str(TEMPLATE), *args], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # one part as a plain job (--part given) passes the check and reaches srun
    r = subprocess.run([shutil.which("bash"), str(TEMPLATE), "ingest", "footage/", "--out", "x", "--part", "3/32"],
                       env={**env, "PATH": "/nonexistent"}, capture_output=True, text=True, timeout=30)
    assert "runs as an array job" not in r.stderr and "srun" in r.stderr, r.stderr


@pytest.mark.slurm
def test_ingest_then_recaption_as_arrays_of_3_tasks_each_merged_by_a_dependent_job(slurm_cluster, tmp_path):
    from sora_train.data.shards import read_index
    from sora_train.data_tools.cli import main

    footage = make_footage(tmp_path / "footage")
    whole, out, rc = tmp_path / "whole", tmp_path / "out", tmp_path / "recaptioned"
    recaption = ["recaption", str(out), "--out", str(rc), "--rewriter", "template", "--shard-size", "3"]
    common = ("--cpus-per-task=1", "--time=5", f"--chdir={tmp_path}")

    array = slurm_cluster.sbatch("--array=0-2", *common, str(TEMPLATE), "ingest", str(footage), "--out", str(out), *INGEST)
    merge = slurm_cluster.sbatch(f"--dependency=afterok:{array}", *common, "--output=sora-data-merge-%j.out",
                                 str(TEMPLATE), "merge", str(out))
    array_rc = slurm_cluster.sbatch(f"--dependency=afterok:{merge}", "--array=0-2", *common, str(TEMPLATE), *recaption)
    merge_rc = slurm_cluster.sbatch(f"--dependency=afterok:{array_rc}", *common, "--output=sora-data-merge-%j.out",
                                    str(TEMPLATE), "merge", str(rc))
    assert main(["ingest", str(footage), "--out", str(whole), *INGEST, "--workers", "0"]) == 0  # the one-machine run, meanwhile
    info = slurm_cluster.wait(merge_rc, timeout=300)
    logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("sora-data-*.out"))}
    shown = "\n".join(f"----- {k}\n{v[-3000:]}" for k, v in logs.items())
    assert info["JobState"] == "COMPLETED", f"{info}\n{shown}\n{slurm_cluster.logs()}"
    for job, units in ((array, 7), (array_rc, 4)):  # 7 input files; 4 input shards
        for k in range(3):  # each task found its part in the Slurm environment
            log = logs[f"sora-data-{job}_{k}.out"]
            assert f"array {job} task {k} of 3" in log and f"part {k}/3 of the work, from the Slurm array" in log, shown
        done = out if job == array else rc
        assert [json.loads((done / "parts" / f"part-{k}-of-3" / "part.json").read_text())["units"]["total"] for k in range(3)] == [units] * 3
    assert "merge ->" in logs[f"sora-data-merge-{merge}.out"] and "merge ->" in logs[f"sora-data-merge-{merge_rc}.out"], shown

    assert_same_set(out, whole)
    assert len(read_set(out)) == 8  # 4 one-clip videos + 3 clips of the long one + 1 image
    assert read_index(out)["rejects_by_reason"] == {"empty_file": 1}
    assert main([*recaption[:3], str(tmp_path / "rc_whole"), *recaption[4:]]) == 0  # one recaption of the merged set
    assert_same_set(rc, tmp_path / "rc_whole")
    assert all(meta["captions"]["rewritten"] == meta["caption"] != meta["captions"]["original"] for _, _, meta in read_set(rc))
