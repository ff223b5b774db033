"""A generated footage corpus for the sora-data tests: tiny real videos in several codecs and
containers, images, sidecar captions, a manifest — and a corpus of bad inputs, each with the
reject reason it must get.

Everything is tiny (<= 64x48, <= 5 s at 10 fps) so the whole corpus is written in about a
second and ingested in a few.
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import av  # noqa: F401  (before decord, which video_io imports lazily: see data_tools/probe.py)
import numpy as np
import pytest

from sora_train.data.video_io import encode_image, encode_video
from sora_train.utils import sha256_bytes

FPS = 10
# What the tests ingest with: 2 s clips at most, so the 5 s video is cut into 3.
INGEST_ARGS = ["--max-clip-seconds", "2", "--min-clip-seconds", "0.5", "--min-frames", "4", "--workers", "1"]


def moving_frames(n: int, h: int = 48, w: int = 64, seed: int = 0, colour=(40, 80, 160)) -> np.ndarray:
    """(n, h, w, 3) uint8: a bright square moving right over a flat background plus a little
    noise (so codecs have something to code)."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[:] = colour
    frames += rng.integers(0, 12, frames.shape, dtype=np.uint8)
    side = max(4, min(h, w) // 4)
    for i in range(n):
        x = (i * 3) % max(1, w - side)
        frames[i, h // 3 : h // 3 + side, x : x + side] = (250, 240, 40)
    return frames


def audio_only_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(20):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@dataclass
class Corpus:
    root: Path
    good: Path
    bad: Path
    manifest: Path
    # good media: rel path (under good/) -> {"sha256", "ranges": [(start, end)], "kind", "bytes"}
    expected: dict[str, dict] = field(default_factory=dict)
    # bad inputs: rel path (under bad/) -> reason
    rejects: dict[str, str] = field(default_factory=dict)
    scene_video: Path | None = None
    extra_video: Path | None = None  # not under good/ or bad/: "new footage" for the resume test
    ingest_args: list[str] = field(default_factory=lambda: list(INGEST_ARGS))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("footage")
    good, bad = root / "good", root / "bad"
    (good / "sub").mkdir(parents=True)
    bad.mkdir()
    c = Corpus(root, good, bad, good / "manifest.csv")

    def put(folder: Path, name: str, data: bytes, caption: str | None = "a yellow square moves right") -> Path:
        path = folder / name
        path.write_bytes(data)
        if caption is not None:
            path.with_name(Path(name).stem + ".txt").write_text(caption, encoding="utf-8")
        return path

    def good_video(name: str, data: bytes, frames: int, ranges=None, caption="a yellow square moves right") -> None:
        put(good, name, data, caption)
        c.expected[name] = {"sha256": sha256_bytes(data), "ranges": ranges or [(0, frames)], "kind": "video", "bytes": data}

    # -- good videos: every codec/container the loader is expected to meet -----------------
    f15 = moving_frames(15)
    good_video("h264.mp4", encode_video(f15, FPS, "mp4"), 15)
    good_video("mpeg4.avi", encode_video(moving_frames(15, seed=1), FPS, "avi"), 15)
    good_video("mjpeg.avi", encode_video(moving_frames(12, seed=2), FPS, "avi", codec="mjpeg"), 12)
    good_video("mjpeg.mkv", encode_video(moving_frames(12, seed=3), FPS, "mkv", codec="mjpeg"), 12)
    good_video("h264.mkv", encode_video(moving_frames(15, seed=4), FPS, "mkv"), 15)
    good_video("clip.mov", encode_video(moving_frames(15, 32, 48, seed=5), FPS, "mov"), 15)
    # VP9 in webm, captioned by a JSON sidecar that also carries a license and an extra field
    vp9 = encode_video(moving_frames(15, seed=6), FPS, "webm")
    good_video("vp9.webm", vp9, 15, caption=None)
    (good / "vp9.json").write_text(json.dumps({"caption": "a square on blue", "license": "CC-BY-4.0", "camera": "synthetic"}))
    # 5 s: cut into 3 equal clips of <= 2 s
    good_video("long.mp4", encode_video(moving_frames(50, seed=7), FPS, "mp4"), 50, ranges=[(0, 17), (17, 33), (33, 50)])
    # odd names must work: emoji + spaces (NFC), a decomposed (NFD) name captioned by an NFC
    # manifest row, and a name that is not UTF-8 at all
    good_video("ünïcödé 🎬 clip.mp4", encode_video(moving_frames(12, seed=8), FPS, "mp4"), 12)
    nfd = unicodedata.normalize("NFD", "café scène.mp4")
    good_video(nfd, encode_video(moving_frames(12, seed=9), FPS, "mp4"), 12, caption=None)
    latin = os.fsdecode(b"latin1-\xe9t\xe9.mp4")
    good_video(latin, encode_video(moving_frames(12, seed=10), FPS, "mp4"), 12, caption="a square, latin-1 name")
    # a subfolder, captioned by the manifest
    nested = encode_video(moving_frames(12, seed=11), FPS, "mp4")
    (good / "sub" / "nested.mp4").write_bytes(nested)
    c.expected["sub/nested.mp4"] = {"sha256": sha256_bytes(nested), "ranges": [(0, 12)], "kind": "video", "bytes": nested}
    c.manifest.write_text(
        "path,caption,license,scene\n"
        "sub/nested.mp4,a nested square,CC0,indoor\n"
        f"{unicodedata.normalize('NFC', 'café scène.mp4')},\"a café, scène\",,outdoor\n",
        encoding="utf-8",
    )
    # -- images: 1-frame samples with their original bytes ---------------------------------
    img = moving_frames(1, 40, 56, seed=12)[0]
    for name, fmt in (("photo.jpg", "jpg"), ("diagram.png", "png"), ("still.webp", "webp")):
        data = encode_image(img, fmt)
        put(good, name, data, caption=f"a {fmt} still of a square")
        c.expected[name] = {"sha256": sha256_bytes(data), "ranges": [(0, 1)], "kind": "image", "bytes": data}
    (good / "notes.md").write_text("not footage: ignored, counted as other files\n")

    # -- bad inputs -------------------------------------------------------------------------
    def bad_file(name: str, data: bytes, reason: str, caption: str | None = "bad") -> Path:
        c.rejects[name] = reason
        return put(bad, name, data, caption)

    bad_file("empty.mp4", b"", "empty_file")
    whole = encode_video(moving_frames(30, seed=20), FPS, "mp4")
    bad_file("truncated.mp4", whole[: int(len(whole) * 0.4)], "truncated")
    avi = encode_video(moving_frames(30, seed=21), FPS, "avi")
    bad_file("truncated.avi", avi[: int(len(avi) * 0.6)], "truncated")  # decord segfaults on this one
    mkv = encode_video(moving_frames(30, seed=22), FPS, "mkv", codec="mjpeg")
    bad_file("truncated.mkv", mkv[: int(len(mkv) * 0.9)], "truncated")
    bad_file("random.mp4", np.random.default_rng(0).bytes(4096), "not_media")
    bad_file("html.webm", b"<html><body>404 Not Found</body></html>\n", "not_media")
    bad_file("png_named.mp4", encode_image(img[::-1], "png"), "not_media")
    bad_file("audio_only.mp4", audio_only_mp4(), "no_video_stream")
    bad_file("one_frame.mp4", encode_video(moving_frames(1, seed=23), FPS, "mp4"), "too_short")
    bad_file("wide.mp4", encode_video(moving_frames(4, 8, 4000, seed=24), FPS, "mp4"), "bad_dimensions")
    bad_file("tiny.png", encode_image(np.zeros((8, 8, 3), np.uint8), "png"), "bad_dimensions")
    gif = io.BytesIO()
    from PIL import Image

    Image.fromarray(img).save(gif, format="GIF")
    bad_file("animation.jpg", gif.getvalue(), "unsupported_format")
    jpg = encode_image(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8), "jpg")
    bad_file("cut.jpg", jpg[: len(jpg) // 2], "truncated")
    bad_file("nocaption.mp4", encode_video(moving_frames(12, seed=25), FPS, "mp4"), "missing_caption", caption=None)
    bad_file("badsidecar.mp4", encode_video(moving_frames(12, seed=26), FPS, "mp4"), "bad_sidecar", caption=None)
    (bad / "badsidecar.json").write_text("{not json")
    bad_file("zz_duplicate.mp4", c.expected["h264.mp4"]["bytes"], "duplicate")  # sorts after good/h264.mp4
    os.symlink(bad / "does-not-exist.mp4", bad / "dangling.mp4")
    (bad / "dangling.txt").write_text("a caption for a file that is not there")
    c.rejects["dangling.mp4"] = "unreadable"
    os.mkfifo(bad / "fifo.mp4")
    (bad / "fifo.txt").write_text("a caption for a pipe")
    c.rejects["fifo.mp4"] = "unreadable"

    # -- extras for single tests -------------------------------------------------------------
    scenes = root / "scenes"
    scenes.mkdir()
    cut = np.concatenate([moving_frames(12, 32, 48, seed=30, colour=(10, 20, 120)), moving_frames(8, 32, 48, seed=31, colour=(230, 200, 20))])
    c.scene_video = put(scenes, "hardcut.mp4", encode_video(cut, FPS, "mp4"), caption="blue then yellow")
    new = root / "new"
    new.mkdir()
    c.extra_video = put(new, "fresh.mp4", encode_video(moving_frames(12, seed=40), FPS, "mp4"), caption="new footage")
    return c
