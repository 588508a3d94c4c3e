"""Fixtures of the boot tests: the converted image (built once, cached) and booted guests.

Building the image the first time needs root (loop mounts, chroot), the Debian archive
(debootstrap, apt-get download) and a few minutes; later runs reuse the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.boot import harness
from tests.conftest import require_tool
from tests.convert.conftest import require_root_and_tools

TOOLS = ("qemu-system-x86_64", "qemu-img", "debugfs", "e2fsck", "tune2fs", "resize2fs")


def require_file(path: Path, package: str) -> None:
    """Like require_tool, for a file a package installs."""
    if path.is_file():
        return
    message = f"{path} is missing (package {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, but CI must provide it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def converted() -> harness.Converted:
    require_root_and_tools()
    for tool in TOOLS:
        require_tool(tool)
    require_file(harness.OVMF_CODE, "ovmf")
    require_file(harness.OVMF_VARS, "ovmf")
    return harness.converted_image()


GuestFactory = Callable[..., harness.Guest]

KEPT_SUFFIXES = (".log", ".txt", ".json")  # what a boot test leaves for diagnosis


@pytest.fixture(autouse=True)
def drop_disks(tmp_path: Path) -> Iterator[None]:
    """After each boot test, delete its disks (overlays, media, releases: gigabytes a
    test; pytest keeps the last three runs' directories) and keep its logs."""
    yield
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix not in KEPT_SUFFIXES and path.stat().st_size > 1 << 20:
            path.unlink()


@pytest.fixture
def boot(converted: harness.Converted, tmp_path: Path) -> Iterator[GuestFactory]:
    """Starts a guest from an overlay of the converted image (at most one per test)."""
    started: list[harness.Guest] = []

    def start(
        media: Path | None = None, firmware: str = "uefi", usb: bool = False
    ) -> harness.Guest:
        machine = tmp_path / "machine"
        machine.mkdir()
        guest = harness.Guest(converted.image, machine, media, firmware, usb=usb)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.close()
