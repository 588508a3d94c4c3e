"""Release versions and their order, the basis of downgrade protection.

An artifact's version is its software version provide, the key Mender tools already
write into the signed type-info:

    rootfs-image payloads   rootfs-image.version
    other payload types     rootfs-image.<type>.version

(otad-artifact and mender-artifact default it to the artifact name.) Versions are
ordered exactly as Debian orders package versions (dpkg --compare-versions):
`[epoch:]upstream[-revision]`, compared part by part, digits as numbers and letters by
ASCII with `~` sorting before everything, even the end of the string. So
1.9 < 1.10, 2.0~rc1 < 2.0 < 2.0+fix1 < 1:0.1, and release-9 < release-10.
"""

from __future__ import annotations

import functools
import re

from debian.debian_support import Version, version_compare
from otad.artifact.headers import ROOTFS_IMAGE, TypeInfo
from otad.errors import UsageError

_VALID = re.compile(r"^([0-9]+:)?[A-Za-z0-9.+~-]+$")


def software_version_key(payload_type: str) -> str:
    """The type-info provide that holds a payload's software version."""
    if payload_type == ROOTFS_IMAGE:
        return f"{ROOTFS_IMAGE}.version"
    return f"{ROOTFS_IMAGE}.{payload_type}.version"


def software_version(type_info: TypeInfo) -> str | None:
    """The software version a payload provides, or None when it declares none."""
    if type_info.type is None:
        return None
    return type_info.provides.get(software_version_key(type_info.type))


def is_valid_version(text: str) -> bool:
    """True when `text` can be ordered (the characters Debian versions allow)."""
    if not _VALID.match(text):
        return False
    try:
        Version(text)
    except ValueError:
        return False
    return True


def check_version(text: str) -> str:
    """Return `text` if it is a valid version, otherwise raise UsageError."""
    if not is_valid_version(text):
        raise UsageError(
            f"version {text!r} cannot be ordered: use [epoch:]upstream[-revision] with "
            "letters, digits and . + ~ - (for example 1.4.2 or 2024.06-1)"
        )
    return text


def compare_versions(left: str, right: str) -> int:
    """Negative, zero or positive as `left` sorts before, equal to or after `right`."""
    return int(version_compare(check_version(left), check_version(right)))


def is_downgrade(current: str, candidate: str) -> bool:
    """True when installing `candidate` over `current` would go back in time."""
    return compare_versions(candidate, current) < 0


sort_key = functools.cmp_to_key(compare_versions)
