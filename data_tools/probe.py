"""Probing footage by decoding it, and `sora-data probe` (a footage folder or a shard set).

A file's header says what it *claims* (frame count, size); only decoding says what a loader
will get. :func:`probe_media` therefore decodes every video frame with decord — the loader's
decoder — in order, and counts the frames that decode. ``stride=k`` decodes every k-th frame
to pixels and skips the frames between without converting them (decord still decodes them,
since each frame depends on the previous ones, so the count stays exact; only the colour
conversion is saved). Anything that makes a file unusable raises :class:`Rejected` with a
reason code from :data:`REASONS`.

Decoders crash on some broken files (decord 0.6 segfaults on a truncated AVI), so callers run
probes in :class:`IsolatedPool` worker processes: a worker that dies takes one file with it,
not the run. Cheap structural checks run first and keep most broken files away from decord:
the container's own size fields (MP4/MOV boxes, RIFF chunks, Matroska elements) must fit in
the file, else it is ``truncated``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import signal
import statistics
import stat
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from sora_train.data.video_io import IMAGE_EXTS, VIDEO_EXTS
from sora_train.utils.errors import SoraError

# Every reason a file (or a piece of one) is not written, with what it means. Codes are stable:
# scripts filter rejects.jsonl on them.
REASONS: dict[str, str] = {
    "unreadable": "the file cannot be read (permission denied, broken symlink, not a regular file)",
    "empty_file": "zero bytes",
    "not_media": "the bytes are not a video/image of the kind its extension says (text, random, an image named .mp4)",
    "unsupported_format": "a real image, but not jpg/png/webp (the loader reads only those)",
    "no_video_stream": "a media container with no video stream (audio only)",
    "truncated": "the file ends early: size fields point past the end, or frames stop before the claimed count",
    "decode_error": "the container or first frame does not decode, or the decoder crashed",
    "timeout": "probing took longer than --timeout",
    "bad_fps": "frame rate missing or absurd (<= 0 or > 1000)",
    "bad_dimensions": "a side under --min-side or over --max-side, or aspect ratio over --max-aspect",
    "too_short": "the whole video is shorter than --min-clip-seconds / --min-frames",
    "clip_too_short": "one scene of a kept video is shorter than the minimum (the rest was kept)",
    "missing_caption": "no caption from the manifest, NAME.json or NAME.txt (with --missing-caption reject)",
    "bad_sidecar": "NAME.json/NAME.txt exists but is not valid (bad JSON, no string caption, not UTF-8)",
    "duplicate": "byte-identical to another input of this run (same sha256)",
    "encode_error": "re-encoding a clip failed or the result did not decode to the expected frames",
    "internal_error": "a bug in sora-data (the detail has the exception); the run went on",
}


class Rejected(Exception):
    """A file that cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Limits:
    """What counts as an absurd frame size."""

    min_side: int = 16
    max_side: int = 8192
    max_aspect: float = 8.0

    def check(self, width: int, height: int) -> None:
        if min(width, height) < self.min_side:
            raise Rejected("bad_dimensions", f"{width}x{height}: a side is under {self.min_side} px")
        if max(width, height) > self.max_side:
            raise Rejected("bad_dimensions", f"{width}x{height}: a side is over {self.max_side} px")
        if max(width, height) / min(width, height) > self.max_aspect:
            raise Rejected("bad_dimensions", f"{width}x{height}: aspect ratio over {self.max_aspect:g}:1")


@dataclass
class MediaInfo:
    kind: str  # "video" | "image"
    ext: str  # the extension the bytes are stored under: mp4, mkv, ..., jpg, png, webp
    container: str  # PyAV's format name (mov,mp4,m4a,3gp,3g2,mj2 / matroska,webm / avi) or PIL's
    codec: str
    width: int
    height: int
    fps: float  # 0.0 for images
    num_frames: int  # frames that decode (1 for images)
    claimed_frames: int  # what the container says
    size_bytes: int
    pixels: str = "decord"  # which decoder gives correct pixels (decord 0.6 mis-shapes some widths)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def media_kind(ext: str) -> str | None:
    ext = ext.lower().lstrip(".")
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def norm_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def short(msg: object, limit: int = 200) -> str:
    """First line of an error message, capped: decoder messages can embed whole buffers."""
    text = str(msg).strip().splitlines()[0] if str(msg).strip() else type(msg).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- reading -------------------------------------------------------------------------------
