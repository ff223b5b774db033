"""Fixtures: a test PKI, a signing Provenance, and no identity from the environment."""

from __future__ import annotations

import pytest
from provenance_helpers import Pki, make_pki

from sora_train.provenance import Provenance, reset_default_provenance


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def signed(pki) -> Provenance:
    from sora_train.provenance.sign import load_identity

    return Provenance(load_identity(pki.cert, pki.key))


@pytest.fixture(autouse=True)
def _fresh_provenance(monkeypatch):
    """No signing identity from the developer's environment; warnings counted afresh."""
    for var in ("SORA_C2PA_CERT", "SORA_C2PA_KEY", "SORA_C2PA_ALG", "SORA_C2PA_TSA_URL", "SORA_C2PA_TRUST_ANCHORS"):
        monkeypatch.delenv(var, raising=False)
    reset_default_provenance()
    yield
    reset_default_provenance()
