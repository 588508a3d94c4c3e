"""Finding partitions by stable names, and knowing which devices are in use.

Devices are named by PARTUUID or filesystem label. Where udev runs, /dev/disk/by-* has
the answer; where it does not (containers, minimal kernels, the first boot of an image)
every partition in /sys/class/block is probed with `blkid -p`, which reads the partition
table and superblock itself.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from otad.config import DeviceRef, RefKind
from otad.errors import DeviceError
from otad.process import run

log = logging.getLogger(__name__)

_BY_DIRECTORY = {RefKind.PARTUUID: "by-partuuid", RefKind.LABEL: "by-label"}
_PROBE_KEY = {RefKind.PARTUUID: "PART_ENTRY_UUID", RefKind.LABEL: "LABEL"}


@dataclass(frozen=True)
class SystemPaths:
    """Where the kernel's views live; tests point them at prepared directories."""

    dev: Path = Path("/dev")
    sys: Path = Path("/sys")
    proc: Path = Path("/proc")


def probe(device: Path) -> dict[str, str]:
    """Low-level probe of a partition: its PART_ENTRY_* and filesystem fields."""
    result = run(["blkid", "-p", "-o", "export", device], check=False)
    if result.returncode == 2:  # blkid found nothing it recognizes
        return {}
    if result.returncode != 0:
        raise DeviceError(f"cannot probe {device}: {result.stderr.decode(errors='replace')}")
    fields = {}
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


def find_partition(ref: DeviceRef, paths: SystemPaths | None = None) -> Path:
    """The device node of the partition `ref` names; DeviceError if not exactly one."""
    paths = paths or SystemPaths()
    linked = paths.dev / "disk" / _BY_DIRECTORY[ref.kind] / ref.value
    if linked.exists():
        return linked.resolve()
    matches = []
    for entry in sorted((paths.sys / "class" / "block").iterdir()):
        node = paths.dev / entry.name
        if not node.exists() or not _is_candidate(entry, ref):
            continue
        value = probe(node).get(_PROBE_KEY[ref.kind], "")
        if (value.lower() if ref.kind is RefKind.PARTUUID else value) == ref.value:
            matches.append(node)
    if not matches:
        raise DeviceError(f"no partition with {ref} found")
    if len(matches) > 1:
        names = ", ".join(str(match) for match in matches)
        raise DeviceError(f"{ref} is ambiguous: {names} all match")
    log.debug("%s is %s", ref, matches[0])
    return matches[0]


def _is_candidate(entry: Path, ref: DeviceRef) -> bool:
    if ref.kind is RefKind.PARTUUID:
        return (entry / "partition").exists()
    return (entry / "size").exists() and (entry / "size").read_text().strip() != "0"


def device_number(path: Path) -> int:
    """st_rdev of a block device, st_dev of anything else (a regular file stands in)."""
    info = os.stat(path)
    return info.st_rdev if stat.S_ISBLK(info.st_mode) else info.st_dev


def mounted_device_numbers(paths: SystemPaths | None = None) -> set[int]:
    """Device numbers of every mounted filesystem, from /proc/self/mountinfo."""
    paths = paths or SystemPaths()
    numbers = set()
    for line in (paths.proc / "self" / "mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and ":" in fields[2]:
            major, minor = fields[2].split(":")
            numbers.add(os.makedev(int(major), int(minor)))
    return numbers


def holders(device: Path, paths: SystemPaths | None = None) -> list[str]:
    """Names of devices stacked on `device` (device-mapper, md, ...)."""
    paths = paths or SystemPaths()
    directory = paths.sys / "class" / "block" / device.resolve().name / "holders"
    return sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []


def check_unused(device: Path, paths: SystemPaths | None = None) -> None:
    """Raise DeviceError if `device` is mounted or held by another device."""
    if not stat.S_ISBLK(os.stat(device).st_mode):
        raise DeviceError(f"{device} is not a block device")
    if os.stat(device).st_rdev in mounted_device_numbers(paths):
        raise DeviceError(f"{device} is mounted; otad never writes to a mounted device")
    stacked = holders(device, paths)
    if stacked:
        raise DeviceError(f"{device} is in use by {', '.join(stacked)}")


def kernel_arguments(paths: SystemPaths | None = None) -> dict[str, str]:
    """The kernel command line as key=value pairs (flags map to '')."""
    paths = paths or SystemPaths()
    arguments = {}
    for word in (paths.proc / "cmdline").read_text().split():
        key, _, value = word.partition("=")
        arguments[key] = value
    return arguments
