"""Real block devices for the engine tests: a sparse disk image on a loop device.

A "device" (the `device` fixture) is such a disk with two slots, the file-backed
bootloader and a fake /proc; `Device.reboot()` lets the bootloader pick the slot as
firmware would, points the kernel command line at it and starts the engine again, as
the daemon does at boot.


The image has a GPT with two root slots and a data partition, exactly as a converted
device has; partition nodes come from `partx -a` because this kernel does not scan
partition tables of loop devices itself. The kernel's views that tell which slot is
booted (/proc/cmdline, the boot ID) are a prepared directory, so a test can "reboot".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.signing import Signer, Verifier
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.bootloader.base import Slot
from otad.bootloader.file import FileBootloader
from otad.config import parse_config
from otad.devices import SystemPaths, probe
from otad.engine import Engine
from otad.state import Release, StateStore, initial_state
from tests.artifact.conftest import make_payload
from tests.conftest import KeyPair, require_tool

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
    with attached_disk(tmp_path / "disk.img", LAYOUT, ("blkid", "mkfs.ext4")) as loop:
        names = {"a": Path(f"{loop}p1"), "b": Path(f"{loop}p2"), "data": Path(f"{loop}p3")}
        uuids = {key: probe(path)["PART_ENTRY_UUID"] for key, path in names.items()}
        yield Disk(tmp_path / "disk.img", loop, names, uuids)


LAYOUT = "label: gpt\nsize=24M, name=root-a\nsize=24M, name=root-b\nname=data\n"


@contextlib.contextmanager
def attached_disk(
    image: Path, layout: str, tools: tuple[str, ...] = (), size: int = 64 << 20
) -> Iterator[Path]:
    """A sparse disk image partitioned by the sfdisk script `layout`, on a loop device
    whose partition nodes exist; detached on every path. Skips unless root."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    for tool in ("losetup", "partx", "sfdisk", *tools):
        require_tool(tool)
    with image.open("wb") as out:
        out.truncate(size)
    subprocess.run(["sfdisk", "-q", str(image)], input=layout, text=True, check=True)
    loop = Path(_sh("losetup", "--find", "--show", image))
    try:
        _sh("partx", "-u", loop)
        yield loop
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
        (self.root / "uptime").write_text("0.00 0.00\n")

    def mount(self, device: Path) -> None:
        number = os.stat(device).st_rdev
        line = f"999 1 {os.major(number)}:{os.minor(number)} / /mnt rw - ext4 {device} rw\n"
        with (self.root / "self" / "mountinfo").open("a") as out:
            out.write(line)


@pytest.fixture
def kernel(tmp_path: Path) -> FakeKernel:
    return FakeKernel(tmp_path / "proc")


IMAGE_SIZE = 3 << 20


@dataclass
class Device:
    disk: Disk
    kernel: FakeKernel
    bootloader: FileBootloader
    config_text: str
    verifier: Verifier
    store: StateStore

    def engine(self) -> Engine:
        return Engine(
            parse_config(self.config_text),
            self.bootloader,
            paths=self.kernel.paths,
            store=self.store,
            verifiers=(self.verifier,),
        )

    def slot_digest(self, slot: Slot) -> str:
        return hashlib.sha256(self.disk.partitions[slot.value].read_bytes()).hexdigest()

    def reboot(self) -> Engine:
        booted = self.bootloader.simulate_boot()
        self.kernel.boot_slot(self.disk.partuuids[booted.value])
        self.kernel.reboot()
        engine = self.engine()
        engine.recover()
        return engine

    def install(self, artifact: Path, **options: bool) -> None:
        with artifact.open("rb") as stream:
            self.engine().install(stream, **options)  # type: ignore[arg-type]


@pytest.fixture
def device(disk: Disk, kernel: FakeKernel, tmp_path: Path, keys: dict[str, KeyPair]) -> Device:
    config = f"""
device_type = "otad-test"
data_dir = "{tmp_path}/data"
trusted_keys = ["{keys["ecdsa"].public}"]
[bootloader]
backend = "file"
[slots.a]
root = "PARTUUID={disk.partuuids["a"]}"
[slots.b]
root = "PARTUUID={disk.partuuids["b"]}"
"""
    with disk.partitions["a"].open("r+b") as slot_a:
        slot_a.write(make_payload(tmp_path / "release-1.img", IMAGE_SIZE, seed=1).read_bytes())
    bootloader = FileBootloader(tmp_path / "bootloader.json")
    bootloader.initialize(Slot.A)
    kernel.boot_slot(disk.partuuids["a"])
    store = StateStore(tmp_path / "data")
    store.save(initial_state(Slot.A, Release("release-1", "1.0", {"artifact_name": "release-1"})))
    return Device(disk, kernel, bootloader, config, keys["ecdsa"].verifier, store)


@pytest.fixture(scope="session")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]
) -> dict[str, Path]:
    """Signed rootfs artifacts: release-2 and -3, an old one, one for another device..."""
    tmp_path = tmp_path_factory.mktemp("artifacts")

    def make(name: str, version: str, seed: int, signer: Signer | None = None,
             device_type: str = "otad-test", size: int = IMAGE_SIZE) -> Path:  # fmt: skip
        image = make_payload(tmp_path / f"{name}.img", size, seed=seed)
        spec = ArtifactSpec(
            name=name,
            device_types=(device_type,),
            payload=rootfs_image(image, software_version=version, chunk_size=256 * 1024),
            compression=Compression.ZSTD,
            signer=signer,
        )
        return write_artifact(spec, tmp_path / f"{name}.mender").path

    good = keys["ecdsa"].signer
    made = {
        "release-2": make("release-2", "2.0", 2, good),
        "release-3": make("release-3", "3.0", 3, good),
        "release-0": make("release-0", "0.9", 4, good),
        "other-device": make("other-device", "2.0", 5, good, device_type="rpi4"),
        "unsigned": make("unsigned", "2.0", 6),
        "foreign": make("foreign", "2.0", 7, keys["other"].signer),
        "too-big": make("too-big", "2.0", 8, good, size=SLOT_SIZE + 4096),
    }
    tampered = tmp_path / "tampered.mender"
    data = bytearray(made["release-2"].read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    made["tampered"] = tampered
    return made
