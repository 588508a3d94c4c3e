"""Fixtures for the artifact tests: sample payloads and an artifact factory.

Key pairs (the `keys` fixture, KeyPair) live in tests/conftest.py and are re-exported
here for the modules that import them from this one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.signing import Signer
from otad.artifact.writer import ArtifactSpec, PayloadSpec, rootfs_image, write_artifact
from tests.conftest import KeyPair

__all__ = ["ArtifactFactory", "KeyPair", "make_payload"]


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
