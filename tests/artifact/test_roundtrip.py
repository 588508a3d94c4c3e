"""Artifacts otad writes read back with every field, compression and key type intact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.reader import ArtifactReader, SignatureStatus, VerifyPolicy, verify_artifact
from otad.artifact.writer import ArtifactSpec, bootstrap, module_image, write_artifact
from tests.artifact.conftest import ArtifactFactory, KeyPair, make_payload


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("key_name", ["rsa", "ecdsa", "ed25519"])
def test_rootfs_roundtrip(
    make_rootfs_artifact: ArtifactFactory,
    rootfs_file: Path,
    keys: dict[str, KeyPair],
    compression: Compression,
    key_name: str,
) -> None:
    key = keys[key_name]
    path = make_rootfs_artifact(compression=compression, signer=key.signer)

    with path.open("rb") as stream:
        header, files = verify_artifact(stream, VerifyPolicy((key.verifier,)))

    assert header.signature is SignatureStatus.VERIFIED
    assert header.signed_by is not None
    assert header.signed_by.fingerprint == key.verifier.fingerprint
    assert header.name == "release-1"
    assert header.compatible_devices == ("qemux86-64",)
    payload = header.payloads[0]
    digest = hashlib.sha256(rootfs_file.read_bytes()).hexdigest()
    assert payload.type == "rootfs-image"
    assert payload.software_version == "release-1"
    assert payload.type_info.provides["rootfs-image.checksum"] == digest
    assert [(f.name, f.size, f.checksum, f.verified) for f in files] == [
        ("rootfs.ext4", rootfs_file.stat().st_size, digest, True)
    ]
    assert payload.chunk_index is not None
    assert payload.chunk_index.chunk_size == 64 * 1024
    assert len(payload.chunk_index.digests) == 5


def test_payload_blocks_carry_the_exact_bytes(
    make_rootfs_artifact: ArtifactFactory, rootfs_file: Path
) -> None:
    path = make_rootfs_artifact(compression=Compression.ZSTD)
    received = bytearray()

    with path.open("rb") as stream:
        reader = ArtifactReader(stream)
        reader.read_header()
        for payload_file in reader.payload_files():
            for block in payload_file.blocks():
                received += block
        reader.finish()

    assert bytes(received) == rootfs_file.read_bytes()


def test_writing_is_reproducible(make_rootfs_artifact: ArtifactFactory, tmp_path: Path) -> None:
    first = make_rootfs_artifact(output=tmp_path / "a.mender", compression=Compression.XZ)
    second = make_rootfs_artifact(output=tmp_path / "b.mender", compression=Compression.XZ)

    assert first.read_bytes() == second.read_bytes()


def test_module_image_keeps_files_and_meta_data(tmp_path: Path) -> None:
    files = [
        make_payload(tmp_path / name, size, seed)
        for name, size, seed in [("app.tar", 5000, 1), ("app.conf", 17, 2), ("empty", 0, 3)]
    ]
    spec = ArtifactSpec(
        name="app-2.1",
        device_types=("rpi4", "rpi5"),
        payload=module_image(
            "directory",
            files,
            software_version="2.1",
            meta_data={"dest_dir": "/opt/app", "mode": 493, "tags": ["a", 1]},
        ),
        compression=Compression.GZIP,
    )
    path = write_artifact(spec, tmp_path / "module.mender").path

    with path.open("rb") as stream:
        header, read_files = verify_artifact(stream)

    payload = header.payloads[0]
    assert header.signature is SignatureStatus.UNSIGNED
    assert payload.type == "directory"
    assert payload.software_version == "2.1"
    assert payload.type_info.provides == {"rootfs-image.directory.version": "2.1"}
    assert payload.user_meta_data == {"dest_dir": "/opt/app", "mode": 493, "tags": ["a", 1]}
    assert payload.chunk_index is None
    assert [(f.name, f.size) for f in read_files] == [
        ("app.tar", 5000),
        ("app.conf", 17),
        ("empty", 0),
    ]


def test_bootstrap_has_no_files(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    spec = ArtifactSpec(
        name="factory",
        device_types=("qemux86-64",),
        payload=bootstrap(provides={"rootfs-image.version": "1.0"}),
        signer=keys["ecdsa"].signer,
    )
    path = write_artifact(spec, tmp_path / "bootstrap.mender").path

    with path.open("rb") as stream:
        header, files = verify_artifact(stream, VerifyPolicy((keys["ecdsa"].verifier,)))

    assert files == []
    assert header.payloads[0].type is None
    assert header.payloads[0].type_info.provides == {"rootfs-image.version": "1.0"}
