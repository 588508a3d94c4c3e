"""The release version order used for downgrade protection (Debian's version order)."""

from __future__ import annotations

import itertools
import subprocess

import pytest

from otad.artifact.headers import TypeInfo
from otad.artifact.release import (
    compare_versions,
    is_downgrade,
    is_valid_version,
    software_version,
    sort_key,
)
from otad.errors import UsageError
from tests.conftest import require_tool

ORDERED = [
    "0.9",
    "1.0~rc1",
    "1.0",
    "1.0-1",
    "1.0+fix1",
    "1.9",
    "1.10",
    "2024.06",
    "release-9",
    "release-10",
    "1:0.1",
]


def test_documented_order() -> None:
    shuffled = ORDERED[::2] + ORDERED[1::2]

    assert sorted(shuffled, key=sort_key) == ORDERED


@pytest.mark.parametrize(("left", "right"), list(itertools.pairwise(ORDERED)))
def test_order_agrees_with_dpkg(left: str, right: str) -> None:
    dpkg = require_tool("dpkg")
    agrees = subprocess.run([dpkg, "--compare-versions", left, "lt", right], check=False)

    assert agrees.returncode == 0
    assert compare_versions(left, right) < 0
    assert is_downgrade(right, left)
    assert not is_downgrade(left, right)


def test_equal_versions_are_not_a_downgrade() -> None:
    assert compare_versions("1.0", "1.0") == 0
    assert not is_downgrade("1.0", "1.0")


@pytest.mark.parametrize("text", ["", "release 1", "v1_2", "1.0/2", "über"])
def test_invalid_versions(text: str) -> None:
    assert not is_valid_version(text)
    with pytest.raises(UsageError, match="cannot be ordered"):
        compare_versions(text, "1.0")


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (TypeInfo("rootfs-image", {"rootfs-image.version": "2.0"}), "2.0"),
        (TypeInfo("single-file", {"rootfs-image.single-file.version": "3"}), "3"),
        (TypeInfo("single-file", {"rootfs-image.version": "3"}), None),
        (TypeInfo(None, {"rootfs-image.version": "3"}), None),
    ],
)
def test_software_version_key(info: TypeInfo, expected: str | None) -> None:
    assert software_version(info) == expected
