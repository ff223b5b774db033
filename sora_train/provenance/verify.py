"""Is this file ours? Read its C2PA manifest and its watermark.

Verdicts:
- ``ours``: a valid manifest whose claim generator is sora_train and that states
  ``trainedAlgorithmicMedia`` (signed by a trusted certificate when trust anchors are given), or
  the watermark read with MAGIC_MIN_MATCH+ of its magic bits (survives re-encoding);
- ``not ours``: no manifest of ours and a readable, large enough video without our watermark;
- ``unknown``: nothing conclusive: not a video or image we can read, too small to carry the
  watermark and no valid manifest, a manifest that fails verification and no watermark, or a
  valid signature from a certificate that the trust anchors do not cover.

Exit status of ``sora-eval provenance``: 0 every file ours, 1 some file not ours, 3 otherwise
some file unknown (2 stays the CLI's usage/error status).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sora_train.provenance import sign as _sign
from sora_train.provenance import watermark as _wm
from sora_train.utils.errors import SoraError

OURS, NOT_OURS, UNKNOWN = "ours", "not ours", "unknown"
EXIT_CODES = {OURS: 0, NOT_OURS: 1, UNKNOWN: 3}


@dataclass
class ManifestReading:
    present: bool
    state: str | None = None  # c2pa: Valid (integrity checked), Trusted (and the chain), Invalid
    valid: bool = False
    trusted: bool | None = None  # None: no trust anchors given
    ours: bool = False  # claim generator sora_train and digital source type trainedAlgorithmicMedia
    signer: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class FileReport:
    path: str
    verdict: str
    reason: str
    manifest: ManifestReading
    watermark: dict[str, Any] | None
    label: str | None = None  # the container's comment tag (forgeable: reported, never decisive)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_manifest(data: bytes, mime: str, trust_anchors_pem: str | None = None) -> ManifestReading:
    import c2pa

    ctx = None
    if trust_anchors_pem:
        ctx = c2pa.Context(settings=c2pa.Settings.from_dict({"verify": {"verify_trust": True}, "trust": {"trust_anchors": trust_anchors_pem}}))
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, ctx) if ctx else c2pa.Reader.try_create(mime, io.BytesIO(data))
    except c2pa.C2paError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        # A manifest store that cannot even be parsed counts as present and invalid.
        return ManifestReading(True, "Invalid", error=msg)
    if reader is None:
        return ManifestReading(False)
    with reader:
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
        active = reader.get_active_manifest() or {}
    failures = [f"{f.get('code')}: {f.get('explanation', '')}".strip() for f in (results.get("activeManifest") or {}).get("failure", [])]
    generation: dict[str, Any] = {}
    source_type = None
    for a in active.get("assertions", []):
        if a.get("label") == _sign.GENERATION_LABEL:
            generation = a.get("data", {})
        if a.get("label", "").startswith("c2pa.actions"):
            for act in a.get("data", {}).get("actions", []):
                source_type = act.get("digitalSourceType") or source_type
    generators = [g.get("name") for g in active.get("claim_generator_info", [])]
    # "valid": the signature and every hash check out; whether the signer is trusted is separate.
    valid = state in ("Valid", "Trusted") and not [f for f in failures if not f.startswith("signingCredential.untrusted")]
    trusted = (state == "Trusted") if trust_anchors_pem else None
    ours = valid and _sign.CLAIM_GENERATOR in generators and source_type == _sign.DIGITAL_SOURCE_TYPE
    claims = {"digital_source_type": source_type, "claim_generator": generators, **generation}
    signer = (active.get("signature_info") or {}).get("common_name")
    return ManifestReading(True, state, valid, trusted, ours, signer, claims, failures)


def _read_frames(data: bytes):
    """At most MAX_READ_FRAMES evenly spaced RGB frames (a long video is never held whole), or
    None when the bytes are neither a video nor an image we can decode."""
    import numpy as np

    from sora_train.data.video_io import decode_image, decode_video, probe_video

    try:
        n = probe_video(data, backend="pyav").num_frames
        idx = np.unique(np.linspace(0, max(0, n - 1), min(max(n, 1), _wm.MAX_READ_FRAMES)).round().astype(int))
        return decode_video(data, idx.tolist(), backend="pyav")
    except Exception:
        pass
    try:
        return decode_image(data)
    except Exception:
        return None


def inspect_file(path: str | os.PathLike, trust_anchors_pem: str | None = None, watermark: bool = True) -> FileReport:
    """Manifest, watermark and verdict for one file (never raises for a bad file)."""
    path = Path(path)
    if not path.is_file():
        return FileReport(str(path), UNKNOWN, "no such file", ManifestReading(False), None)
    data = path.read_bytes()
    mime = _sign.mime_for(path) or _sniff_mime(data)
    manifest = read_manifest(data, mime, trust_anchors_pem) if mime else ManifestReading(False)
    frames = _read_frames(data)
    label = None
    if frames is None:
        return FileReport(str(path), OURS if manifest.ours and manifest.trusted is not False else UNKNOWN,
                          "valid manifest of ours" if manifest.ours else "not a video or image this tool can read", manifest, None)
    try:
        from sora_train.data.video_io import read_container_metadata

        label = read_container_metadata(data).get("comment")
    except Exception:
        label = None
    reading = _wm.detect(frames) if watermark else None
    wm = reading.to_dict() if reading else None
    if manifest.ours and manifest.trusted is not False:
        signer = " (trusted signer)" if manifest.trusted else " (signer not checked: give --trust CA.pem)"
        return FileReport(str(path), OURS, "valid C2PA manifest of ours" + signer, manifest, wm, label)
    if reading is not None and reading.present:
        why = "watermark found"
        if manifest.present and not manifest.valid:
            why += "; its C2PA manifest fails verification (edited after signing)"
        return FileReport(str(path), OURS, why, manifest, wm, label)
    if manifest.ours and manifest.trusted is False:
        return FileReport(str(path), UNKNOWN, "manifest of ours, but its signer is not in the trust anchors", manifest, wm, label)
    if manifest.present and not manifest.valid:
        return FileReport(str(path), UNKNOWN, "C2PA manifest fails verification: " + "; ".join(manifest.failures[:2] or [manifest.error or manifest.state or "invalid"]), manifest, wm, label)
    if reading is None or reading.reason:
        return FileReport(str(path), UNKNOWN, (reading.reason if reading else "watermark not read") + "; no valid manifest of ours", manifest, wm, label)
    return FileReport(str(path), NOT_OURS, f"no watermark ({reading.magic_match}/{_wm.MAGIC_BITS} magic bits) and no manifest of ours", manifest, wm, label)


def _sniff_mime(data: bytes) -> str | None:
    if data[4:8] == b"ftyp":
        return "video/mp4"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return None


def load_trust_anchors(path: str | None) -> str | None:
    """PEM text of the CA certificates to trust: --trust FILE, else SORA_C2PA_TRUST_ANCHORS."""
    path = path or os.environ.get(_sign.ENV_TRUST)
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise SoraError(f"trust anchors {p}: no such file")
    text = p.read_text(encoding="ascii", errors="replace")
    if "BEGIN CERTIFICATE" not in text:
        raise SoraError(f"trust anchors {p}: no PEM certificate in it")
    return text


def summarize(report: FileReport) -> str:
    """A few lines for a terminal."""
    m, w = report.manifest, report.watermark
    lines = [f"{report.path}: {report.verdict.upper()} — {report.reason}"]
    if m.present:
        trust = "" if m.trusted is None else (", trusted signer" if m.trusted else ", signer NOT trusted")
        lines.append(f"  C2PA: {m.state}{trust}; signer {m.signer or '?'}" + (f"; failures: {'; '.join(m.failures[:3])}" if m.failures else ""))
        shown = {k: m.claims.get(k) for k in ("digital_source_type", "model_sha256", "prompt", "steps", "guidance_scale", "seed") if m.claims.get(k) is not None}
        if shown:
            lines.append("  claims: " + json.dumps(shown, ensure_ascii=False))
    else:
        lines.append("  C2PA: no manifest")
    if w is None:
        lines.append("  watermark: not read")
    elif w.get("reason"):
        lines.append(f"  watermark: not read ({w['reason']})")
    else:
        payload = f"model id {w['model_id']}" if w["present"] else "none"
        lines.append(f"  watermark: {payload}; magic {w['magic_match']}/{_wm.MAGIC_BITS}, confidence {w['confidence']:.6f} (chance {1 - w['confidence']:.1e}), {w['frames_read']} frames")
    if report.label:
        lines.append(f"  container label: {report.label}")
    return "\n".join(lines)