def read_source(path: str) -> bytes:
    """The file's bytes, or Rejected(unreadable | empty_file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Rejected("unreadable", "broken symlink" if os.path.islink(path) else "no such file") from None
    except OSError as e:
        raise Rejected("unreadable", short(e.strerror or e)) from None
    if not stat.S_ISREG(st.st_mode):  # a fifo would block forever; a device is not footage
        raise Rejected("unreadable", "not a regular file")
    if st.st_size == 0:
        raise Rejected("empty_file", "0 bytes")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Rejected("unreadable", short(e.strerror or e)) from None
    if not data:
        raise Rejected("empty_file", "0 bytes")
    return data


# -- structure -----------------------------------------------------------------------------
_BMFF_TOP = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"uuid", b"styp", b"moof"}


def sniff(data: bytes) -> str | None:
    """The family of a file from its first bytes: isobmff, matroska, avi, ogg, flv, mpegts,
    png, jpeg, webp, gif, bmp, tiff, wave — or None."""
    head = data[:16]
    if len(head) >= 8 and head[4:8] in _BMFF_TOP:
        return "isobmff"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and len(head) >= 12:
        return {b"AVI ": "avi", b"WEBP": "webp", b"WAVE": "wave"}.get(head[8:12], "riff")
    for magic, name in (
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff", "jpeg"),
        (b"GIF8", "gif"),
        (b"BM", "bmp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"OggS", "ogg"),
        (b"FLV", "flv"),
    ):
        if head.startswith(magic):
            return name
    if len(data) > 376 and data[0] == data[188] == data[376] == 0x47:
        return "mpegts"
    return None


IMAGE_FAMILIES = {"png", "jpeg", "webp", "gif", "bmp", "tiff"}


def container_truncated(data: bytes, family: str | None) -> str | None:
    """Why the container's own size fields say the file is cut short, or None.

    Files truncated at an exact element boundary, and streams written with unknown sizes
    (live Matroska), pass; decoding catches what this misses.
    """
    n = len(data)
    if family == "isobmff":
        off = 0
        while off < n:
            if n - off < 8:
                return f"partial box header at byte {off} of {n}"
            size, kind = int.from_bytes(data[off : off + 4], "big"), data[off + 4 : off + 8]
            header = 8
            if size == 1:
                if n - off < 16:
                    return f"partial box header at byte {off} of {n}"
                size, header = int.from_bytes(data[off + 8 : off + 16], "big"), 16
            elif size == 0:  # "extends to the end of the file"
                return None
            if size < header:
                return None  # nonsense size: let the decoder judge
            if off + size > n:
                return f"'{kind.decode('latin-1')}' box ends at byte {off + size} but the file has {n}"
            off += size
        return None
    if family in ("avi", "riff", "webp", "wave"):
        off = 0
        while off + 8 <= n:
            if data[off : off + 4] not in (b"RIFF", b"LIST", b"JUNK"):
                return None
            size = int.from_bytes(data[off + 4 : off + 8], "little")
            end = off + 8 + size + (size & 1)
            if off + 8 + size > n:
                return f"RIFF chunk ends at byte {off + 8 + size} but the file has {n}"
            off = end
        return None
    if family == "matroska":
        off = 0
        while off < n:
            try:
                off_id, _ = _ebml_vint(data, off, keep_marker=True)
                off_data, size = _ebml_vint(data, off_id, keep_marker=False)
            except IndexError:
                return f"partial element header at byte {off} of {n}"
            except ValueError:
                return None
            if size is None:  # unknown size (live stream): cannot tell
                return None
            if off_data + size > n:
                return f"Matroska element ends at byte {off_data + size} but the file has {n}"
            off = off_data + size
        return None
    return None


def _ebml_vint(data: bytes, off: int, keep_marker: bool) -> tuple[int, int | None]:
    """Read an EBML variable-length integer at ``off`` -> (next offset, value or None if unknown)."""
    first = data[off]
    if first == 0:
        raise ValueError("invalid EBML vint")
    length = 9 - first.bit_length()
    if off + length > len(data):
        raise IndexError(off)
    value = first if keep_marker else first & ((1 << (8 - length)) - 1)
    all_ones = value == (1 << (8 - length)) - 1
    for b in data[off + 1 : off + length]:
        value = (value << 8) | b
        all_ones = all_ones and b == 0xFF
    return off + length, (None if all_ones and not keep_marker else value)


# -- probing -------------------------------------------------------------------------------
def probe_media(
    data: bytes,
    ext: str,
    limits: Limits = Limits(),
    stride: int = 1,
    on_frame: Callable[[int, np.ndarray, float], None] | None = None,
) -> MediaInfo:
    """What ``data`` (stored under extension ``ext``) really is, by decoding it.

    Args:
        data: the file's bytes.
        ext: its extension (decides video vs image).
        limits: frame-size limits (Rejected(bad_dimensions) outside them).
        stride: convert every ``stride``-th frame to pixels (1 = all; see the module doc).
        on_frame: called with (index, RGB frame, fps) for every frame, in order (forces stride 1).

    Returns:
        MediaInfo. Raises Rejected with the reason the file cannot be used.
    """
    kind = media_kind(ext)
    if kind == "image":
        return _probe_image(data, ext, limits)
    if kind is None:
        raise Rejected("not_media", f"extension .{ext} is not a video or image extension")
    return _probe_video(data, ext, limits, 1 if on_frame else max(1, int(stride)), on_frame)


def _probe_image(data: bytes, ext: str, limits: Limits) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    family = sniff(data)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("bad_dimensions", short(e)) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        what = f"{family} data" if family else "not an image"
        raise Rejected("not_media", f"{what} with a .{ext} name ({short(e, 80)})") from None
    with im:
        fmt = (im.format or "").upper()
        stored = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt)
        if stored is None:
            raise Rejected("unsupported_format", f"{fmt or 'unknown'} image; convert to jpg, png or webp")
        width, height = im.size
        limits.check(width, height)
        try:
            im.load()  # decode every pixel: a truncated file fails here, not in the loader
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            raise Rejected("truncated" if "truncat" in str(e).lower() else "decode_error", short(e)) from None
    return MediaInfo("image", stored, fmt.lower(), fmt.lower(), width, height, 0.0, 1, 1, len(data), "pil")


def _probe_video(
    data: bytes, ext: str, limits: Limits, stride: int, on_frame: Callable[[int, np.ndarray, float], None] | None
) -> MediaInfo:
    import av  # before decord: importing decord first breaks PyAV's VP9 encoder (clashing libvpx)

    family = sniff(data)
    if family in IMAGE_FAMILIES:
        raise Rejected("not_media", f"{family} image data with a .{ext} name")
    truncated = container_truncated(data, family)
    if truncated:
        raise Rejected("truncated", truncated)
    # Header (PyAV: sturdier than decord on garbage, and it can say "audio only").
    try:
        with av.open(io.BytesIO(data)) as c:
            container = c.format.name
            if container.endswith("_pipe") or container in ("image2", "tty", "txt"):
                raise Rejected("not_media", f"{container} data with a .{ext} name")
            if not c.streams.video:
                kinds = sorted({s.type for s in c.streams})
                raise Rejected("no_video_stream", f"streams: {', '.join(kinds) or 'none'}")
            vs = c.streams.video[0]
            codec = vs.codec_context.name
            width, height = int(vs.codec_context.width or 0), int(vs.codec_context.height or 0)
    except Rejected:
        raise
    except Exception as e:  # av.FFmpegError and friends
        if family is None:
            raise Rejected("not_media", f"not a recognised video container ({short(e, 80)})") from None
        raise Rejected("decode_error", f"{family} container does not open: {short(e, 120)}") from None
    if width and height:
        limits.check(width, height)

    import decord

    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:
        raise Rejected("decode_error", f"decord cannot open the {codec} stream: {short(e, 120)}") from None
    try:
        claimed = len(vr)
        fps = float(vr.get_avg_fps())
        if not (0 < fps <= 1000) or math.isnan(fps):
            raise Rejected("bad_fps", f"frame rate {fps:g}")
        if claimed <= 0:
            raise Rejected("decode_error", "the stream claims no frames")
        pixels = "decord"
        decoded, error = 0, None
        while decoded < claimed:
            step = min(stride, claimed - decoded)
            try:
                if step > 1:
                    vr.skip_frames(step - 1)  # decoded, not converted to RGB
                frame = vr.next()  # (H, W, 3) RGB, still in decord's memory
            except StopIteration:
                break
            except Exception as e:  # decord raises DECORDError / RuntimeError mid-stream
                error = e
                break
            if decoded == 0:
                shape = frame.shape
                height, width = (height, width) if (height and width) else shape[:2]
                if tuple(shape) != (height, width, 3):
                    pixels = "pyav"  # decord 0.6 mis-sizes a few widths (16, 24, 48, 72 px)
            if on_frame is not None and pixels == "decord":
                on_frame(decoded, frame.asnumpy(), fps)
            decoded += step
    finally:
        del vr
    if decoded == 0:
        raise Rejected("decode_error", f"no frame decodes ({codec}): {short(error, 120) if error else 'empty stream'}")
    if decoded < claimed:
        why = f"; then: {short(error, 100)}" if error else ""
        raise Rejected("truncated", f"{decoded} of the {claimed} claimed frames decode{why}")
    limits.check(width, height)
    if on_frame is not None and pixels == "pyav":
        for i, frame in enumerate(iter_frames(data, "pyav")):
            on_frame(i, frame, fps)
    return MediaInfo("video", norm_ext(ext), container, codec, int(width), int(height), fps, decoded, claimed, len(data), pixels)


def iter_frames(data: bytes, pixels: str = "decord") -> Iterator[np.ndarray]:
    """Every frame of a video in order, RGB (H, W, 3) uint8, decoded sequentially (no seeks:
    seeking is where decoders disagree about which frame is which)."""
    if pixels == "decord":
        import av  # noqa: F401  (import order: see _probe_video)
        import decord

        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        try:
            for _ in range(len(vr)):
                yield vr.next().asnumpy()
        finally:
            del vr
        return
    import av

    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        for frame in c.decode(stream):
            yield frame.to_ndarray(format="rgb24")


# -- crash-isolated workers ----------------------------------------------------------------
@dataclass
class Crashed:
    """What a task yields when its worker died, overran the timeout, or raised."""

    reason: str  # decode_error (died), timeout, internal_error (raised)
    detail: str


def _worker_main(conn, fn, context, quiet: bool) -> None:  # runs in the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if quiet:  # decoders print to fds 1/2 directly, sometimes whole buffers
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(_call(fn, task, context))


def _call(fn, task, context):
    try:
        return fn(task, context)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        return Crashed("internal_error", f"{type(e).__name__}: {short(e, 160)}{where}")


def _log():
    from sora_train.utils import get_logger

    return get_logger(__name__)


def _mp_context():
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


class IsolatedPool:
    """Run ``fn(task, context)`` for each task in worker processes; results come back in task
    order. A worker that dies (a decoder segfault) or overruns ``timeout`` seconds yields
    :class:`Crashed` for its task and is replaced; the run goes on.

    ``workers=0`` runs in this process (no isolation: for debugging and profiling). At most
    ``window`` tasks past the oldest unfinished one are in flight, which bounds the memory
    held by finished-but-not-yet-consumed results.
    """

    def __init__(
        self,
        fn: Callable[[Any, Any], Any],
        context: Any = None,
        workers: int = 1,
        timeout: float | None = None,
        quiet: bool = True,
    ) -> None:
        self.fn, self.context, self.workers = fn, context, max(0, int(workers))
        self.timeout = timeout if timeout and timeout > 0 else None
        self.quiet = quiet
        self.window = max(4, 4 * self.workers)

    def imap(self, tasks: Iterable[Any]) -> Iterator[Any]:
        tasks = list(tasks)
        if self.workers == 0:
            for task in tasks:
                yield _call(self.fn, task, self.context)
            return
        ctx = _mp_context()
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload([self.fn.__module__])
        slots: list[dict[str, Any]] = []

        def spawn() -> dict[str, Any]:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, self.fn, self.context, self.quiet), daemon=True)
            proc.start()
            child.close()
            return {"proc": proc, "conn": parent, "task": None, "since": 0.0}

        results: dict[int, Any] = {}
        next_task, next_out = 0, 0
        try:
            slots = [spawn() for _ in range(min(self.workers, len(tasks)))]
            while next_out < len(tasks):
                for i, slot in enumerate(slots):  # hand out work
                    if slot["task"] is None and next_task < len(tasks) and next_task < next_out + self.window:
                        try:
                            slot["conn"].send(tasks[next_task])
                        except (BrokenPipeError, OSError):  # it died idle (OOM killer?): replace it, not blame the task
                            _stop(slot)
                            slot = slots[i] = spawn()
                            slot["conn"].send(tasks[next_task])
                        slot["task"], slot["since"] = next_task, time.monotonic()
                        next_task += 1
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1
                if next_out >= len(tasks):
                    break
                busy = [s for s in slots if s["task"] is not None]
                if not busy:
                    continue
                wait_s = None
                if self.timeout:
                    wait_s = max(0.0, min(s["since"] + self.timeout for s in busy) - time.monotonic())
                ready = wait([s["conn"] for s in busy] + [s["proc"].sentinel for s in busy], timeout=wait_s)
                now = time.monotonic()
                for i, slot in enumerate(slots):
                    if slot["task"] is None:
                        continue
                    out: Any = None
                    if slot["conn"] in ready or slot["proc"].sentinel in ready:
                        try:
                            if slot["conn"].poll():
                                out = slot["conn"].recv()
                        except (EOFError, OSError):  # it died mid-send or just after: let it finish dying
                            slot["proc"].join(timeout=5)
                            out = None
                        if out is None and not slot["proc"].is_alive():
                            code = slot["proc"].exitcode
                            name = signal.Signals(-code).name if code and code < 0 else f"exit {code}"
                            out = Crashed("decode_error", f"the decoder crashed ({name})")
                    elif self.timeout and now - slot["since"] > self.timeout:
                        out = Crashed("timeout", f"no result after {self.timeout:g} s")
                    if out is None:
                        continue
                    results[slot["task"]] = out
                    slot["task"] = None
                    if isinstance(out, Crashed) and out.reason != "internal_error":
                        _stop(slot)
                        slots[i] = spawn()
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1
        finally:
            for slot in slots:
                try:
                    slot["conn"].send(None)
                except (BrokenPipeError, OSError):
                    pass
            for slot in slots:
                slot["proc"].join(timeout=2)
                _stop(slot)


def _stop(slot: dict[str, Any]) -> None:
    proc = slot["proc"]
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)
    slot["conn"].close()


# -- `sora-data probe` ---------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a footage folder/file, or a shard set directory (one with index.json)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode in N processes (0: in-process)")
    p.add_argument("--stride", type=int, default=1, help="footage: convert every k-th frame to pixels (count stays exact)")
    p.add_argument("--timeout", type=float, default=0, help="footage: seconds per file before giving up (0: none)")
    p.add_argument("--decode", action="store_true", help="shard set: also decode every sample and check num_frames")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not os.path.lexists(path):
        raise SoraError(f"probe: {path} does not exist")
    if (path / "index.json").is_file():
        report = probe_shard_set(path, decode=args.decode)
        _emit(report, args.json, _render_shards)
        return 0 if report["ok"] else 1
    report = probe_footage([path], workers=args.workers, stride=args.stride, timeout=args.timeout)
    _emit(report, args.json, _render_footage)
    return 0


def _emit(report: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        render(report)


def display_path(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text (names with undecodable bytes get \\x escapes), for JSON."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_media(paths: Iterable[str | os.PathLike]) -> tuple[list[tuple[Path, Path]], int]:
    """(root, file) for every file with a media extension under ``paths``, sorted; and the
    number of other files seen. Directories are walked without following symlinked
    directories; a symlinked (even dangling) file is listed."""
    found: list[tuple[Path, Path]] = []
    other = 0
    for p in paths:
        p = Path(p)
        if not os.path.lexists(p):
            raise SoraError(f"input path {display_path(p)} does not exist")
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for d in dirnames:
                    if os.path.islink(os.path.join(dirpath, d)):  # not followed: loops, and footage counted twice
                        _log().warning("not following symlinked directory %s", display_path(os.path.join(dirpath, d)))
                for name in sorted(filenames):
                    if media_kind(os.path.splitext(name)[1]):
                        found.append((p, Path(dirpath) / name))
                    else:
                        other += 1
        else:
            found.append((p.parent, p))
    found.sort(key=lambda rf: (os.fsencode(rf[1].relative_to(rf[0])), os.fsencode(rf[0])))
    return found, other


def _probe_task(task: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Worker: probe one footage file -> a JSON-able row."""
    row: dict[str, Any] = {"path": task["rel"], "ext": norm_ext(task["ext"])}
    try:
        data = read_source(task["file"])
        info = probe_media(data, task["ext"], Limits(), stride=context["stride"])
    except Rejected as r:
        return {**row, "ok": False, "reason": r.reason, "detail": r.detail}
    return {**row, "ok": True, **asdict(info), "duration": info.duration}


