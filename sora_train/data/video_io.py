"""Encoding and decoding video bytes: PyAV writes, decord reads (PyAV and torchcodec as
alternative readers: ``data.decoder``).

Everything works on in-memory bytes, because that is what a webdataset shard hands us: no
temporary files, one short-lived reader per sample (decord leaks with long-lived readers).
Frames are numpy uint8 arrays (F, H, W, 3) in RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import av  # noqa: F401  before decord: both bundle libvpx, and decord-first breaks VP9 encoding
import numpy as np

from sora_train.utils.errors import SoraError

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS
DECODERS = ("decord", "pyav", "torchcodec")

# container -> (codec, pixel format) used when we write video ourselves.
_CONTAINER_CODECS = {
    "mp4": ("libx264", "yuv420p"),
    "mkv": ("libx264", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
    "avi": ("mpeg4", "yuv420p"),
    "mov": ("libx264", "yuv420p"),
}
_AV_FORMATS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm", "avi": "avi", "mov": "mov"}


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def encode_video(
    frames: np.ndarray,
    fps: float,
    container: str = "mp4",
    codec: str | None = None,
    crf: int = 18,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Encode RGB frames (F, H, W, 3) uint8 into a video file's bytes.

    H.264 and VP9 need even sizes; odd sizes are padded by one pixel of edge replication.
    ``metadata`` goes into the container's tags (title, comment, ...), e.g. the AI-generated
    label that every sampled video carries.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_video: expected uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if container not in _CONTAINER_CODECS:
        raise SoraError(f"unknown video container {container!r}; choose one of {sorted(_CONTAINER_CODECS)}")
    default_codec, pix_fmt = _CONTAINER_CODECS[container]
    codec = codec or default_codec
    if codec == "mjpeg":
        pix_fmt = "yuvj420p"
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:  # (F, H, W, 3) -> (F, H+ph, W+pw, 3)
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=_AV_FORMATS[container]) as out:
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            # mbtree off: with it, libx264 (core 165) encodes some tiny clips (32x32 shapes) to
            # different bytes from identical frames (~1 clip in 12), and same input must mean
            # same shards. Costs 7% more bytes at the same CRF (200 shapes clips).
            stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        elif codec == "libx265":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": str(max(crf, 4)), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec in ("mpeg4", "mjpeg"):
            stream.options = {"qscale": "2"}
            stream.codec_context.qscale = 2
        for key, value in (metadata or {}).items():
            out.metadata[key] = str(value)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def encode_image(frame: np.ndarray, fmt: str = "png") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> (1, H, W, 3) uint8: an image is a 1-frame video."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))[None]


def _decord_reader(data: bytes, width: int = -1, height: int = -1):
    import decord

    return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=width, height=height, num_threads=1)


def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode here (None when it can). Its wheels are built per torch
    variant: PyPI's links the CUDA build of torch (libtorch_cuda.so, libnvrtc), so with the CPU
    build of torch it installs but does not load; the CPU wheel is on PyTorch's own index."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError from loading its FFmpeg/torch libraries
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"torchcodec does not load ({first[:160]}); install the build that matches your torch, e.g. "
            "`pip install torchcodec --index-url https://download.pytorch.org/whl/cpu` for CPU torch, "
            "and FFmpeg 4-8 shared libraries"
        )
    return None


def check_decoder(decoder: str, option: str = "data.decoder") -> None:
    """A one-line error before any sample is read: an unknown decoder, or one that cannot load."""
    if decoder not in DECODERS:
        raise SoraError(f"{option}={decoder!r} is unknown; choose one of {list(DECODERS)}")
    if decoder == "torchcodec":
        problem = torchcodec_problem()
        if problem:
            raise SoraError(f"{option}=torchcodec: {problem}")


def _torchcodec_decoder(data: bytes, width: int = -1, height: int = -1):
    from torchcodec.decoders import VideoDecoder

    transforms = None
    if width > 0 and height > 0:
        from torchcodec.transforms import Resize

        transforms = [Resize((height, width))]  # bilinear with antialias, inside the decoder
    # exact seek mode scans the stream once: frame counts are true, as decord's are.
    return VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=1, device="cpu", seek_mode="exact", transforms=transforms)


def probe_video(data: bytes, backend: str = "decord") -> VideoInfo:
    """Frame count, fps and size from a video's bytes (decord opens the stream for real)."""
    if backend == "torchcodec":
        dec = _torchcodec_decoder(data)
        md = dec.metadata
        return VideoInfo(len(dec), float(md.average_fps or 0.0), int(md.width), int(md.height))
    if backend == "pyav":

        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            n = s.frames or sum(1 for _ in c.decode(s))
            return VideoInfo(int(n), float(s.average_rate or 0), s.codec_context.width, s.codec_context.height)
    vr = _decord_reader(data)
    try:
        h, w = vr[0].shape[:2]
        return VideoInfo(len(vr), float(vr.get_avg_fps()), int(w), int(h))
    finally:
        del vr


def decode_video(
    data: bytes,
    indices: Sequence[int] | None = None,
    backend: str = "decord",
    width: int = -1,
    height: int = -1,
) -> np.ndarray:
    """Decode the frames at ``indices`` (all frames when None) -> (F, H, W, 3) uint8.

    With decord and torchcodec, ``width``/``height`` resize inside the decoder (cheaper than
    after). The reader lives only for this call.
    """
    if backend not in DECODERS:
        raise SoraError(f"unknown decoder {backend!r}; choose one of {list(DECODERS)}")
    if backend == "torchcodec":
        dec = _torchcodec_decoder(data, width, height)
        idx = list(range(len(dec))) if indices is None else [int(i) for i in indices]
        return dec.get_frames_at(idx).data.numpy()
    if backend == "decord":
        vr = _decord_reader(data, width, height)
        try:
            idx = list(range(len(vr))) if indices is None else [int(i) for i in indices]
            return vr.get_batch(idx).asnumpy()
        except Exception as e:
            # decord 0.6 mis-sizes its output buffer for a few small frame widths (16, 24, 48,
            # 72 px: "DECORDArrayCopyFromTo: The size must exactly match"); PyAV reads those.
            if "size must exactly match" in str(e):
                return decode_video(data, indices, "pyav", width, height)
            raise
        finally:
            del vr

    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    out: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        last = None if wanted is None else wanted[-1]
        for i, frame in enumerate(c.decode(stream)):
            if wanted is None or i in wanted:
                if width > 0 and height > 0:
                    frame = frame.reformat(width=width, height=height)
                out[i] = frame.to_ndarray(format="rgb24")
            if last is not None and i >= last:
                break
    if indices is None:
        return np.stack([out[i] for i in sorted(out)])
    missing = [i for i in indices if int(i) not in out]
    if missing:
        raise ValueError(f"frames {missing[:5]} not decodable (stream has {len(out)} decoded frames)")
    return np.stack([out[int(i)] for i in indices])


def read_container_metadata(data: bytes) -> dict[str, str]:

    with av.open(io.BytesIO(data)) as c:
        return dict(c.metadata)
