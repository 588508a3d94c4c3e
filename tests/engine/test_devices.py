"""Finding slots by PARTUUID and label on a real loop device, and telling the booted one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.config import DeviceRef, RefKind, parse_config
from otad.devices import check_unused, find_partition
from otad.errors import DeviceError
from otad.slots import booted_slot, resolve_slots
from tests.engine.conftest import SLOT_SIZE, Disk, FakeKernel


def _config(disk: Disk, tmp_path: Path) -> str:
    return f"""
device_type = "test"
data_dir = "{tmp_path}/data"
trusted_keys = ["{tmp_path}/key.pub"]
[bootloader]
backend = "file"
[slots.a]
root = "PARTUUID={disk.partuuids["a"]}"
[slots.b]
root = "PARTUUID={disk.partuuids["b"].upper()}"
"""


def test_find_by_partuuid_and_label(disk: Disk) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-L", "otad-test-b", str(disk.partitions["b"])], check=True)

    assert find_partition(DeviceRef(RefKind.PARTUUID, disk.partuuids["a"])) == disk.partitions["a"]
    assert find_partition(DeviceRef(RefKind.LABEL, "otad-test-b")) == disk.partitions["b"]
    with pytest.raises(DeviceError, match="no partition with LABEL=absent"):
        find_partition(DeviceRef(RefKind.LABEL, "absent"))


def test_resolve_slots_and_sizes(disk: Disk, tmp_path: Path) -> None:
    devices = resolve_slots(parse_config(_config(disk, tmp_path)))

    assert devices[Slot.A].path == disk.partitions["a"]
    assert devices[Slot.B].path == disk.partitions["b"]
    assert devices[Slot.A].size == SLOT_SIZE


@pytest.mark.parametrize(
    ("root", "bootloader", "expected"),
    [("a", None, Slot.A), ("b", Slot.B, Slot.B), ("a", Slot.A, Slot.A)],
)
def test_booted_slot_from_agreeing_sources(
    disk: Disk, tmp_path: Path, kernel: FakeKernel, root: str, bootloader: Slot | None,
    expected: Slot,
) -> None:  # fmt: skip
    devices = resolve_slots(parse_config(_config(disk, tmp_path)))
    kernel.boot_slot(disk.partuuids[root])

    assert booted_slot(devices, bootloader, kernel.paths) is expected


def test_disagreeing_sources_are_an_error(disk: Disk, tmp_path: Path, kernel: FakeKernel) -> None:
    devices = resolve_slots(parse_config(_config(disk, tmp_path)))
    kernel.boot_slot(disk.partuuids["a"])

    with pytest.raises(DeviceError, match="disagree.*says a.*says b"):
        booted_slot(devices, Slot.B, kernel.paths)
    kernel.boot_slot(disk.partuuids["data"])
    with pytest.raises(DeviceError, match="neither slot a nor slot b"):
        booted_slot(devices, None, kernel.paths)


def test_mounted_or_held_device_is_refused(disk: Disk, kernel: FakeKernel) -> None:
    check_unused(disk.partitions["b"], kernel.paths)
    kernel.mount(disk.partitions["b"])

    with pytest.raises(DeviceError, match="is mounted"):
        check_unused(disk.partitions["b"], kernel.paths)
    with pytest.raises(DeviceError, match="not a block device"):
        check_unused(disk.image, kernel.paths)


def test_exclusive_open_detects_another_holder(disk: Disk) -> None:
    from otad.slotwriter import SlotWriter

    holder = os.open(disk.partitions["b"], os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(DeviceError, match="in use"), SlotWriter(disk.partitions["b"]):
            pass
    finally:
        os.close(holder)