def probe_footage(paths: list[str | os.PathLike], workers: int = 1, stride: int = 1, timeout: float = 0) -> dict[str, Any]:
    """Decode every media file under ``paths``; summarise kinds, codecs, sizes, hours, failures."""
    files, other = find_media(paths)
    tasks = [{"file": str(f), "rel": display_path(f.relative_to(r)), "ext": f.suffix} for r, f in files]
    rows = []
    pool = IsolatedPool(_probe_task, {"stride": stride}, workers=workers, timeout=timeout)
    with progress("probing", len(tasks)) as advance:
        for task, out in zip(tasks, pool.imap(tasks)):
            if isinstance(out, Crashed):
                out = {"path": task["rel"], "ext": norm_ext(task["ext"]), "ok": False, "reason": out.reason, "detail": out.detail}
            rows.append(out)
            advance()
    ok = [r for r in rows if r["ok"]]
    return {
        "kind": "footage",
        "paths": [display_path(p) for p in paths],
        "files": len(rows),
        "other_files": other,
        "decodable": len(ok),
        "by_kind": dict(Counter(r["kind"] for r in ok)),
        "by_container": dict(Counter(r["ext"] for r in ok).most_common()),
        "by_codec": dict(Counter(r["codec"] for r in ok).most_common()),
        "by_resolution": dict(Counter(f"{r['width']}x{r['height']}" for r in ok).most_common()),
        "hours": round(sum(r["duration"] for r in ok) / 3600, 6),
        "frames": sum(r["num_frames"] for r in ok if r["kind"] == "video"),
        "failures_by_reason": dict(Counter(r["reason"] for r in rows if not r["ok"]).most_common()),
        "failures": [{k: r[k] for k in ("path", "reason", "detail")} for r in rows if not r["ok"]],
    }


