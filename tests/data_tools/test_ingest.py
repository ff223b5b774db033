"""sora-data ingest and probe on the generated corpus (conftest.py): every good clip lands in
the shards with the right frame ranges and captions, every bad input lands in rejects.jsonl
with its reason, keys are deterministic, re-runs resume, and the CLI's exit codes hold."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sora_train.data.shards import iter_samples, read_index, shard_paths
from sora_train.data_tools.cli import main
from sora_train.data_tools.probe import REASONS, Crashed, IsolatedPool, probe_media
from sora_train.data_tools.scenes import ClipLimits, plan_clips


def ingest(corpus, out: Path, *extra: str, more: tuple[Path, ...] = ()) -> int:
    inputs = [str(corpus.good), str(corpus.bad), *map(str, more)]
    return main(["ingest", *inputs, "--out", str(out), "--manifest", str(corpus.manifest), *corpus.ingest_args, *extra])


def read_set(out: Path) -> list[dict]:
    """Every sample of a shard set in order: {"key", "ext", "media", "meta", "shard"}."""
    rows = []
    for path in shard_paths(out):
        for s in iter_samples(path):
            ext = next(e for e in s if e not in ("__key__", "json"))
            rows.append({"key": s["__key__"], "ext": ext, "media": s[ext], "meta": json.loads(s["json"]), "shard": Path(path).name})
    return rows


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory) -> Path:
    """The corpus ingested with 1 worker into shards of 4 samples (so a source's clips can
    straddle two shards)."""
    out = tmp_path_factory.mktemp("shards") / "a"
    assert ingest(corpus, out, "--shard-size", "4") == 0
    return out


@pytest.fixture(scope="module")
def run_b(corpus, tmp_path_factory) -> Path:
    """The same ingest with 2 workers and the default shard size (one shard)."""
    out = tmp_path_factory.mktemp("shards") / "b"
    assert ingest(corpus, out, "--workers", "2") == 0
    return out


# ----------------------------------------------------------------------------- what lands where
def test_every_good_clip_is_in_the_shards(run_a, corpus):
    samples = read_set(run_a)
    by_sha: dict[str, list[dict]] = {}
    for s in samples:
        by_sha.setdefault(s["meta"]["source"]["sha256"], []).append(s)
    for name, exp in corpus.expected.items():
        got = by_sha.get(exp["sha256"], [])
        assert sorted(tuple(s["meta"]["frame_range"]) for s in got) == exp["ranges"], name
        for s in got:
            m = s["meta"]
            start, end = m["frame_range"]
            assert s["key"] == f"{exp['sha256'][:16]}_{start}_{end}"
            assert m["num_frames"] == end - start
            assert m["captions"] == {"original": m["caption"]} and m["caption"]
            if exp["kind"] == "image":
                assert (m["fps"], m["num_frames"], m["duration"]) == (0.0, 1, 0.0)
                assert s["media"] == exp["bytes"]  # original bytes
            elif len(exp["ranges"]) == 1:  # one clip: the original file, untouched
                assert s["media"] == exp["bytes"] and s["ext"] == Path(name).suffix[1:]
                assert m["fps"] == pytest.approx(10.0) and m["duration"] == pytest.approx(m["num_frames"] / 10)
            else:  # cut: re-encoded as H.264 mp4
                assert s["ext"] == "mp4" and m["source"]["num_frames"] == exp["ranges"][-1][1]
    assert len(samples) == sum(len(e["ranges"]) for e in corpus.expected.values())

    meta = {s["meta"]["source"]["path"]: s["meta"] for s in samples}
    assert meta["vp9.webm"]["caption"] == "a square on blue"
    assert meta["vp9.webm"]["license"] == "CC-BY-4.0" and meta["vp9.webm"]["extra"] == {"camera": "synthetic"}
    assert meta["sub/nested.mp4"]["caption"] == "a nested square"
    assert meta["sub/nested.mp4"]["license"] == "CC0" and meta["sub/nested.mp4"]["extra"] == {"scene": "indoor"}
    cafe = next(m for p, m in meta.items() if p.startswith("cafe") or "caf" in p)
    assert cafe["caption"] == "a café, scène" and "license" not in cafe  # NFD name matched an NFC manifest row
    assert "ünïcödé 🎬 clip.mp4" in meta
    assert "latin1-\\xe9t\\xe9.mp4" in meta  # a non-UTF-8 name is kept, written with escapes
    assert "license" not in meta["h264.mp4"] and "extra" not in meta["h264.mp4"]


def test_every_bad_input_is_rejected_with_its_reason(run_a, corpus):
    rows = rejects(run_a)
    got = {r["source"]: r["reason"] for r in rows}
    assert got == corpus.rejects  # each bad input once, with its reason; no good input here
    assert set(got.values()) <= set(REASONS)
    assert all(r["detail"] for r in rows)
    dup = next(r for r in rows if r["reason"] == "duplicate")
    assert "h264.mp4" in dup["detail"]


def test_index_counts(run_a, corpus):
    index = read_index(run_a)
    samples = read_set(run_a)
    assert index["num_samples"] == len(samples) == sum(s["count"] for s in index["shards"])
    assert index["num_sources"] == len(corpus.expected)
    assert index["num_rejects"] == len(corpus.rejects)
    assert sum(index["rejects_by_reason"].values()) == len(corpus.rejects)
    assert sum(index["shape_histogram"].values()) == len(samples)
    assert index["shape_histogram"]["1x40x56"] == 3  # the three images
    seconds = sum(s["meta"]["duration"] for s in samples)
    assert index["hours"] == pytest.approx(seconds / 3600, abs=1e-6)
    assert index["options"]["max_clip_seconds"] == 2.0 and index["tool"] == "sora-data ingest"
    run = index["runs"][-1]
    assert run["kept_clips"] == len(samples) and run["other_files"] >= 1  # notes.md, captions, manifest


def test_keys_are_deterministic_and_independent_of_workers(run_a, run_b):
    a, b = read_set(run_a), read_set(run_b)
    assert [s["key"] for s in a] == [s["key"] for s in b]
    assert [s["meta"] for s in a] == [s["meta"] for s in b]
    assert [s["media"] for s in a] == [s["media"] for s in b]  # re-encodes are deterministic too
    assert rejects(run_a) == rejects(run_b)


def test_webdataset_and_decord_read_the_shards_back(run_a):
    import av  # noqa: F401  (import order, see probe.py)
    import decord
    import webdataset as wds
    from PIL import Image

    n = 0
    for sample in wds.WebDataset(shard_paths(run_a), shardshuffle=False):
        meta = json.loads(sample["json"])
        (ext,) = [k for k in sample if not k.startswith("__") and k != "json"]
        if ext in ("jpg", "png", "webp"):
            with Image.open(io.BytesIO(sample[ext])) as im:
                assert im.size == (meta["width"], meta["height"])
        else:
            vr = decord.VideoReader(io.BytesIO(sample[ext]), num_threads=1)
            assert len(vr) == meta["num_frames"], sample["__key__"]
            assert vr.get_avg_fps() == pytest.approx(meta["fps"], rel=1e-3)
            del vr
        n += 1
    assert n == read_index(run_a)["num_samples"]


# ----------------------------------------------------------------------------- re-runs
def test_rerun_skips_done_work_and_adds_only_new_shards(run_a, corpus, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(run_a, out)
    before = read_index(out)
    assert ingest(corpus, out, "--shard-size", "4") == 0  # nothing new
    after = read_index(out)
    assert after["shards"] == before["shards"] and after["num_samples"] == before["num_samples"]
    # skipped: every kept source, and the byte-identical duplicate of one
    assert after["runs"][-1]["skipped"] == len(corpus.expected) + 1 and after["runs"][-1]["kept_clips"] == 0
    assert sorted(map(json.dumps, rejects(out))) == sorted(map(json.dumps, rejects(run_a)))  # retried, not duplicated

    assert ingest(corpus, out, "--shard-size", "4", more=(corpus.extra_video.parent,)) == 0  # one new file
    final = read_index(out)
    new_shards = [s for s in final["shards"] if s not in before["shards"]]
    assert len(new_shards) == 1 and new_shards[0]["count"] == 1
    assert int(new_shards[0]["name"][6:12]) > max(int(s["name"][6:12]) for s in before["shards"])
    keys = [s["key"] for s in read_set(out)]
    assert len(keys) == len(set(keys)) == before["num_samples"] + 1
    assert final["num_samples"] == before["num_samples"] + 1 and len(final["runs"]) == 3


def test_rerun_with_other_options_is_refused(run_a, corpus, tmp_path, capsys):
    out = tmp_path / "d"
    shutil.copytree(run_a, out)
    assert ingest(corpus, out, "--max-clip-seconds", "3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_clip_seconds=2.0 there, 3.0 here" in err and err.count("\n") == 1


def test_killed_run_is_resumed_without_duplicates(run_a, corpus, tmp_path):
    """A run killed after a shard was renamed into place but before (all of) its done.jsonl
    rows were appended: the newest shard's unknown samples are recorded from the shard itself,
    their sources are redone, and no key is written twice. A half-written shard is deleted."""
    out = tmp_path / "e"
    shutil.copytree(run_a, out)
    ledger = (out / "done.jsonl").read_text().splitlines()
    last = json.loads(ledger[-1])
    (out / "done.jsonl").write_text("\n".join(ledger[:-1]) + "\n" + ledger[-1][:20])  # killed mid-append
    (out / ".shard-000099.tar.tmp").write_bytes(b"partial")
    assert ingest(corpus, out) == 0
    assert not (out / ".shard-000099.tar.tmp").exists()
    keys = [s["key"] for s in read_set(out)]
    assert len(keys) == len(set(keys)) == read_index(run_a)["num_samples"] == read_index(out)["num_samples"]
    rows = [json.loads(x) for x in (out / "done.jsonl").read_text().splitlines()[len(ledger) - 1 :] if x.startswith("{")]
    assert any(r["sha256"] == last["sha256"] and r["complete"] for r in rows)
    assert ingest(corpus, out) == 0 and read_index(out)["runs"][-1]["skipped"] == len(corpus.expected) + 1


# ----------------------------------------------------------------------------- options
def test_missing_caption_policy_empty_keeps_the_file(corpus, tmp_path):
    out = tmp_path / "f"
    assert main(["ingest", str(corpus.bad / "nocaption.mp4"), "--out", str(out), "--missing-caption", "empty", *corpus.ingest_args]) == 0
    (s,) = read_set(out)
    assert s["meta"]["caption"] == "" and s["meta"]["captions"] == {}


def test_manifest_alone_names_the_inputs(corpus, tmp_path):
    out = tmp_path / "g"
    assert main(["ingest", "--manifest", str(corpus.manifest), "--out", str(out), *corpus.ingest_args]) == 0
    assert sorted(s["meta"]["caption"] for s in read_set(out)) == ["a café, scène", "a nested square"]


def test_scene_split_cuts_at_the_hard_cut(corpus, tmp_path):
    for flag, ranges in (("--scene-split", [[0, 12], [12, 20]]), (None, [[0, 20]])):
        out = tmp_path / f"scenes{bool(flag)}"
        args = ["ingest", str(corpus.scene_video), "--out", str(out), "--max-clip-seconds", "10", "--min-clip-seconds", "0.5", "--workers", "0"]
        assert main(args + ([flag] if flag else [])) == 0
        assert [s["meta"]["frame_range"] for s in read_set(out)] == ranges


def test_plan_clips():
    lim = ClipLimits(max_clip_seconds=2, min_clip_seconds=0.5, min_frames=4)
    assert plan_clips(50, 10, lim) == ([(0, 17), (17, 33), (33, 50)], [])
    assert plan_clips(20, 10, lim) == ([(0, 20)], [])
    assert plan_clips(3, 10, lim) == ([], [(0, 3)])
    assert plan_clips(30, 10, lim, cuts=[2, 12]) == ([(2, 12), (12, 30)], [(0, 2)])
    assert plan_clips(50, 10, lim, cuts=[5]) == ([(0, 5), (5, 20), (20, 35), (35, 50)], [])
    assert plan_clips(299, 29.97, ClipLimits()) == ([(0, 299)], [])  # 9.98 s: one clip


# ----------------------------------------------------------------------------- CLI
def test_cli_exit_codes(corpus, tmp_path, capsys):
    bad_only = ["ingest", str(corpus.bad / "empty.mp4"), str(corpus.bad / "random.mp4"), "--out", str(tmp_path / "h"), "--workers", "0"]
    assert main(bad_only) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nothing usable was written") and "empty_file 1" in err[0]
    assert len(rejects(tmp_path / "h")) == 2

    assert main(["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "i")]) == 2
    assert capsys.readouterr().err.strip() == f"error: input path {tmp_path / 'nope'} does not exist"

    (tmp_path / "file").write_text("x")
    assert main(["ingest", str(corpus.good / "h264.mp4"), "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        main(["ingest", "--out", str(tmp_path / "j"), "--missing-caption", "maybe"])
    assert e.value.code == 2


def test_console_script_runs(corpus, tmp_path):
    exe = Path(sys.executable).with_name("sora-data")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sora_train.data_tools.cli"]
    out = tmp_path / "k"
    p = subprocess.run(cmd + ["ingest", str(corpus.good / "h264.mp4"), "--out", str(out), "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "clips kept" in p.stdout and read_index(out)["num_samples"] == 1


# ----------------------------------------------------------------------------- probe
def test_probe_footage_folder(corpus, capsys):
    assert main(["probe", str(corpus.bad), "--json", "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    failing = {f["path"]: f["reason"] for f in report["failures"]}
    assert failing["truncated.avi"] == "truncated" and failing["audio_only.mp4"] == "no_video_stream"
    assert failing["random.mp4"] == "not_media" and failing["fifo.mp4"] == "unreadable"
    assert "nocaption.mp4" not in failing  # probe judges media, not captions
    assert main(["probe", str(corpus.good), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "by codec" in text and "h264" in text and "vp9" in text


def test_probe_shard_set(run_a, tmp_path, capsys):
    assert main(["probe", str(run_a), "--json", "--decode"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["num_samples"] == read_index(run_a)["num_samples"]
    assert report["captions"]["min_words"] >= 1 and report["shape_histogram"]["1x40x56"] == 3
    broken = tmp_path / "broken"
    shutil.copytree(run_a, broken)
    shard = sorted(broken.glob("shard-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:2048])
    assert main(["probe", str(broken)]) == 1
    assert "problem" in capsys.readouterr().out


def test_probe_media_stride_still_counts_every_frame(corpus):
    data = corpus.expected["long.mp4"]["bytes"]
    assert {probe_media(data, "mp4", stride=k).num_frames for k in (1, 3, 7, 100)} == {50}


# ----------------------------------------------------------------------------- isolation
def _crashy(task, context):
    if task == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if task == "raise":
        raise ValueError("boom")
    if task == "hang":
        time.sleep(60)
    return task * context


def test_isolated_pool_survives_crashes_and_hangs():
    pool = IsolatedPool(_crashy, 2, workers=2, timeout=1.5)
    out = list(pool.imap(["a", "segfault", "b", "raise", "hang", "c"]))
    assert out[0] == "aa" and out[2] == "bb" and out[5] == "cc"
    assert out[1] == Crashed("decode_error", "the decoder crashed (SIGSEGV)")
    assert out[3].reason == "internal_error" and "ValueError: boom" in out[3].detail
    assert out[4].reason == "timeout"


# ----------------------------------------------------------------------------- privacy
def moving_frames(*args, **kwargs):
    """conftest.moving_frames of this folder, by path: in a whole-suite run ``conftest`` names
    whichever folder's conftest was imported first."""
    import importlib.util

    mod = sys.modules.get("data_tools_conftest")
    if mod is None:
        spec = importlib.util.spec_from_file_location("data_tools_conftest", Path(__file__).with_name("conftest.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["data_tools_conftest"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return mod.moving_frames(*args, **kwargs)


def _captioned(folder: Path, name: str, frames, caption: str, extra: dict | None = None) -> Path:
    from sora_train.data.video_io import encode_video

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.mp4").write_bytes(encode_video(frames, 10))
    (folder / f"{name}.json").write_text(json.dumps({"caption": caption, **(extra or {})}))
    return folder


def test_personal_data_is_scrubbed_from_captions_unless_kept(corpus, tmp_path):

    src = _captioned(tmp_path / "src", "call", moving_frames(12), "a square, call +1 415 555 0132 or jane@example.com",
                     {"author": "jane@example.com", "takes": 3})
    out = tmp_path / "scrubbed"
    assert main(["ingest", str(src), "--out", str(out), *corpus.ingest_args]) == 0
    (s,) = read_set(out)
    assert s["meta"]["caption"] == "a square, call [phone] or [email]" and s["meta"]["captions"]["original"] == s["meta"]["caption"]
    assert s["meta"]["extra"] == {"author": "[email]", "takes": 3}
    index = read_index(out)
    assert index["options"]["keep_pii"] is False and index["runs"][-1]["pii_scrubbed"] == {"phone": 1, "email": 2}  # caption + author field
    assert "jane@" not in "".join(p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".json", ".jsonl"))
    kept = tmp_path / "kept"
    assert main(["ingest", str(src), "--out", str(kept), "--keep-pii", *corpus.ingest_args]) == 0
    (s,) = read_set(kept)
    assert "jane@example.com" in s["meta"]["caption"] and read_index(kept)["options"]["keep_pii"] is True


def test_blur_faces_blurs_and_counts(corpus, tmp_path):
    pytest.importorskip("skimage")
    import numpy as np
    from skimage import data

    from sora_train.data.video_io import decode_video

    face = np.ascontiguousarray(data.astronaut()[::2, ::2])  # a real photo with one frontal face
    src = _captioned(tmp_path / "src", "face", np.repeat(face[None], 10, axis=0), "an astronaut")
    _captioned(src, "square", moving_frames(10), "a square")
    out = tmp_path / "blurred"
    assert main(["ingest", str(src), "--out", str(out), "--blur-faces", *corpus.ingest_args]) == 0
    by_caption = {s["meta"]["caption"]: s for s in read_set(out)}
    astronaut, square = by_caption["an astronaut"], by_caption["a square"]
    assert astronaut["meta"]["faces"]["faces"] >= 1 and astronaut["meta"]["faces"]["frames_blurred"] == 10
    assert square["meta"]["faces"] == {"faces": 0, "detections": 0, "frames_blurred": 0}
    assert square["media"] == (src / "square.mp4").read_bytes()  # no face: the original bytes
    got = decode_video(astronaut["media"])[0, 30:82, 85:135].astype(float)
    assert np.abs(np.diff(got, axis=1)).mean() < 0.35 * np.abs(np.diff(face[30:82, 85:135].astype(float), axis=1)).mean()
    index = read_index(out)
    assert index["options"]["blur_faces"] is True and index["runs"][-1]["clips_with_faces"] == 1
