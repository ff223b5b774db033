"""Test PKI (a CA and end-entity certificates made with `cryptography`, nothing downloaded)
and generated-looking clips for the provenance tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Pki:
    ca: Path  # trust anchor PEM
    cert: Path  # leaf + CA chain PEM
    key: Path
    expired_cert: Path
    expired_key: Path
    other_key: Path  # a key that belongs to no certificate here


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sora_train tests")])


def _usage(ca: bool):
    from cryptography import x509

    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def make_pki(root: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())  # noqa: E731
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Test Root CA")).issuer_name(_name("Test Root CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=400))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(_usage(True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, start: dt.datetime, end: dt.datetime):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(_usage(False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert, key

    good, good_key = leaf("sora_train test signer", now - dt.timedelta(days=1), now + dt.timedelta(days=30))
    old, old_key = leaf("sora_train expired signer", now - dt.timedelta(days=60), now - dt.timedelta(days=1))
    root.mkdir(parents=True, exist_ok=True)
    files = {"ca.pem": pem(ca), "cert.pem": pem(good) + pem(ca), "key.pem": key_pem(good_key), "expired.pem": pem(old) + pem(ca),
             "expired_key.pem": key_pem(old_key), "other_key.pem": key_pem(ec.generate_private_key(ec.SECP256R1()))}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Pki(root / "ca.pem", root / "cert.pem", root / "key.pem", root / "expired.pem", root / "expired_key.pem", root / "other_key.pem")


def textured_video(seed: int = 0, frames: int = 9, size: int = 256) -> np.ndarray:
    """A smooth, moving, generated-looking RGB clip (F, H, W, 3) uint8."""
    import cv2

    r = np.random.default_rng(seed)
    base = cv2.resize(r.random((8, 8, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    tex = cv2.GaussianBlur(r.random((size, size, 3)).astype(np.float32), (0, 0), 2)
    out = [np.clip((0.6 * np.roll(base, 3 * t, axis=1) + 0.4 * np.roll(tex, 2 * t, axis=0)) * 255, 0, 255) for t in range(frames)]
    return np.stack(out).astype(np.uint8)
