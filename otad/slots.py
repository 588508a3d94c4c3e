"""The two slots of a device: their partitions, sizes, and which one is running.

Which slot is booted is decided from every source the system offers, and they must
agree: the kernel's root= argument, the device that holds `/`, and what the bootloader
backend reports (for GRUB and U-Boot the otad.slot= argument they pass, for the
Raspberry Pi firmware its device-tree entries). A disagreement is an error: otad does
not guess which partition it may overwrite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from otad.bootloader.base import Slot
from otad.config import Config, DeviceRef
from otad.devices import SystemPaths, device_number, find_partition, kernel_arguments
from otad.errors import DeviceError


@dataclass(frozen=True)
class SlotDevice:
    slot: Slot
    ref: DeviceRef
    path: Path
    size: int


def device_size(path: Path) -> int:
    """Size in bytes of a block device (or of a regular file standing in for one)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(descriptor, 0, os.SEEK_END)
    finally:
        os.close(descriptor)


def resolve_slots(config: Config, paths: SystemPaths | None = None) -> dict[Slot, SlotDevice]:
    """Find both slots' root partitions; they must be two different devices."""
    devices = {}
    for slot, slot_config in config.slots.items():
        path = find_partition(slot_config.root, paths)
        devices[slot] = SlotDevice(slot, slot_config.root, path, device_size(path))
    if device_number(devices[Slot.A].path) == device_number(devices[Slot.B].path):
        raise DeviceError(f"slots a and b are the same device {devices[Slot.A].path}")
    return devices


def _slot_of_root_argument(root: str, devices: dict[Slot, SlotDevice]) -> Slot | None:
    for device in devices.values():
        if root.lower() == str(device.ref).lower() or root == str(device.path):
            return device.slot
    return None


def booted_slot(
    devices: dict[Slot, SlotDevice],
    bootloader_says: Slot | None,
    paths: SystemPaths | None = None,
    root: Path = Path("/"),
) -> Slot:
    """The running slot, from every source available; DeviceError if they disagree."""
    evidence: dict[str, Slot] = {}
    root_argument = kernel_arguments(paths).get("root")
    if root_argument:
        slot = _slot_of_root_argument(root_argument, devices)
        if slot is None:
            raise DeviceError(f"the kernel's root={root_argument} is neither slot a nor slot b")
        evidence[f"root={root_argument}"] = slot
    mounted = os.stat(root).st_dev
    for device in devices.values():
        if device_number(device.path) == mounted:
            evidence[f"{root} on {device.path}"] = device.slot
    if bootloader_says is not None:
        evidence["the bootloader"] = bootloader_says
    if not evidence:
        raise DeviceError("cannot tell which slot is booted: no root=, / on neither slot")
    found = set(evidence.values())
    if len(found) > 1:
        details = ", ".join(f"{source} says {slot.value}" for source, slot in evidence.items())
        raise DeviceError(f"sources disagree on the booted slot: {details}")
    return found.pop()
