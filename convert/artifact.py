"""The first artifact: slot A's filesystem as a signed rootfs-image, verified once written.

Its data is gzip by default, which every Mender tool reads (Debian's mender-artifact 3.9
and mender-client 3.4 have no zstd, and a Mender server parses what it is given), at
gzip's fastest level: the artifact holds what slot A of every flashed device already
has, so it is seldom downloaded, and level 1 writes twice as fast as the default 6 for
about 6% more bytes. zstd is several times faster still, to write and to read, for
artifacts that only otad consumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from convert import progress
from otad.artifact.compression import Compression
from otad.artifact.reader import ArtifactHeader, SignatureStatus, VerifyPolicy, verify_artifact
from otad.artifact.signing import Signer, Verifier
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.errors import KeyProblem, SignatureError, UsageError
from otad.state import Release

log = logging.getLogger(__name__)

GZIP_LEVEL = 1


def artifact_path(output: Path) -> Path:
    """Where the artifact of the image `output` goes: beside it, .img replaced by .mender."""
    stem = output.name.removesuffix(".img")
    return output.with_name(f"{stem}.mender")


def emit(
    rootfs: Path,
    target: Path,
    name: str,
    device_type: str,
    signer: Signer | None,
    verifiers: Sequence[Verifier],
    compression: str = "gzip",
) -> ArtifactHeader:
    """Write the artifact of `rootfs` to `target` and read it back with the trusted keys."""
    size = rootfs.stat().st_size
    log.info("writing the artifact %s (%d MiB payload, %s)", name, size >> 20, compression)
    spec = ArtifactSpec(
        name=name,
        device_types=(device_type,),
        payload=rootfs_image(rootfs, software_version=name),
        signer=signer,
        compression=Compression.from_name(compression),
        level=GZIP_LEVEL if compression == "gzip" else None,
    )
    # The writer reads the payload twice: to hash it, then to compress it.
    with progress.watch_reads("hashing and compressing slot A", rootfs, size, passes=2):
        write_artifact(spec, target)
    log.info("verifying the artifact")
    policy = VerifyPolicy(keys=tuple(verifiers)) if signer is not None else VerifyPolicy()
    try:
        with (
            progress.watch_reads("verifying the artifact", target, target.stat().st_size),
            target.open("rb") as stream,
        ):
            header, _ = verify_artifact(stream, policy)
    except SignatureError as error:
        raise UsageError(
            f"the artifact signed with --key does not verify with the keys the device will "
            f"trust (--verify-key): {error}"
        ) from None
    if signer is not None and header.signature is not SignatureStatus.VERIFIED:
        raise KeyProblem("the artifact's signature does not verify with the trusted keys")
    return header


def release_of(header: ArtifactHeader) -> Release:
    """What slot A holds, as the state record names it."""
    payload = header.payloads[0]
    return Release(header.name, payload.software_version, dict(payload.type_info.provides))
