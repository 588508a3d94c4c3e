"""Fixtures for the download tests: PKI, a real nginx, signed uncompressed artifacts.

The engine's loop-device fixtures (`device`, `disk`, `kernel`) are imported from
tests/engine/conftest.py so that failure cases can check what a real install left.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.reader import VerifyPolicy, verify_artifact
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.download import DownloadSettings
from tests.artifact.conftest import make_payload
from tests.conftest import KeyPair, require_tool
from tests.download.servers import Nginx, Pki, make_pki, start_nginx
from tests.engine.conftest import IMAGE_SIZE, Device, device, disk, kernel

__all__ = ["Device", "device", "disk", "kernel"]

CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True)
class Artifact:
    path: Path
    image: bytes
    payload_offset: int  # where the image starts in the artifact

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def _payload_offset(path: Path) -> int:
    with path.open("rb") as stream:
        _, files = verify_artifact(stream)
    offset = files[0].artifact_offset
    assert offset is not None
    return offset


@pytest.fixture(scope="session")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]
) -> dict[str, Artifact]:
    """release-2 and release-3: signed, uncompressed rootfs artifacts with chunk indexes."""
    directory = tmp_path_factory.mktemp("download-artifacts")
    made = {}
    for name, seed in (("release-2", 2), ("release-3", 3)):
        image = make_payload(directory / f"{name}.img", IMAGE_SIZE, seed=seed)
        spec = ArtifactSpec(
            name=name,
            device_types=("otad-test",),
            payload=rootfs_image(image, software_version=name[-1], chunk_size=CHUNK_SIZE),
            compression=Compression.NONE,
            signer=keys["ecdsa"].signer,
        )
        path = write_artifact(spec, directory / f"{name}.mender").path
        made[name] = Artifact(path, image.read_bytes(), _payload_offset(path))
    return made


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def nginx(tmp_path: Path, pki: Pki, artifacts: dict[str, Artifact]) -> Iterator[Nginx]:
    """nginx serving release-2 as /artifact.mender; stopped on every path."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        binary = require_tool("nginx")
    server = start_nginx(binary, tmp_path / "nginx", pki)
    try:
        shutil.copy(artifacts["release-2"].path, server.www / "artifact.mender")
        yield server
    finally:
        server.stop()


@pytest.fixture
def policy(keys: dict[str, KeyPair]) -> VerifyPolicy:
    return VerifyPolicy((keys["ecdsa"].verifier,), require_signature=True)


@pytest.fixture
def sleeps() -> list[float]:
    """The waits a download asked for; pass `sleeps.append` as its sleep."""
    return []


def settings_for(pki: Pki, **changes: object) -> DownloadSettings:
    """Settings that trust the test CA, with short timeouts and few retries."""
    fields: dict[str, object] = {
        "ca_bundle": pki.ca,
        "retries": 4,
        "retry_time": 60.0,
        "connect_timeout": 3.0,
        "read_timeout": 3.0,
        **changes,
    }
    return DownloadSettings(**fields)  # type: ignore[arg-type]
