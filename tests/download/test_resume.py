"""Resuming from what the slot already holds, after a restart or a power cut."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from otad.artifact.chunks import ChunkHasher, ChunkIndex
from otad.artifact.reader import VerifyPolicy, verify_artifact
from otad.bootloader.base import Slot
from otad.download import DownloadError, HttpSource
from otad.errors import ChunkMismatch
from otad.splice import SplicedSource, resume_point
from tests.download.conftest import CHUNK_SIZE, Artifact, Device, settings_for
from tests.download.faults import Fault, FaultProxy, Kind
from tests.download.servers import Nginx, Pki


def _index(image: bytes) -> ChunkIndex:
    hasher = ChunkHasher(CHUNK_SIZE)
    hasher.update(image)
    return hasher.finish()


@pytest.mark.parametrize(("chunks", "damage"), [(0, True), (5, True), (12, False), (7, False)])
def test_resume_point_counts_the_matching_chunks(
    tmp_path: Path, artifacts: dict[str, Artifact], chunks: int, damage: bool
) -> None:
    artifact = artifacts["release-2"]
    image = artifact.image
    index = _index(image)
    prefix = min(chunks * CHUNK_SIZE, len(image))
    slot = tmp_path / "slot"
    rest = b"\xff" * CHUNK_SIZE if damage and prefix < len(image) else b""
    slot.write_bytes(image[:prefix] + rest)
    point = resume_point(slot, index, artifact.payload_offset)
    assert point is not None
    assert point.chunks == min(chunks, len(index.digests))
    assert point.prefix == prefix
    assert point.resume_at == artifact.payload_offset + prefix
    assert point.range_header == f"bytes={point.resume_at}-"
    assert point.is_complete is (prefix == len(image))
    assert point.prefix_sha256().digest() == hashlib.sha256(image[:prefix]).digest()


def test_no_resume_point_without_an_offset_or_an_index(tmp_path: Path) -> None:
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(CHUNK_SIZE))
    assert resume_point(slot, _index(bytes(CHUNK_SIZE)), None) is None
    assert resume_point(slot, None, 0) is None


def test_spliced_download_fetches_only_the_rest(
    tmp_path: Path,
    nginx: Nginx,
    pki: Pki,
    policy: VerifyPolicy,
    artifacts: dict[str, Artifact],
) -> None:
    """Part of the slot written, then the header and a Range request for the rest verify."""
    artifact = artifacts["release-2"]
    slot = tmp_path / "slot"
    slot.write_bytes(artifact.image[: 7 * CHUNK_SIZE] + b"\x00" * 1000)
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    point = resume_point(slot, _index(artifact.image), artifact.payload_offset)
    assert point is not None
    assert point.chunks == 7
    with SplicedSource(HttpSource(url, settings_for(pki)), slot) as source:
        source.splice(point)
        header, files = verify_artifact(source, policy)
        received = source.http.received
    assert files[0].verified
    assert header.name == "release-2"
    size = len(artifact.data)
    assert received < size - point.prefix + 64 * 1024
    assert nginx.wait_for_log(f'"{point.range_header}"')


def test_spliced_download_of_a_wrong_slot_fails_verification(
    tmp_path: Path, nginx: Nginx, pki: Pki, policy: VerifyPolicy, artifacts: dict[str, Artifact]
) -> None:
    """A resume point that does not fit the slot only makes verification fail."""
    artifact = artifacts["release-2"]
    slot = tmp_path / "slot"
    slot.write_bytes(artifact.image[: 4 * CHUNK_SIZE])
    point = resume_point(slot, _index(artifact.image), artifact.payload_offset)
    assert point is not None
    slot.write_bytes(b"\x01" * (4 * CHUNK_SIZE))  # the slot changed after the count
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with SplicedSource(HttpSource(url, settings_for(pki)), slot) as source:
        source.splice(point)
        with pytest.raises(ChunkMismatch, match="chunk 0"):
            verify_artifact(source, policy)


@pytest.mark.slow
def test_engine_resumes_into_the_slot_after_an_interruption(
    nginx: Nginx, pki: Pki, device: Device, artifacts: dict[str, Artifact]
) -> None:
    """A download cut with no retries left fails the install; the next install takes the
    written chunks from the slot and downloads only the rest.

    The cut is a clean close after 1.25 MiB: every byte before it reaches the client
    however slowly it reads, so what the slot holds does not depend on the machine's
    load. (A reset discards what the proxy could not send yet: under load, the client
    could get less than one chunk before it.)"""
    artifact = artifacts["release-2"]
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with (
        FaultProxy(nginx.ports.tls, [Fault(Kind.CLOSE, 5 << 18)]) as proxy,
        HttpSource(proxy.url("/artifact.mender"), settings_for(pki, retries=0)) as source,
        pytest.raises(DownloadError),
    ):
        device.engine().install(source)
    assert device.bootloader.status().trial is None

    engine = device.reboot()  # power cut: the firmware boots A again, the engine recovers
    slot = engine.snapshot().devices[Slot.B].path
    point = resume_point(slot, _index(artifact.image), artifact.payload_offset)
    assert point is not None
    # The image's second half is zeros, as a fresh slot is: only the random half counts.
    assert 0 < point.chunks < len(artifact.image) // 2 // CHUNK_SIZE

    with SplicedSource(HttpSource(url, settings_for(pki)), slot) as spliced:
        spliced.splice(point)
        result = engine.install(spliced)
        received = spliced.http.received
    assert result.slot is Slot.B
    assert result.bytes_skipped >= point.prefix - (1 << 20)
    assert received < len(artifact.data) - point.prefix + 64 * 1024
    assert device.bootloader.status().trial is Slot.B
    assert device.disk.partitions["b"].read_bytes()[: len(artifact.image)] == artifact.image
    assert nginx.wait_for_log(f'"{point.range_header}"', timeout=60)
