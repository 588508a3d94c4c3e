"""Real block devices for the engine tests: a sparse disk image on a loop device.

The image has a GPT with two root slots and a data partition, exactly as a converted
device has; partition nodes come from `partx -a` because this kernel does not scan
partition tables of loop devices itself. The kernel's views that tell which slot is
booted (/proc/cmdline, the boot ID) are a prepared directory, so a test can "reboot".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.devices import SystemPaths, probe
from tests.artifact.conftest import keys  # noqa: F401  (the key pairs fixture, shared)
from tests.conftest import require_tool

SLOT_SIZE = 24 << 20


@dataclass(frozen=True)
class Disk:
    image: Path
    loop: Path
    partitions: dict[str, Path]
    partuuids: dict[str, str]


def _sh(*argv: str | Path) -> str:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 64 MiB disk: root-a, root-b (24 MiB each), data; attached to a loop device."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    for tool in ("losetup", "partx", "sfdisk", "blkid", "mkfs.ext4"):
        require_tool(tool)
    image = tmp_path / "disk.img"
    with image.open("wb") as out:
        out.truncate(64 << 20)
    layout = "label: gpt\nsize=24M, name=root-a\nsize=24M, name=root-b\nname=data\n"
    subprocess.run(["sfdisk", "-q", str(image)], input=layout, text=True, check=True)
    loop = Path(_sh("losetup", "--find", "--show", image))
    try:
        _sh("partx", "-u", loop)
        names = {"a": Path(f"{loop}p1"), "b": Path(f"{loop}p2"), "data": Path(f"{loop}p3")}
        uuids = {key: probe(path)["PART_ENTRY_UUID"] for key, path in names.items()}
        yield Disk(image, loop, names, uuids)
    finally:
        subprocess.run(["partx", "-d", str(loop)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", str(loop)], capture_output=True, check=False)


class FakeKernel:
    """A /proc stand-in: the kernel command line, mounts and the boot ID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "self").mkdir(parents=True)
        (root / "sys" / "kernel" / "random").mkdir(parents=True)
        shutil.copy("/proc/self/mountinfo", root / "self" / "mountinfo")
        self.paths = SystemPaths(proc=root)
        self.reboot()

    def boot_slot(self, partuuid: str) -> None:
        (self.root / "cmdline").write_text(f"console=ttyS0 root=PARTUUID={partuuid} ro quiet\n")

    def reboot(self) -> None:
        (self.root / "sys" / "kernel" / "random" / "boot_id").write_text(f"{uuid.uuid4()}\n")

    def mount(self, device: Path) -> None:
        number = os.stat(device).st_rdev
        line = f"999 1 {os.major(number)}:{os.minor(number)} / /mnt rw - ext4 {device} rw\n"
        with (self.root / "self" / "mountinfo").open("a") as out:
            out.write(line)


@pytest.fixture
def kernel(tmp_path: Path) -> FakeKernel:
    return FakeKernel(tmp_path / "proc")


SLOTS = {Slot.A: "a", Slot.B: "b"}
