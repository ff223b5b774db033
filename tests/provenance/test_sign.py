"""C2PA signing and verification: every generated file verifies, one changed byte fails,
a bad identity is one line and never costs the video."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from sora_train.provenance import Provenance, inspect_file, write_generated_video
from sora_train.provenance.sign import DIGITAL_SOURCE_TYPE, identity_from_env, load_identity
from sora_train.provenance.verify import NOT_OURS, OURS, UNKNOWN, read_manifest
from sora_train.utils.errors import SoraError

from provenance_helpers import textured_video

CLAIMS = {"prompt": "a red kite, ask bob@example.com", "model_sha256": "0123456789abcdef" * 4, "steps": 4, "guidance_scale": 3.0, "seed": 7}


def _tiny() -> np.ndarray:
    return textured_video(0, frames=5, size=32)


def test_signed_video_verifies_with_claims(tmp_path, pki, signed):
    rep = write_generated_video(tmp_path / "a.mp4", _tiny(), 8.0, CLAIMS, signed)
    assert rep.signed and not rep.watermarked and "watermark skipped" in rep.notes[0]
    m = read_manifest((tmp_path / "a.mp4").read_bytes(), "video/mp4", pki.ca.read_text())
    assert m.present and m.valid and m.trusted and m.ours and m.state == "Trusted"
    assert m.claims["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert m.claims["model_sha256"] == CLAIMS["model_sha256"] and m.claims["steps"] == 4 and m.claims["seed"] == 7
    assert m.claims["prompt"] == "a red kite, ask [email]"  # scrubbed before it is stored
    report = inspect_file(tmp_path / "a.mp4", pki.ca.read_text())
    assert report.verdict == OURS and report.label == "AI-generated video (sora_train)"


def test_one_changed_byte_in_the_video_stream_fails(tmp_path, pki, signed):
    path = tmp_path / "a.mp4"
    write_generated_video(path, _tiny(), 8.0, CLAIMS, signed)
    data = bytearray(path.read_bytes())
    i = data.find(b"mdat") + 64  # inside the coded frames
    data[i] ^= 0x01
    bad = tmp_path / "tampered.mp4"
    bad.write_bytes(bytes(data))
    m = read_manifest(bytes(data), "video/mp4", pki.ca.read_text())
    assert m.present and not m.valid and m.state == "Invalid" and any("mismatch" in f for f in m.failures)
    assert inspect_file(bad, pki.ca.read_text()).verdict == UNKNOWN  # 32x32: no watermark to fall back on


def test_signer_outside_the_trust_anchors_is_not_ours(tmp_path, tmp_path_factory, signed):
    from provenance_helpers import make_pki

    stranger = make_pki(tmp_path_factory.mktemp("other_pki"))
    write_generated_video(tmp_path / "a.mp4", _tiny(), 8.0, CLAIMS, signed)
    report = inspect_file(tmp_path / "a.mp4", stranger.ca.read_text())
    assert report.manifest.valid and report.manifest.trusted is False and report.verdict == UNKNOWN


def test_png_strip_is_labelled_and_signed(tmp_path, pki, signed):
    from PIL import Image

    from sora_train.provenance import mark_image_file

    Image.fromarray(_tiny()[0]).save(tmp_path / "s.png")
    assert mark_image_file(tmp_path / "s.png", CLAIMS, signed).signed
    with Image.open(tmp_path / "s.png") as im:
        assert im.text["Comment"] == "AI-generated image (sora_train)" and "[email]" in im.text["Description"]
    assert read_manifest((tmp_path / "s.png").read_bytes(), "image/png", pki.ca.read_text()).ours


def test_expired_certificate_is_one_line(pki):
    with pytest.raises(SoraError, match=r"expired on \d{4}-\d\d-\d\d") as e:
        load_identity(pki.expired_cert, pki.expired_key)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, pattern", [
    ("missing", "no such file"),
    ("not_pem", "not a PEM certificate chain"),
    ("wrong_key", "does not belong to the certificate"),
    ("bad_key", "not an unencrypted PEM private key"),
])
def test_bad_identity_is_one_line_without_the_key(tmp_path, pki, case, pattern):
    cert, key = pki.cert, pki.key
    if case == "missing":
        cert = tmp_path / "nope.pem"
    elif case == "not_pem":
        cert = tmp_path / "junk.pem"
        cert.write_text("hello")
    elif case == "wrong_key":
        key = pki.other_key
    else:
        key = tmp_path / "junk.key"
        key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SoraError, match=pattern) as e:
        load_identity(cert, key)
    assert "\n" not in str(e.value) and "PRIVATE KEY" not in str(e.value)


def test_identity_comes_from_the_environment_only(pki):
    assert identity_from_env({}) is None
    ident = identity_from_env({"SORA_C2PA_CERT": str(pki.cert), "SORA_C2PA_KEY": str(pki.key)})
    assert ident.alg == "es256" and "PRIVATE" not in repr(ident) and "PRIVATE" not in str(ident)
    with pytest.raises(SoraError, match="needs both"):
        identity_from_env({"SORA_C2PA_CERT": str(pki.cert)})


def test_bad_identity_still_writes_the_video_and_warns_once(tmp_path, pki, caplog):
    prov = Provenance.from_env({"SORA_C2PA_CERT": str(pki.expired_cert), "SORA_C2PA_KEY": str(pki.expired_key)})
    assert prov.identity is None and "expired" in prov.problem
    with caplog.at_level(logging.WARNING, logger="sora_train.provenance"):
        for i in range(3):
            rep = write_generated_video(tmp_path / f"{i}.mp4", _tiny(), 8.0, CLAIMS, prov)
            assert rep.path.is_file() and not rep.signed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "expired" in warnings[0] and "\n" not in warnings[0]


def test_unsigned_run_warns_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sora_train.provenance"):
        for i in range(2):
            write_generated_video(tmp_path / f"{i}.mp4", _tiny(), 8.0, CLAIMS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not C2PA-signed" in warnings[0]
    desc = json.loads(__import__("sora_train.data.video_io", fromlist=["x"]).read_container_metadata((tmp_path / "0.mp4").read_bytes())["description"])
    assert desc["prompt"] == "a red kite, ask [email]" and desc["label"].startswith("AI-generated")


def test_signing_failure_never_loses_the_video(tmp_path, signed, monkeypatch):
    import sora_train.provenance.sign as sign

    def boom(*a, **k):
        raise SoraError("C2PA signing failed: simulated")

    monkeypatch.setattr(sign, "sign_bytes", boom)
    rep = write_generated_video(tmp_path / "a.mp4", _tiny(), 8.0, CLAIMS, signed)
    assert rep.path.stat().st_size > 0 and not rep.signed and "simulated" in rep.notes[-1]


def test_cli_exit_status_says_ours_not_ours_unknown(tmp_path, pki, signed, capsys):
    from sora_train.cli.eval import main
    from sora_train.data.video_io import encode_video

    write_generated_video(tmp_path / "ours.mp4", _tiny(), 8.0, CLAIMS, signed)
    (tmp_path / "real.mp4").write_bytes(encode_video(textured_video(5, frames=5), 8.0))
    (tmp_path / "notes.txt").write_text("not a video")

    def run(*files):
        with pytest.raises(SystemExit) as e:
            main(["provenance", *map(str, files), "--trust", str(pki.ca)])
        return e.value.code

    assert run(tmp_path / "ours.mp4") == 0
    assert run(tmp_path / "ours.mp4", tmp_path / "real.mp4") == 1
    assert run(tmp_path / "notes.txt") == 3
    out = capsys.readouterr().out
    assert "OURS" in out and "NOT OURS" in out and "not a video or image" in out
    assert inspect_file(tmp_path / "real.mp4").verdict == NOT_OURS
