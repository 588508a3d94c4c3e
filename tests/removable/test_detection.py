"""Which block devices are media, which files are artifacts, and the [removable] settings.

The sysfs trees here are laid out as the kernel lays out a USB stick, a card reader, a
SATA disk and a loop device, with `subsystem` links where the kernel puts them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otad.config import Action, RemovableConfig, parse_removable
from otad.devices import SystemPaths
from otad.errors import ConfigError, DeviceError
from otad.removable import (
    AmbiguousArtifacts,
    Medium,
    MediumTracker,
    NoArtifact,
    UnsafeEntry,
    _private_directory,
    find_artifact,
    is_artifact_name,
    is_removable,
    open_artifact,
)

USB_DISK = "devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
CARD_READER = "devices/platform/fe320000.mmc/mmc_host/mmc1/mmc1:aaaa/block/mmcblk1"
SATA_DISK = "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block/sda"
LOOP = "devices/virtual/block/loop3"


def _write(directory: Path, **attributes: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in attributes.items():
        (directory / name).write_text(value + "\n")


def _link_subsystem(device: Path, sys: Path, bus: str) -> None:
    (sys / "bus" / bus).mkdir(parents=True, exist_ok=True)
    (device / "subsystem").symlink_to(os.path.relpath(sys / "bus" / bus, device))


def _disk(sys: Path, devpath: str, dev: str, *, removable: str = "0", seq: str = "7") -> Path:
    disk = sys / devpath
    name = disk.name
    _write(disk, size="62333952", removable=removable, dev=dev)
    _write(disk, uevent=f"MAJOR={dev.split(':')[0]}\nDEVNAME={name}\nDEVTYPE=disk\nDISKSEQ={seq}")
    (disk / "holders").mkdir()
    return disk


def _partition(disk: Path, number: int, dev: str) -> Path:
    part = disk / f"{disk.name}{number}"
    _write(part, partition=str(number), size="2048", dev=dev)
    _write(part, uevent=f"DEVNAME={part.name}\nDEVTYPE=partition")
    (part / "holders").mkdir()
    return part


@pytest.fixture
def paths(tmp_path: Path) -> SystemPaths:
    """A machine with a USB stick (2 partitions), a card reader, a SATA disk and a loop."""
    sys = tmp_path / "sys"
    usb = _disk(sys, USB_DISK, "8:16")
    _partition(usb, 10, "8:26")
    _partition(usb, 1, "8:17")
    for device in (
        "devices/pci0000:00/0000:00:14.0/usb1",
        "devices/pci0000:00/0000:00:14.0/usb1/1-2",
    ):
        _link_subsystem(sys / device, sys, "usb")
    _link_subsystem(sys / "devices/pci0000:00/0000:00:14.0", sys, "pci")
    _disk(sys, CARD_READER, "179:32", removable="1")
    _disk(sys, SATA_DISK, "8:0")
    _link_subsystem(sys / "devices/pci0000:00/0000:00:17.0", sys, "pci")
    _disk(sys, LOOP, "7:3")
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n"
    )
    return SystemPaths(dev=tmp_path / "dev", sys=sys, proc=tmp_path / "proc")


@pytest.mark.parametrize(
    ("devpath", "properties", "expected"),
    [
        (USB_DISK, {}, True),  # removable=0, but below a USB device
        (CARD_READER, {}, True),  # removable=1
        (SATA_DISK, {}, False),
        (LOOP, {}, False),
        (SATA_DISK, {"ID_BUS": "usb"}, True),  # what udev found wins
        (SATA_DISK, {"ID_BUS": "ata"}, False),
    ],
)
def test_removable_storage_is_recognized(
    paths: SystemPaths, devpath: str, properties: dict[str, str], expected: bool
) -> None:
    assert is_removable(paths.sys / devpath, properties) is expected


def _event(devpath: str, devtype: str = "disk", seq: str = "7", **more: str) -> dict[str, str]:
    return {
        "SUBSYSTEM": "block",
        "DEVPATH": "/" + devpath,
        "DEVTYPE": devtype,
        "DISKSEQ": seq,
        **more,
    }


def test_a_new_stick_is_a_medium_once(paths: SystemPaths) -> None:
    tracker = MediumTracker(paths=paths)

    medium = tracker.consider("add", _event(USB_DISK))

    assert medium == Medium("sdb", paths.sys / USB_DISK, paths.dev / "sdb", "7")
    assert tracker.consider("add", _event(f"{USB_DISK}/sdb1", "partition")) is None
    assert tracker.consider("change", _event(USB_DISK)) is None


def test_a_partition_event_names_its_disk(paths: SystemPaths) -> None:
    medium = MediumTracker(paths=paths).consider("add", _event(f"{USB_DISK}/sdb1", "partition"))

    assert medium is not None
    assert medium.name == "sdb"


def test_new_media_in_the_same_drive_are_media_again(paths: SystemPaths) -> None:
    tracker = MediumTracker(paths=paths)
    assert tracker.consider("add", _event(CARD_READER)) is not None

    assert tracker.consider("change", _event(CARD_READER, seq="8")) is not None  # card swapped
    assert tracker.consider("remove", _event(CARD_READER, seq="8")) is None
    assert tracker.consider("add", _event(CARD_READER, seq="8")) is not None  # same, re-added


def test_an_empty_drive_is_not_a_medium(paths: SystemPaths) -> None:
    (paths.sys / CARD_READER / "size").write_text("0\n")

    assert MediumTracker(paths=paths).consider("change", _event(CARD_READER)) is None


@pytest.mark.parametrize(
    ("action", "properties"),
    [
        ("add", _event(SATA_DISK)),
        ("add", _event(LOOP)),
        ("bind", _event(USB_DISK)),
        ("add", {**_event(USB_DISK), "SUBSYSTEM": "scsi"}),
        ("add", {"SUBSYSTEM": "block"}),
    ],
)
def test_other_events_are_not_media(
    paths: SystemPaths, action: str, properties: dict[str, str]
) -> None:
    assert MediumTracker(paths=paths).consider(action, properties) is None


def test_a_disk_in_use_is_not_a_medium(paths: SystemPaths) -> None:
    """The SD card the system runs from reports removable=1: its mounts keep it out."""
    with (paths.proc / "self" / "mountinfo").open("a") as out:
        out.write("30 22 179:33 / /boot rw - vfat /dev/mmcblk1p1 rw\n")
    _partition(paths.sys / CARD_READER, 1, "179:33")
    (paths.sys / USB_DISK / "sdb1" / "holders" / "dm-0").touch()
    tracker = MediumTracker(paths=paths)

    assert tracker.consider("add", _event(CARD_READER)) is None
    assert tracker.consider("add", _event(USB_DISK)) is None


def test_the_predicate_is_the_callers(paths: SystemPaths) -> None:
    tracker = MediumTracker(lambda disk, properties: disk.name == "loop3", paths)

    assert tracker.consider("add", _event(USB_DISK)) is None
    assert tracker.consider("change", _event(LOOP)) is not None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("update.mender", True),
        ("Release 2.MENDER", True),
        ("._update.mender", False),  # macOS companion file on FAT
        (".mender", False),
        ("update.mender.sig", False),
        ("update.tar", False),
    ],
)
def test_artifact_names(name: str, expected: bool) -> None:
    assert is_artifact_name(name) is expected


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def test_exactly_one_artifact_is_found(tmp_path: Path, root_fd: int) -> None:
    with pytest.raises(NoArtifact, match="no \\*.mender file at the top of sdb1"):
        find_artifact(root_fd, "sdb", "sdb1")
    (tmp_path / "b.mender").write_bytes(b"x")
    assert find_artifact(root_fd, "sdb", "sdb1") == "b.mender"
    (tmp_path / "a.mender").write_bytes(b"x")
    with pytest.raises(AmbiguousArtifacts) as raised:
        find_artifact(root_fd, "sdb", "sdb1")
    assert raised.value.names == ("a.mender", "b.mender")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda path: path.symlink_to("/etc/hostname"), "symbolic link"),
        (lambda path: path.symlink_to("inside.bin"), "symbolic link"),
        (lambda path: os.mkfifo(path), "not a regular file"),
        (lambda path: path.mkdir(), "not a regular file"),
    ],
)
def test_only_regular_files_are_opened(
    tmp_path: Path, root_fd: int, make: Callable[[Path], object], words: str
) -> None:
    (tmp_path / "inside.bin").write_bytes(b"x")
    make(tmp_path / "u.mender")

    with pytest.raises(UnsafeEntry, match=words), open_artifact(root_fd, "u.mender", "sdb", "sdb1"):
        pass


def test_mount_directories_are_private(tmp_path: Path) -> None:
    target = tmp_path / "media" / "sdb1"
    (tmp_path / "media").mkdir(mode=0o755)

    _private_directory(target)

    for directory in (target, target.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_mount_directories_are_never_links(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "media").symlink_to(tmp_path / "elsewhere")

    with pytest.raises(DeviceError, match="not a directory owned by otad"):
        _private_directory(tmp_path / "media" / "sdb1")
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({}, RemovableConfig(enabled=False, action=Action.ANNOUNCE)),
        ({"enabled": True, "action": "install"}, RemovableConfig(True, Action.INSTALL)),
        ({"enabled": True}, RemovableConfig(True, Action.ANNOUNCE)),
    ],
)
def test_settings(table: dict[str, object], expected: RemovableConfig) -> None:
    assert parse_removable(table) == expected


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"enabled": "yes"}, "removable.enabled"),
        ({"action": "run"}, "removable.action"),
        ({"mount_options": "exec"}, "removable.mount_options"),
    ],
)
def test_bad_settings_name_their_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_removable(table)
    assert raised.value.key == key
