"""Face blurring for ingest: the bundled detector finds a real face, the blur removes it, a
clip without faces is left byte-for-byte alone."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

from sora_train.data.faces import FaceBlur, blur_media  # noqa: E402
from sora_train.data.video_io import decode_video, encode_video  # noqa: E402


@pytest.fixture(scope="module")
def blur() -> FaceBlur:
    return FaceBlur(detect_size=320, scale_factor=1.2)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::2, ::2])  # (256, 256, 3): Eileen Collins, face at about x 85-135, y 32-80


def _overlaps(box, ref) -> bool:
    return min(box[2], ref[2]) > max(box[0], ref[0]) and min(box[3], ref[3]) > max(box[1], ref[1])


def test_finds_and_blurs_a_real_face(blur, astronaut):
    face = (85, 30, 135, 82)
    boxes = blur.detect(astronaut)
    assert any(_overlaps(b, face) for b in boxes)
    clip = np.repeat(astronaut[None], 5, axis=0)
    out, stats = blur(clip)
    assert stats.faces >= 1 and stats.frames_blurred == 5
    x0, y0, x1, y1 = face
    before, after = clip[0, y0:y1, x0:x1].astype(float), out[0, y0:y1, x0:x1].astype(float)
    detail = lambda a: np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()  # noqa: E731
    assert detail(after) < 0.35 * detail(before)  # the face's edges are gone
    assert np.array_equal(out[0, 110:200, :100], clip[0, 110:200, :100])  # away from any box: untouched


def test_clip_without_faces_is_unchanged(blur):
    frames = np.zeros((9, 64, 96, 3), np.uint8)
    frames[:, 20:40, 30:50] = (200, 50, 50)
    data = encode_video(frames, 8.0)
    out, ext, w, h, stats = blur_media(data, "mp4", 8.0, blur)
    assert out is data and ext == "mp4" and (w, h) == (96, 64) and stats.detections == 0


def test_clip_with_a_face_is_reencoded_with_every_frame(blur, astronaut):
    data = encode_video(np.repeat(astronaut[None], 6, axis=0), 8.0)
    out, ext, w, h, stats = blur_media(data, "mp4", 8.0, blur)
    assert out != data and ext == "mp4" and stats.faces >= 1 and decode_video(out).shape == (6, 256, 256, 3)
