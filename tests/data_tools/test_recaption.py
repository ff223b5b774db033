"""sora-data recaption for real: a shapes shard set rewritten by the template backend and by an
OpenAI-compatible server on 127.0.0.1 (with frames), resumed, served from the cache, never
leaking the API key; the loader picks the new captions at the configured rates, and a short
training run reads the recaptioned set."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from sora_train.data.shapes import ShapesWorld, generate_shards
from sora_train.data.shards import iter_samples, shard_paths
from sora_train.data_tools.cli import main
from sora_train.data_tools.probe import probe_shard_set
from sora_train.data_tools.recaption import frame_indices
from sora_train.rewrite import TemplateRewriter, normalise_prompt

KEY_ENV = "SORA_TEST_RECAPTION_KEY"
KEY = "sk-test-7f3a9c1e5b2d4068-secret"
DENSE = (
    "The object glides steadily across a plain dark backdrop, its edges crisp and its colour "
    "saturated, while the locked-off camera holds a wide shot at table height under soft even "
    "light, so the motion reads clearly from the first frame to the last in clean minimal style."
)
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def read_set(out: Path) -> dict[str, dict]:
    """key -> {"ext", "media", "meta", "shard"} over every shard of a set, in order."""
    rows = {}
    for path in shard_paths(out):
        for s in iter_samples(path):
            ext = next(e for e in s if e not in ("__key__", "json"))
            rows[s["__key__"]] = {"ext": ext, "media": s[ext], "meta": json.loads(s["json"]), "shard": Path(path).name}
    return rows


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def all_bytes_under(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shards(root, num_train=12, num_val=0, world=ShapesWorld(num_frames=9))
    return root / "train"


@pytest.fixture(scope="module")
def template_set(shapes_train, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recaptioned") / "template"
    assert main(["recaption", str(shapes_train), "--out", str(out), "--rewriter", "template", "--shard-size", "5"]) == 0
    return out


# -- a local OpenAI-compatible server ----------------------------------------------------------
class ChatServer:
    """/v1/chat/completions on 127.0.0.1:<free port>. Records every request; answers HTTP 500
    (echoing the Authorization header, as a careless proxy might) for prompts in ``fail``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail: set[str] = set()
        self.suffix = ""  # appended to every reply
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else content[0]["text"]
                prompt = text.rsplit("Prompt: ", 1)[-1]
                images = [] if isinstance(content, str) else [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
                with outer._lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "prompt": prompt,
                                           "parts": [] if isinstance(content, str) else [p["type"] for p in content],
                                           "images": images})
                    failing = prompt in outer.fail
                if failing:
                    data = json.dumps({"error": f"overloaded; got {self.headers.get('Authorization')}"}).encode()
                    return self._send(500, data)
                reply = f"Sure! Here is the caption:\n\n\"[{prompt}] {DENSE} Seen in {len(images)} frames.{outer.suffix}\""
                self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode())

            def _send(self, code: int, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


# -- (a) template: deterministic, keeps every caption and the media bytes -----------------------
def test_template_recaption_keeps_media_and_every_caption(shapes_train, template_set, tmp_path):
    before, after = read_set(shapes_train), read_set(template_set)
    assert list(after) == list(before)  # every key, in input order
    identity = TemplateRewriter().identity()
    for key, b in before.items():
        a = after[key]
        assert a["ext"] == b["ext"] and sha(a["media"]) == sha(b["media"])
        caps, old = a["meta"]["captions"], b["meta"]["captions"]
        assert {k: caps[k] for k in old} == old  # original and dense untouched
        assert caps["rewritten"] == a["meta"]["caption"] != b["meta"]["caption"]
        assert caps["rewritten"].startswith(normalise_prompt(old["original"]))
        assert 60 <= len(caps["rewritten"].split()) <= 120
        assert a["meta"]["captions_meta"]["rewritten"] == {"identity": identity, "status": "rewritten", "from": "original"}
        assert {k: v for k, v in a["meta"].items() if k not in ("caption", "captions", "captions_meta")} == \
            {k: v for k, v in b["meta"].items() if k not in ("caption", "captions", "captions_meta")}
    index = json.loads((template_set / "index.json").read_text())
    assert index["num_samples"] == 12 and [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert index["rewriter"]["name"] == "template" and index["rewriter"]["identity"] == identity
    assert index["rewrite_status"] == {"rewritten": 12, "cached": 0, "identity": 0, "fallback": 0}
    assert probe_shard_set(template_set)["ok"]

    # Deterministic: the same input and options give the same samples.
    again = tmp_path / "again"
    assert main(["recaption", str(shapes_train), "--out", str(again), "--rewriter", "template", "--batch-size", "3"]) == 0
    assert {k: v["meta"] for k, v in read_set(again).items()} == {k: v["meta"] for k, v in after.items()}


def test_resume_skips_done_samples_and_refuses_other_options(shapes_train, tmp_path, capsys):
    out = tmp_path / "rw"
    assert main(["recaption", str(shapes_train), "--out", str(out), "--rewriter", "template", "--limit", "5", "--shard-size", "4"]) == 0
    assert len(read_set(out)) == 5
    assert main(["recaption", str(shapes_train), "--out", str(out), "--rewriter", "template", "--shard-size", "4"]) == 0
    got = read_set(out)
    assert list(got) == list(read_set(shapes_train))
    index = json.loads((out / "index.json").read_text())
    assert [r["written"] for r in index["runs"]] == [5, 7] and index["runs"][1]["skipped"] == 5
    assert sorted(s["name"] for s in index["shards"]) == [f"shard-00000{i}.tar" for i in range(4)]  # 4+1, then 4+3
    assert probe_shard_set(out)["ok"]
    capsys.readouterr()
    assert main(["recaption", str(shapes_train), "--out", str(out), "--rewriter", "template", "--rewriter-opt", "max_words=90"]) == 2
    assert "rewriter.max_words=120 there, 90 here" in capsys.readouterr().err
    assert main(["recaption", str(shapes_train), "--out", str(shapes_train), "--rewriter", "template"]) == 2


def test_bad_usage_is_one_line(shapes_train, tmp_path, capsys):
    assert main(["recaption", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--rewriter", "template"]) == 2
    assert main(["recaption", str(shapes_train), "--out", str(tmp_path / "o"), "--rewriter", "nope"]) == 2
    assert main(["recaption", str(shapes_train), "--out", str(tmp_path / "o"), "--rewriter", "openai"]) == 2
    # A key typed where it does not belong is not echoed back.
    assert main(["recaption", str(shapes_train), "--out", str(tmp_path / "o"), "--rewriter", "openai",
                 "--rewriter-opt", "model=m", "--rewriter-opt", f"+api_key={KEY}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(e.startswith("error: ") for e in err)
    assert "index.json" in err[0] and "rewriter/nope" in err[1] and "rewriter.model" in err[2]
    assert "api_key" in err[3] and KEY not in err[3]
    assert not (tmp_path / "o").exists()


# -- (b, c) openai with frames: image parts, the key, fallbacks, resume, cache -------------------
def test_openai_visual_recaption_fallbacks_resume_and_cache(shapes_train, server, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    before = read_set(shapes_train)
    keys = list(before)
    originals = {k: v["meta"]["captions"]["original"] for k, v in before.items()}
    server.fail = {originals[keys[1]], originals[keys[8]]}
    failing = {k for k, c in originals.items() if c in server.fail}
    assert len(failing) <= 4
    out, cache = tmp_path / "vlm", tmp_path / "cache"

    def recaption(dest: Path, *extra: str) -> int:
        return main(["recaption", str(shapes_train), "--out", str(dest), "--rewriter", "openai",
                     "--rewriter-opt", "model=tiny-vlm", "--rewriter-opt", f"base_url={server.url}",
                     "--rewriter-opt", f"api_key_env={KEY_ENV}", "--rewriter-opt", "max_retries=1",
                     "--rewriter-opt", "backoff_s=0", "--rewriter-opt", f"cache_dir={cache}",
                     "--visual", "--frames", "2", "--concurrency", "3", "--batch-size", "4", "--shard-size", "5", *extra])

    # Run 1: the first 5 samples only.
    assert recaption(out, "--limit", "5") == 0
    first = list(server.requests)
    done1 = set(read_set(out))
    assert done1 == set(keys[:5])
    assert len(first) == 5 + len(failing & done1)  # one retry per failing sample
    for r in first:
        assert r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {KEY}"
        assert r["parts"] == ["text", "image_url", "image_url"]
        assert all(u.startswith("data:image/jpeg;base64,") for u in r["images"])
    from PIL import Image

    frames = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in first[0]["images"]]
    assert frames[0].shape == (32, 32, 3) and np.abs(frames[0].astype(int) - frames[1]).mean() > 1  # two different frames

    # Run 2: only the 7 samples not yet written are requested.
    assert recaption(out) == 0
    second = server.requests[len(first):]
    assert len(second) == 7 + len(failing - done1)
    assert not {u for r in second for u in r["images"]} & {u for r in first for u in r["images"]}

    # Run 3: nothing left to do, no request at all.
    n = len(server.requests)
    assert recaption(out) == 0
    assert len(server.requests) == n
    index = json.loads((out / "index.json").read_text())
    assert index["runs"][-1]["skipped"] == 12 and index["runs"][-1]["written"] == 0

    after = read_set(out)
    assert list(after) == keys
    for key, a in after.items():
        b = before[key]
        assert sha(a["media"]) == sha(b["media"])
        info, caps = a["meta"]["captions_meta"]["rewritten"], a["meta"]["captions"]
        assert info["identity"]["backend"] == "openai" and info["identity"]["model"] == "tiny-vlm" and info["frames"] == 2
        assert {k: caps[k] for k in b["meta"]["captions"]} == b["meta"]["captions"]
        if key in failing:  # fallback: the original caption is kept, and no "rewritten" is added
            assert info["status"] == "fallback" and "HTTP 500" in info["error"]
            assert a["meta"]["caption"] == b["meta"]["caption"] and "rewritten" not in caps
        else:
            assert info["status"] == "rewritten"
            assert caps["rewritten"] == a["meta"]["caption"] == f"[{originals[key]}] {DENSE} Seen in 2 frames."
    assert index["rewrite_status"] == {"rewritten": 12 - len(failing), "cached": 0, "identity": 0, "fallback": len(failing)}
    reasons = [(r, n) for run in index["runs"] for r, n in run["fallback_reasons"].items()]
    assert sum(n for _, n in reasons) == len(failing) and all(r.startswith("HTTP 500") for r, _ in reasons)
    assert index["rewriter"]["config"]["api_key_env"] == KEY_ENV and index["options"]["frames"] == 2
    assert probe_shard_set(out)["ok"]

    # The same set again into a new --out, the server healthy now: rewrites come from the
    # cache, and only the samples that fell back are requested again.
    server.fail = set()
    n = len(server.requests)
    redo = tmp_path / "redo"
    assert recaption(redo) == 0
    assert sorted(r["prompt"] for r in server.requests[n:]) == sorted(originals[k] for k in failing)
    assert json.loads((redo / "index.json").read_text())["rewrite_status"] == \
        {"rewritten": len(failing), "cached": 12 - len(failing), "identity": 0, "fallback": 0}

    # The key went to the server and nowhere else: not the shards, index.json, ledger, cache, logs.
    printed = capsys.readouterr()
    assert "***" in "".join(json.dumps(a["meta"]) for a in after.values())  # the echoed key, scrubbed
    blob = all_bytes_under(out, redo, cache)
    assert KEY.encode() not in blob and KEY not in caplog.text and KEY not in printed.out + printed.err
    assert "fell back" in caplog.text


def test_dead_backend_stops_the_run(shapes_train, server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.fail = {s["meta"]["captions"]["original"] for s in read_set(shapes_train).values()}
    out = tmp_path / "dead"
    rc = main(["recaption", str(shapes_train), "--out", str(out), "--rewriter", "openai", "--rewriter-opt", "model=m",
               "--rewriter-opt", f"base_url={server.url}", "--rewriter-opt", f"api_key_env={KEY_ENV}",
               "--rewriter-opt", "max_retries=0", "--batch-size", "4"])
    assert rc == 1
    assert len(server.requests) == 4  # stopped after the first chunk, which was not written
    assert json.loads((out / "index.json").read_text())["num_samples"] == 0


def test_visual_images_broken_media_empty_captions_and_bad_json(tmp_path):
    """Images send themselves; a clip that does not decode falls back (written, caption kept);
    an empty caption is still sent with its frames (a VLM can describe them), and the template
    backend, which needs words, falls back; a json that lacks fields is rejected with a reason."""
    import tarfile

    from sora_train.data.shards import ShardWriter
    from sora_train.data.video_io import encode_image, encode_video

    src = tmp_path / "src"
    video = encode_video(np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), 8.0)

    def meta(caption: str, frames: int, **kw) -> dict:
        return {"caption": caption, "captions": {"original": caption}, "fps": 8.0 if frames > 1 else 0.0, "num_frames": frames,
                "width": 32, "height": 32, "duration": frames / 8.0 if frames > 1 else 0.0, "frame_range": [0, frames],
                "source": {"path": "x", "sha256": "0" * 64}, **kw}

    with ShardWriter(src, tool="test") as w:
        w.write("image", {"png": encode_image(np.full((32, 32, 3), 200, np.uint8), "png")}, meta("a grey still", 1))
        w.write("broken", {"mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(200)}, meta("a broken clip", 6))
        w.write("silent", {"mp4": video}, meta("", 6))
        w.write("good", {"mp4": video}, meta("noise moving", 6, license="CC0"))
    with tarfile.open(src / "shard-000001.tar", "w") as tar:  # written by hand: ShardWriter refuses it
        for name, data in (("bad.mp4", video), ("bad.json", b'{"caption": "no other fields"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = json.loads((src / "index.json").read_text())
    index["shards"].append({"name": "shard-000001.tar", "count": 1})
    (src / "index.json").write_text(json.dumps(index))

    out = tmp_path / "out"
    assert main(["recaption", str(src), "--out", str(out), "--rewriter", "template", "--visual", "--frames", "3",
                 "--frame-size", "16", "--max-fallback-rate", "1"]) == 0
    got = read_set(out)
    assert list(got) == ["image", "broken", "silent", "good"]
    status = {k: v["meta"]["captions_meta"]["rewritten"] for k, v in got.items()}
    assert status["image"]["status"] == "rewritten" and status["image"]["frames"] == 1
    assert status["good"]["status"] == "rewritten" and status["good"]["frames"] == 3 and got["good"]["meta"]["license"] == "CC0"
    assert status["broken"]["status"] == "fallback" and status["broken"]["error"].startswith("frames: ")
    assert status["silent"]["status"] == "fallback" and "no words" in status["silent"]["error"]
    assert got["broken"]["meta"]["caption"] == "a broken clip" and "rewritten" not in got["broken"]["meta"]["captions"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejects] == [("bad", "bad_json")]
    index = json.loads((out / "index.json").read_text())
    assert index["num_rejects"] == 1 and index["runs"][0]["fallback_reasons"]


def test_frame_indices_are_evenly_spaced():
    assert frame_indices(9, 2) == [2, 6]
    assert frame_indices(100, 4) == [12, 37, 62, 87]
    assert frame_indices(3, 8) == [0, 1, 2]
    assert frame_indices(1, 1) == [0]


# -- (d) the loader and a training run read the recaptioned set ----------------------------------
def test_loader_chooses_captions_at_the_configured_rates(template_set):
    from sora_train.data.buckets import BucketTable
    from sora_train.data.dataset import ShardVideoDataset

    ds = ShardVideoDataset(str(template_set), BucketTable([{"num_frames": 9, "height": 32, "width": 32, "batch_size": 4}]),
                           caption_probs={"rewritten": 0.8, "original": 0.2})
    meta = next(iter(read_set(template_set).values()))["meta"]
    rng = np.random.default_rng(0)
    draws = [ds._choose_caption(meta, rng) for _ in range(500)]
    rewritten = sum(d == meta["captions"]["rewritten"] for d in draws) / len(draws)
    assert all(d in (meta["captions"]["rewritten"], meta["captions"]["original"]) for d in draws)
    assert 0.74 <= rewritten <= 0.86  # 0.8 +- ~3.4 standard deviations at n=500
    # A sample without a rewrite (a fallback) trains on what it has.
    fallback = {**meta, "captions": {"original": meta["captions"]["original"]}}
    assert {ds._choose_caption(fallback, rng) for _ in range(20)} == {meta["captions"]["original"]}


@pytest.mark.slow
def test_training_reads_the_recaptioned_set(template_set, tmp_path):
    run_dir = tmp_path / "run"
    # data/shapes.yaml's caption_probs is {original, dense}: a dict override would merge into it
    # (and fail in struct mode), so it is deleted and added back.
    cmd = [str(BIN / "sora-train"), "experiment=smoke", f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path}",
           f"data.train_shards={template_set}", "data.val_shards=null", "data.prepare=null",
           "~data.caption_probs", "+data.caption_probs={rewritten: 0.8, original: 0.2}",
           "trainer.max_steps=2", "callbacks.samples=null", "export=false"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert (run_dir / "checkpoints" / "step=00000002.ckpt").is_file()
    assert "rewritten: 0.8" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_rewritten_captions_are_scrubbed_of_personal_data(shapes_train, server, tmp_path, monkeypatch):
    """A re-writer that invents an address or a link: neither reaches the shards."""
    monkeypatch.setenv(KEY_ENV, KEY)
    server.suffix = " Filmed by bot@example.com, more at https://example.org/clips"
    out = tmp_path / "scrubbed"
    assert main(["recaption", str(shapes_train), "--out", str(out), "--rewriter", "openai", "--rewriter-opt", "model=tiny",
                 "--rewriter-opt", f"base_url={server.url}", "--rewriter-opt", f"api_key_env={KEY_ENV}", "--limit", "2"]) == 0
    for sample in read_set(out).values():
        caption = sample["meta"]["captions"]["rewritten"]
        assert caption.endswith("Filmed by [email], more at [url]") and sample["meta"]["caption"] == caption
