"""Fixtures shared by the whole suite.

A test that needs an external tool skips with the reason when the tool is missing,
except under CI (CI=true), where a missing tool is a failure: CI installs everything.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from otad.artifact.signing import (
    PrivateKey,
    Signer,
    Verifier,
    load_signer,
    load_verifier,
    private_pem,
)


def require_tool(name: str) -> str:
    """Path of the tool `name`; skip (or fail under CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}, but CI must provide it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KeyPair:
    """A key pair on disk in the forms mender-artifact reads (PKCS#1 / SEC1 / PKCS#8)."""

    private: Path
    public: Path

    @property
    def signer(self) -> Signer:
        return load_signer(self.private)

    @property
    def verifier(self) -> Verifier:
        return load_verifier(self.public)


def _write_pair(directory: Path, name: str, key: PrivateKey) -> KeyPair:
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(private_pem(key))
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPair(private, public)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """rsa (3072), rsa2048 (verify-only strength), ecdsa (P-256), ed25519, and 'other'
    (an ECDSA key nobody trusts)."""
    directory = tmp_path_factory.mktemp("keys")
    return {
        "rsa": _write_pair(directory, "rsa", rsa.generate_private_key(65537, 3072)),
        "rsa2048": _write_pair(directory, "rsa2048", rsa.generate_private_key(65537, 2048)),
        "ecdsa": _write_pair(directory, "ecdsa", ec.generate_private_key(ec.SECP256R1())),
        "ed25519": _write_pair(directory, "ed25519", ed25519.Ed25519PrivateKey.generate()),
        "other": _write_pair(directory, "other", ec.generate_private_key(ec.SECP256R1())),
    }
