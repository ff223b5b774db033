"""C2PA Content Credentials: a signed manifest saying a file is AI-generated, and by what.

The manifest (``build_manifest``) holds a ``c2pa.actions.v2`` assertion with the action
``c2pa.created`` and the IPTC digital source type ``trainedAlgorithmicMedia``, and our own
``org.sora_train.generation`` assertion: the model's export hash, the (scrubbed) prompt and the
sampler settings. ``c2pa-python`` embeds it (a ``uuid`` box in MP4, a ``caBX`` chunk in PNG)
with a hard binding: a hash over the rest of the file, so one changed byte of the video stream
fails verification. A re-encode drops the manifest; the invisible watermark is what survives.

The signing key and certificate chain come from the environment only, never from a config
file (so never from a saved Hydra config or a checkpoint), and are never logged:

  SORA_C2PA_CERT   PEM file: the signing certificate first, then its issuers (not the root)
  SORA_C2PA_KEY    PEM file: the private key of that certificate (PKCS#8 or traditional)
  SORA_C2PA_ALG    optional: es256 | es384 | es512 | ps256 | ps384 | ps512 | ed25519
                   (default: from the key type)
  SORA_C2PA_TSA_URL optional: an RFC 3161 timestamp authority

Without them every output is still written (with the container label and the watermark) and
one warning per run says it is unsigned.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sora_train.utils.errors import SoraError

ENV_CERT, ENV_KEY, ENV_ALG, ENV_TSA = "SORA_C2PA_CERT", "SORA_C2PA_KEY", "SORA_C2PA_ALG", "SORA_C2PA_TSA_URL"
ENV_TRUST = "SORA_C2PA_TRUST_ANCHORS"  # PEM file of CA certificates that verification trusts
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.sora_train.generation"
CLAIM_GENERATOR = "sora_train"
MIME_TYPES = {".mp4": "video/mp4", ".mov": "video/quicktime", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


@dataclass(frozen=True)
class SigningIdentity:
    """A loaded, checked certificate chain and key. ``repr`` never shows the key."""

    cert_chain_pem: bytes
    key_pem: bytes
    alg: str
    subject: str
    not_after: dt.datetime
    tsa_url: str | None = None

    def __repr__(self) -> str:
        return f"SigningIdentity(subject={self.subject!r}, alg={self.alg}, not_after={self.not_after:%Y-%m-%d})"

    __str__ = __repr__


def _c2pa():
    try:
        import c2pa
    except ImportError:  # pragma: no cover - a base dependency; kept for a clear message
        raise SoraError("C2PA signing needs c2pa-python: pip install c2pa-python") from None
    return c2pa


def _alg_for_key(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name, "")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return ""


def load_identity(cert_path: str | os.PathLike, key_path: str | os.PathLike, alg: str | None = None, tsa_url: str | None = None,
                  now: dt.datetime | None = None) -> SigningIdentity:
    """Read and check a certificate chain and its key; every problem is a one-line SoraError.

    Checks: both files exist and parse, the key matches the first certificate, that certificate
    is inside its validity period and is not a CA, and the algorithm fits the key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = Path(cert_path), Path(key_path)
    for what, p in (("certificate", cert_path), ("key", key_path)):
        if not p.is_file():
            raise SoraError(f"C2PA signing {what} {p}: no such file")
    chain_pem = cert_path.read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise SoraError(f"C2PA signing certificate {cert_path}: not a PEM certificate chain") from None
    key_pem = key_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        # The message of a bad key never quotes the key itself.
        raise SoraError(f"C2PA signing key {key_path}: not an unencrypted PEM private key ({type(e).__name__})") from None
    leaf = certs[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.PEM, pub) != key.public_key().public_bytes(serialization.Encoding.PEM, pub):
        raise SoraError(f"C2PA signing key {key_path} does not belong to the certificate {cert_path}")
    now = now or dt.datetime.now(dt.timezone.utc)
    subject = leaf.subject.rfc4514_string()
    if now > leaf.not_valid_after_utc:
        raise SoraError(f"C2PA signing certificate {cert_path} ({subject}) expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if now < leaf.not_valid_before_utc:
        raise SoraError(f"C2PA signing certificate {cert_path} ({subject}) is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise SoraError(f"C2PA signing certificate {cert_path} ({subject}) is a CA certificate; sign with an end-entity certificate it issued")
    except x509.ExtensionNotFound:
        pass
    alg = (alg or _alg_for_key(key)).lower()
    if alg not in ALGS:
        raise SoraError(f"C2PA signing: unsupported key type or algorithm {alg or type(key).__name__!r}; use one of {list(ALGS)}")
    return SigningIdentity(chain_pem, key_pem, alg, subject, leaf.not_valid_after_utc, tsa_url)


def identity_from_env(environ: dict[str, str] | None = None) -> SigningIdentity | None:
    """The signing identity named by SORA_C2PA_CERT / SORA_C2PA_KEY, or None when neither is
    set. One set without the other, or a bad file, is a SoraError."""
    env = os.environ if environ is None else environ
    cert, key = env.get(ENV_CERT), env.get(ENV_KEY)
    if not cert and not key:
        return None
    if not cert or not key:
        raise SoraError(f"C2PA signing needs both {ENV_CERT} and {ENV_KEY}; only {ENV_CERT if cert else ENV_KEY} is set")
    return load_identity(cert, key, env.get(ENV_ALG) or None, env.get(ENV_TSA) or None)


def build_manifest(title: str, claims: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The manifest definition c2pa-python's Builder takes."""
    from sora_train import __version__

    return {
        "claim_generator_info": [{"name": CLAIM_GENERATOR, "version": __version__}],
        "title": title,
        "format": fmt,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE, "softwareAgent": {"name": CLAIM_GENERATOR, "version": __version__}},
            ]}},
            {"label": GENERATION_LABEL, "data": claims},
        ],
    }


def sign_bytes(data: bytes, mime: str, manifest: dict[str, Any], identity: SigningIdentity) -> bytes:
    """Embed a signed manifest into a file's bytes -> the signed file's bytes."""
    c2pa = _c2pa()
    info = c2pa.C2paSignerInfo(identity.alg, identity.cert_chain_pem, identity.key_pem, identity.tsa_url)
    try:
        with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest) as builder:
            dest = io.BytesIO()
            builder.sign(signer, mime, io.BytesIO(data), dest)
    except c2pa.C2paError as e:
        raise SoraError(f"C2PA signing failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return dest.getvalue()


def mime_for(path: str | os.PathLike) -> str | None:
    return MIME_TYPES.get(Path(path).suffix.lower())
