"""The first artifact: slot A's filesystem as a signed rootfs-image, verified once written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from otad.artifact.reader import ArtifactHeader, SignatureStatus, VerifyPolicy, verify_artifact
from otad.artifact.signing import Signer, Verifier
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.errors import KeyProblem, SignatureError, UsageError
from otad.state import Release

log = logging.getLogger(__name__)


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
) -> ArtifactHeader:
    """Write the artifact of `rootfs` to `target` and read it back with the trusted keys."""
    log.info("writing the artifact %s (%d MiB payload)", name, rootfs.stat().st_size >> 20)
    spec = ArtifactSpec(
        name=name,
        device_types=(device_type,),
        payload=rootfs_image(rootfs, software_version=name),
        signer=signer,
    )
    write_artifact(spec, target)
    log.info("verifying the artifact")
    policy = VerifyPolicy(keys=tuple(verifiers)) if signer is not None else VerifyPolicy()
    try:
        with target.open("rb") as stream:
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
