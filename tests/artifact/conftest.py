"""Fixtures for the artifact tests: keys of every supported type and sample payloads."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from otad.artifact.compression import Compression
from otad.artifact.signing import (
    PrivateKey,
    Signer,
    Verifier,
    load_signer,
    load_verifier,
    private_pem,
)
from otad.artifact.writer import ArtifactSpec, PayloadSpec, rootfs_image, write_artifact


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


def make_payload(path: Path, size: int, seed: int = 1) -> Path:
    """A file of `size` bytes, half random and half repetitive, so it compresses a bit."""
    generator = random.Random(seed)
    half = size // 2
    path.write_bytes(generator.randbytes(half) + bytes(size - half))
    return path


@pytest.fixture
def rootfs_file(tmp_path: Path) -> Path:
    """A 300 KiB stand-in for a filesystem image: several chunks at a 64 KiB chunk size."""
    return make_payload(tmp_path / "rootfs.ext4", 300 * 1024 + 123)


ArtifactFactory = Callable[..., Path]


@pytest.fixture
def make_rootfs_artifact(tmp_path: Path, rootfs_file: Path) -> ArtifactFactory:
    """Write a rootfs-image artifact; keyword arguments override ArtifactSpec fields."""

    def make(
        name: str = "release-1",
        compression: Compression = Compression.GZIP,
        signer: Signer | None = None,
        payload: PayloadSpec | None = None,
        output: Path | None = None,
        **fields: object,
    ) -> Path:
        spec = ArtifactSpec(
            name=name,
            device_types=("qemux86-64",),
            payload=payload
            or rootfs_image(rootfs_file, software_version=name, chunk_size=64 * 1024),
            compression=compression,
            signer=signer,
            **fields,  # type: ignore[arg-type]
        )
        target = output or tmp_path / f"{name}-{compression.value}-{os.getpid()}.mender"
        return write_artifact(spec, target).path

    return make
