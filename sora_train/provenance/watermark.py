"""An invisible watermark in the frames of every generated video large enough to carry one.

The transform is invisible-watermark's ``dwtDctSvd`` (Haar DWT, 4x4 block DCT, SVD of each
block; here in the U chroma plane), not one of ours. The payload is 48 bits:

    24 bits  MAGIC: a fixed pattern that says "sora_train made this"
    24 bits  model id: the first 6 hex digits of the export's weights sha256

Every frame carries the whole payload; reading takes the per-bit majority over frames, so a
few frames ruined by compression do not matter. Survives an H.264 re-encode at CRF 28 and a
container change (measured in docs/benchmarks.md), which the C2PA manifest does not.

Strength: scale 78 on U (the library's default is 36), chosen for two reasons, measured on
256x256 clips of 9 frames after a CRF 28 re-encode (bench/bench_provenance.py):
- robustness: at 64, noise-like frames (the debug-size pipeline) keep 92-96% of the 48 bits
  after the majority vote; from 78 up, 100%; PSNR of the watermark alone 35 dB at 78;
- flat black: a flat neutral block (any grey, U = 128) has its largest singular value at
  exactly 1024, and the library moves it to (k + 0.25) * scale or (k + 0.75) * scale. Where
  both targets lie above 1024 (1024 mod scale <= scale / 4: 64, 78, 85, 92, ...), U only
  rises there and black frames (the shapes world's background) keep the mark; at 80 or 96
  half the moves would push black below 0, where RGB clips them away (bit accuracy 48%).
  The price: frames that are mostly pure white (255) clip the other way and do not carry the
  mark. Only one of the two extremes can work; dark scenes are the common one.
48 bits rather than 64: more repetitions of each bit in the frame's 4x4 blocks. The library's
``encode`` swaps two detail bands when it rebuilds the frame (22 dB on textured frames);
``_embedder`` fixes that.

Minimum size: the library refuses frames under 256x256 pixels in area
(``MIN_PIXELS``): too few 4x4 blocks to repeat each bit; our 32x32 shapes-world samples are
below it and carry only the container label and the C2PA manifest (``embed`` says why).

Detection: ``detect`` decides "present" when at least ``MAGIC_MIN_MATCH`` of the 24 magic bits
agree after the majority vote; ``confidence`` is 1 - P(that many matches by chance) under
fair coin flips (at 22/24: p = 1.8e-5). The magic has 12 ones and 12 zeros, so a decoder that
reads all zeros or all ones from flat, unmarked video matches only half.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sora_train.utils.errors import SoraError

METHOD = "dwtDctSvd"
SCALES = (0, 78, 0)  # Y, U, V embedding strength; U only (see the module docstring)
MIN_PIXELS = 256 * 256  # invisible-watermark's own lower bound on H*W
MAGIC_BITS = 24
ID_BITS = 24
NUM_BITS = MAGIC_BITS + ID_BITS
MAGIC = tuple(int(b) for b in "101100011101001001110010")  # 12 ones, 12 zeros
MAGIC_MIN_MATCH = 22
MAX_READ_FRAMES = 32  # frames decoded for detection, evenly spaced


def _lib():
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        raise SoraError("the invisible watermark needs invisible-watermark (pip install --no-deps invisible-watermark PyWavelets)") from None
    return WatermarkEncoder, WatermarkDecoder


def model_id_hex(model_hash: str | None) -> str:
    """6 hex digits naming the model: the export's weights sha256 prefix, else a hash of
    whatever identifies the weights (e.g. 'dit@step 1200'), else 000000."""
    if not model_hash:
        return "000000"
    h = model_hash.lower()
    if len(h) >= 6 and all(c in "0123456789abcdef" for c in h[:6]):
        return h[:6]
    return hashlib.sha256(model_hash.encode()).hexdigest()[:6]


def payload_bits(model_id: str) -> list[int]:
    value = int(model_id_hex(model_id), 16)
    return list(MAGIC) + [(value >> (ID_BITS - 1 - i)) & 1 for i in range(ID_BITS)]


def too_small_reason(height: int, width: int) -> str | None:
    if height * width < MIN_PIXELS:
        return f"{width}x{height} is below the watermark's minimum of {MIN_PIXELS} pixels (256x256)"
    return None


def embed(frames: np.ndarray, model_id: str) -> np.ndarray:
    """Watermark RGB frames (F, H, W, 3) uint8 -> a new array. Raises SoraError when the frames
    are too small (``too_small_reason``)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise SoraError(f"watermark: expected uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    reason = too_small_reason(frames.shape[1], frames.shape[2])
    if reason:
        raise SoraError(f"watermark skipped: {reason}")
    embedder = _embedder(payload_bits(model_id))
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        # The library works in BGR (OpenCV order); our frames are RGB.
        out[i] = embedder.encode(np.ascontiguousarray(frame[..., ::-1]))[..., ::-1]
    return out


def _embedder(bits: list[int]):
    """invisible-watermark's EmbedDwtDctSvd with one fix: its ``encode`` rebuilds each channel
    with the horizontal and vertical detail bands swapped (``idwt2((ca, (v, h, d)))``), which
    changes the picture far more than the watermark does wherever it has texture (PSNR 22 dB
    on noisy frames, against 35+ dB with the bands in order). The embedding itself
    (``encode_frame``, on the approximation band) and the decoder are the library's."""
    _lib()
    import cv2
    import pywt
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    class Embed(EmbedDwtDctSvd):
        def encode(self, bgr: np.ndarray) -> np.ndarray:
            row, col, _ = bgr.shape
            yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
            for channel in range(2):
                if self._scales[channel] <= 0:
                    continue
                ca1, (h1, v1, d1) = pywt.dwt2(yuv[: row // 4 * 4, : col // 4 * 4, channel], "haar")
                self.encode_frame(ca1, self._scales[channel])
                yuv[: row // 4 * 4, : col // 4 * 4, channel] = np.clip(np.rint(pywt.idwt2((ca1, (h1, v1, d1)), "haar")), 0, 255)
            return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)

    return Embed(bits, wmLen=len(bits), scales=list(SCALES))


@dataclass
class WatermarkReading:
    present: bool
    confidence: float  # 1 - P(this many magic bits match by chance)
    magic_match: int  # of MAGIC_BITS, after the per-bit majority over frames
    model_id: str | None  # 6 hex digits, when present
    frames_read: int
    frame_agreement: float  # mean fraction of bits in which a frame agrees with the majority
    reason: str = ""  # why nothing could be read (too small, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _chance_tail(k: int, n: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def read_bits(frames: np.ndarray) -> np.ndarray:
    """Per-frame payload bits (F, NUM_BITS) of RGB frames (F, H, W, 3)."""
    _, Decoder = _lib()
    dec = Decoder("bits", NUM_BITS)
    return np.array([dec.decode(np.ascontiguousarray(f[..., ::-1]), METHOD, scales=list(SCALES)) for f in frames], dtype=np.int64).reshape(len(frames), NUM_BITS)


def detect(frames: np.ndarray) -> WatermarkReading:
    """Read the watermark from RGB frames (F, H, W, 3) uint8 (at most MAX_READ_FRAMES are used)."""
    frames = np.asarray(frames)
    reason = too_small_reason(frames.shape[1], frames.shape[2])
    if reason:
        return WatermarkReading(False, 0.0, 0, None, 0, 0.0, reason)
    if len(frames) > MAX_READ_FRAMES:
        frames = frames[np.linspace(0, len(frames) - 1, MAX_READ_FRAMES).round().astype(int)]
    bits = read_bits(frames)  # (F, NUM_BITS)
    majority = (bits.mean(axis=0) > 0.5).astype(np.int64)  # (NUM_BITS,)
    match = int((majority[:MAGIC_BITS] == np.array(MAGIC)).sum())
    present = match >= MAGIC_MIN_MATCH
    model = None
    if present:
        value = int("".join(str(b) for b in majority[MAGIC_BITS:]), 2)
        model = f"{value:06x}"
    agreement = float((bits == majority[None]).mean())
    return WatermarkReading(present, 1.0 - _chance_tail(match, MAGIC_BITS), match, model, len(frames), agreement)


def bit_accuracy(frames: np.ndarray, model_id: str) -> float:
    """Fraction of the 48 payload bits read back right after the per-frame majority vote."""
    bits = read_bits(frames)
    majority = (bits.mean(axis=0) > 0.5).astype(np.int64)
    return float((majority == np.array(payload_bits(model_id))).mean())