def probe_shard_set(shard_dir: str | os.PathLike, decode: bool = False) -> dict[str, Any]:
    """Open every shard of a set, count its samples against index.json, check each sample's
    json has the required fields; shape histogram and caption-length statistics."""
    from sora_train.data.shards import REQUIRED_META, iter_samples, read_index, shape_key

    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    problems: list[str] = []
    shapes: Counter[str] = Counter()
    media: Counter[str] = Counter()
    words: list[int] = []
    seconds = 0.0
    keys: set[str] = set()
    shards = index.get("shards", [])
    with progress("verifying", len(shards)) as advance:
        for entry in shards:
            path = shard_dir / entry["name"]
            count = 0
            try:
                if not path.is_file():
                    raise SoraError(f"{entry['name']} is listed in index.json but missing")
                for sample in iter_samples(path):
                    count += 1
                    key = sample["__key__"]
                    if key in keys:
                        problems.append(f"{entry['name']}: duplicate key {key}")
                    keys.add(key)
                    exts = [e for e in sample if e not in ("__key__", "json")]
                    if "json" not in sample or len(exts) != 1:
                        problems.append(f"{entry['name']}: sample {key} has members {sorted(e for e in sample if e != '__key__')}")
                        continue
                    meta = json.loads(sample["json"])
                    missing = [k for k in REQUIRED_META if k not in meta]
                    if missing:
                        problems.append(f"{entry['name']}: sample {key} json lacks {missing}")
                        continue
                    media[exts[0]] += 1
                    shapes[shape_key(meta["num_frames"], meta["height"], meta["width"])] += 1
                    words.append(len(str(meta["caption"]).split()))
                    seconds += float(meta.get("duration") or 0)
                    if decode:
                        problems += _check_decode(entry["name"], key, exts[0], sample[exts[0]], meta)
            except SoraError as e:
                problems.append(short(e))
            if count != entry.get("count"):
                problems.append(f"{entry['name']}: {count} samples, index.json says {entry.get('count')}")
            advance()
    total = sum(shapes.values())
    if index.get("num_samples") is not None and index["num_samples"] != total:
        problems.append(f"index.json says {index['num_samples']} samples; the shards hold {total}")
    cap: dict[str, Any] = {}
    if words:
        cap = {
            "min_words": min(words),
            "median_words": statistics.median(words),
            "mean_words": round(statistics.fmean(words), 2),
            "max_words": max(words),
            "empty": sum(1 for w in words if w == 0),
        }
    return {
        "kind": "shards",
        "path": display_path(shard_dir),
        "ok": not problems,
        "tool": index.get("tool"),
        "num_shards": len(shards),
        "num_samples": total,
        "num_rejects": index.get("num_rejects"),
        "hours": round(seconds / 3600, 6),
        "by_media": dict(media.most_common()),
        "shape_histogram": dict(shapes.most_common()),
        "captions": cap,
        "problems": problems,
    }


