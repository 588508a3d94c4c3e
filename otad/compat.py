"""Whether a verified artifact may be installed on this device, now.

Mender's rules: the device type must be among the artifact's compatible devices; if the
artifact depends on artifact names or groups, the release the device runs must be one of
them; every key of a payload's type-info artifact_depends must match what the running
release provides. otad adds downgrade protection: the payload's software version must
not sort before the running one (Debian version order, see otad.artifact.release),
unless the caller explicitly allows it. The running version is the same provide of the
running release (rootfs-image.version, rootfs-image.<module>.version); for root
filesystems the version the release record carries stands in when the provide is absent.
"""

from __future__ import annotations

from otad.artifact.headers import ROOTFS_IMAGE
from otad.artifact.reader import ArtifactHeader
from otad.artifact.release import is_downgrade, is_valid_version, software_version_key
from otad.errors import Downgrade, Incompatible
from otad.state import Release


def current_provides(release: Release | None) -> dict[str, str]:
    return dict(release.provides) if release else {}


def check_compatible(
    header: ArtifactHeader, device_type: str, running: Release | None, allow_downgrade: bool
) -> None:
    """Raise Incompatible (or Downgrade) unless `header` fits this device."""
    info = header.header_info
    if device_type not in info.compatible_devices:
        raise Incompatible(
            f"artifact {info.artifact_name} is for {', '.join(info.compatible_devices)}; "
            f"this device is {device_type}"
        )
    provides = current_provides(running)
    name = running.artifact if running else None
    if info.depends_artifact_names and name not in info.depends_artifact_names:
        raise Incompatible(
            f"artifact {info.artifact_name} installs only over "
            f"{', '.join(info.depends_artifact_names)}; "
            f"this device runs {name or 'an unknown release'}"
        )
    group = provides.get("artifact_group")
    if info.depends_groups and group not in info.depends_groups:
        raise Incompatible(
            f"artifact {info.artifact_name} is for groups {', '.join(info.depends_groups)}; "
            f"this device is in {group or 'no group'}"
        )
    for payload in header.payloads:
        for key, wanted in payload.type_info.depends.items():
            have = provides.get(key)
            allowed = (wanted,) if isinstance(wanted, str) else wanted
            if have not in allowed:
                raise Incompatible(
                    f"artifact {info.artifact_name} depends on {key} being "
                    f"{' or '.join(allowed)}; this device has {have!r}"
                )
        if not allow_downgrade and payload.type is not None:
            current = provides.get(software_version_key(payload.type))
            if current is None and payload.type == ROOTFS_IMAGE and running is not None:
                current = running.version
            _check_version(info.artifact_name, payload.software_version, current)


def _check_version(name: str, candidate: str | None, current: str | None) -> None:
    if current is None:
        return
    if candidate is None:
        raise Downgrade(
            f"artifact {name} declares no software version, so it cannot be shown not to be "
            f"older than the running {current}; allow downgrades to install it"
        )
    if not is_valid_version(candidate) or not is_valid_version(current):
        raise Downgrade(
            f"versions {candidate!r} and {current!r} cannot be ordered; "
            "allow downgrades to install anyway"
        )
    if is_downgrade(current, candidate):
        raise Downgrade(
            f"artifact {name} has version {candidate}, older than the running {current}"
        )
