"""The one way a generated video leaves this project: ``write_generated_video``.

    scrub the prompts -> watermark the frames -> encode with the AI-generated container label
    -> sign a C2PA manifest -> write atomically

``sora-sample``, the training-time sample callback and ``sora-eval`` outputs all go through it,
so nothing is written unmarked. Provenance never costs a video: a watermark or signing failure
is one warning line and the video is written with what did work (the label at least). Each
distinct warning is logged once per process, e.g. the unsigned-provenance one when no signing
identity is configured.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sora_train.provenance import sign as _sign
from sora_train.provenance import watermark as _wm
from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_bytes
from sora_train.utils.logging import get_logger
from sora_train.utils.pii import scrub

log = get_logger("sora_train.provenance")

AI_LABEL = "AI-generated video (sora_train)"
AI_IMAGE_LABEL = "AI-generated image (sora_train)"
# Claims whose text came from a user or a re-writer: scrubbed of personal data before they are
# stored in container metadata or a manifest.
TEXT_CLAIMS = ("prompt", "prompt_expanded", "negative_prompt", "caption", "title")
UNSIGNED_WARNING = (f"provenance: outputs are not C2PA-signed (set {_sign.ENV_CERT} and {_sign.ENV_KEY} to sign them); "
                    "they still carry the AI-generated label and, from 256x256 up, the invisible watermark")

_warned: set[str] = set()


def warn_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` (a warning by default) the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        log.log(level, message)


@dataclass
class Provenance:
    """How outputs are marked. ``identity`` None: unsigned (warned once per run)."""

    identity: _sign.SigningIdentity | None = None
    watermark: bool = True
    problem: str | None = None  # why the configured identity could not be used

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Provenance":
        """The signing identity from SORA_C2PA_CERT / SORA_C2PA_KEY. A bad, expired or
        half-set identity is not fatal: outputs are written unsigned, with that one line."""
        try:
            return cls(_sign.identity_from_env(environ))
        except SoraError as e:
            return cls(None, problem=str(e))

    def warn_if_unsigned(self) -> None:
        if self.identity is None:
            warn_once(f"provenance: {self.problem}; writing outputs unsigned" if self.problem else UNSIGNED_WARNING)


_default: Provenance | None = None


def default_provenance() -> Provenance:
    """The process-wide Provenance, read from the environment once."""
    global _default
    if _default is None:
        _default = Provenance.from_env()
    return _default


def reset_default_provenance() -> None:
    """Forget the cached identity and the warnings given (tests; a changed environment)."""
    global _default
    _default = None
    _warned.clear()


@dataclass
class MarkReport:
    path: Path
    watermarked: bool
    signed: bool
    notes: list[str] = field(default_factory=list)


def scrub_claims(claims: dict[str, Any]) -> dict[str, Any]:
    out = dict(claims)
    for key in TEXT_CLAIMS:
        if isinstance(out.get(key), str):
            out[key] = scrub(out[key])
    return out


def write_generated_video(path: str | os.PathLike, frames: np.ndarray, fps: float, claims: dict[str, Any],
                          provenance: Provenance | None = None, crf: int = 18) -> MarkReport:
    """Write generated RGB frames (F, H, W, 3) uint8 as a marked mp4.

    Args:
        path: where the mp4 goes (written atomically).
        frames: the video, exactly as generated.
        fps: frame rate.
        claims: what the manifest and the container's description state: at least the
            ``prompt``; ``model_sha256`` names the model (its first 6 hex digits are the
            watermark payload); sampler settings, seed, mode. Text claims are scrubbed here.
        provenance: signing identity and options (default: from the environment).
        crf: H.264 quality of the written file.
    Returns:
        MarkReport: what was done, with a note for each step skipped or failed.
    """
    from sora_train.data.video_io import encode_video

    prov = provenance or default_provenance()
    path = Path(path)
    claims = {"label": AI_LABEL, **scrub_claims(claims)}
    notes: list[str] = []
    frames = np.asarray(frames)

    watermarked = False
    if prov.watermark:
        small = _wm.too_small_reason(frames.shape[1], frames.shape[2])
        if small:
            notes.append(f"watermark skipped: {small}")  # documented: tiny (shapes-world) videos carry label + manifest
            warn_once(f"provenance: no invisible watermark in {frames.shape[2]}x{frames.shape[1]} videos (below the minimum of "
                      f"256x256 in area); they carry the AI-generated label and the C2PA manifest", logging.INFO)
        else:
            try:
                frames = _wm.embed(frames, claims.get("model_sha256") or claims.get("model_id") or "")
                watermarked = True
                claims["watermark"] = {"method": f"invisible-watermark {_wm.METHOD}", "model_id": _wm.model_id_hex(claims.get("model_sha256") or claims.get("model_id"))}
            except Exception as e:  # never lose a video to the watermark
                note = f"watermark failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                notes.append(note)
                warn_once(f"provenance: {note}; writing the video without it")
    metadata = {"comment": AI_LABEL, "title": str(claims.get("prompt", ""))[:200], "artist": "sora_train",
                "description": json.dumps(claims, ensure_ascii=False, default=str)}
    data = encode_video(frames, fps, metadata=metadata, crf=crf)
    data, signed = _sign_or_warn(data, "video/mp4", path.name, claims, prov, notes)
    atomic_write_bytes(path, data)
    return MarkReport(path, watermarked, signed, notes)


def mark_image_file(path: str | os.PathLike, claims: dict[str, Any], provenance: Provenance | None = None) -> MarkReport:
    """Label (PNG text chunks) and sign an image we generated or drew from generated frames,
    in place. Images are not watermarked (strips and grids of tiny frames)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    prov = provenance or default_provenance()
    path = Path(path)
    claims = {"label": AI_IMAGE_LABEL, **scrub_claims(claims)}
    notes: list[str] = []
    with Image.open(path) as im:
        info = PngInfo()
        info.add_text("Comment", AI_IMAGE_LABEL)
        info.add_text("Software", "sora_train")
        info.add_text("Description", json.dumps(claims, ensure_ascii=False, default=str))
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=info)
    data, signed = _sign_or_warn(buf.getvalue(), "image/png", path.name, claims, prov, notes)
    atomic_write_bytes(path, data)
    return MarkReport(path, False, signed, notes)


def _sign_or_warn(data: bytes, mime: str, title: str, claims: dict[str, Any], prov: Provenance, notes: list[str]) -> tuple[bytes, bool]:
    if prov.identity is None:
        prov.warn_if_unsigned()
        notes.append("unsigned: " + (prov.problem or "no signing identity configured"))
        return data, False
    try:
        return _sign.sign_bytes(data, mime, _sign.build_manifest(title, claims, mime), prov.identity), True
    except SoraError as e:
        notes.append(str(e))
        warn_once(f"provenance: {e}; writing outputs unsigned")
        return data, False