def _check_decode(shard: str, key: str, ext: str, data: bytes, meta: dict[str, Any]) -> list[str]:
    try:
        info = probe_media(data, ext, Limits(min_side=1, max_side=1 << 16, max_aspect=1e9))
    except Rejected as r:
        return [f"{shard}: sample {key} ({ext}) does not decode: {r.reason}: {r.detail}"]
    if (info.num_frames, info.width, info.height) != (meta["num_frames"], meta["width"], meta["height"]):
        got = f"{info.num_frames}x{info.height}x{info.width}"
        return [f"{shard}: sample {key} decodes to {got}, json says {meta['num_frames']}x{meta['height']}x{meta['width']}"]
    return []


# -- output ----------------------------------------------------------------------------------
class progress:  # noqa: N801 (used like a function: `with progress(...) as advance`)
    """A rich progress bar on stderr (plain and quiet when stderr is not a terminal)."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total

    def __enter__(self) -> Callable[..., None]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, disable=not console.is_terminal, transient=False,
        )
        self._bar.start()
        task = self._bar.add_task(self.what, total=self.total)

        def advance(description: str | None = None) -> None:
            self._bar.update(task, advance=1, **({"description": description} if description else {}))

        return advance

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()


def table(title: str, rows: Iterable[tuple[Any, ...]], headers: tuple[str, ...]):
    """A rich table: the first column left-aligned, the rest right-aligned."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if i else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def console():
    from rich.console import Console

    return Console(soft_wrap=True)


def print_run_summary(title: str, rows: list[tuple[Any, ...]], run: dict[str, Any], index: dict[str, Any],
                      top: tuple[str, tuple[str, str], dict[str, int]] | None = None) -> None:
    """What a run of a shard-set tool did beside what the set now holds: ``rows`` of (what,
    this run, shard set), then the rejects by reason; ``top``: (title, headers, counts) of a
    top-10 table below it."""
    rejected = run["rejected"]
    rows = [*rows, ("rejected", sum(rejected.values()), index["num_rejects"])]
    rows += [(f"  {reason}", n, index["rejects_by_reason"].get(reason, "")) for reason, n in rejected.items()]
    c = console()
    c.print(table(title, rows, ("", "this run", "shard set")))
    if top is not None and top[2]:
        c.print(table(top[0], Counter(top[2]).most_common(10), top[1]))


def _render_footage(r: dict[str, Any]) -> None:
    c = console()
    c.print(table(
        f"footage: {', '.join(r['paths'])}",
        [("media files", r["files"]), ("decodable", r["decodable"]), ("failing", r["files"] - r["decodable"]),
         ("other files (ignored)", r["other_files"]), ("hours of video", f"{r['hours']:.4f}"), ("video frames", r["frames"])],
        ("", "count"),
    ))
    sections = (("by kind", "by_kind"), ("by container", "by_container"), ("by codec", "by_codec"), ("by resolution (top 15)", "by_resolution"))
    for title, key in sections:
        if r[key]:
            c.print(table(title, list(r[key].items())[:15], (title.split()[1], "files")))
    if r["failures"]:
        c.print(table("files that fail", [(f["path"], f["reason"], f["detail"]) for f in r["failures"]], ("path", "reason", "detail")))


def _render_shards(r: dict[str, Any]) -> None:
    c = console()
    rows = [("shards", r["num_shards"]), ("samples", r["num_samples"]), ("rejects logged", r["num_rejects"]),
            ("hours", f"{r['hours']:.4f}"), ("written by", r["tool"])]
    rows += [(f"caption {k}", v) for k, v in r["captions"].items()]
    c.print(table(f"shard set: {r['path']}", rows, ("", "value")))
    if r["by_media"]:
        c.print(table("media", list(r["by_media"].items()), ("ext", "samples")))
    if r["shape_histogram"]:
        c.print(table("shapes F x H x W (top 15)", list(r["shape_histogram"].items())[:15], ("shape", "samples")))
    if r["problems"]:
        c.print(table("problems", [(p,) for p in r["problems"]], ("problem",)))
    c.print("[green]ok[/green]" if r["ok"] else f"[red]{len(r['problems'])} problem(s)[/red]")
