"""Boards with a boot partition per slot (Raspberry Pi): the engine fills the target
slot's boot partition from the new root filesystem's /boot/firmware, or fails the
install before any trial is requested."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.bootloader.base import Slot
from otad.bootloader.file import FileBootloader
from otad.devices import probe
from otad.errors import BootSyncError
from otad.state import Phase, Release, SlotStatus, StateStore, initial_state
from tests.conftest import KeyPair
from tests.engine.conftest import Device, Disk, FakeKernel, attached_disk

LAYOUT = (
    "label: gpt\n"
    "size=8M, name=boot-a\nsize=8M, name=boot-b\n"
    "size=16M, name=root-a\nsize=16M, name=root-b\nname=data\n"
)


@pytest.fixture
def pi_disk(tmp_path: Path) -> Iterator[Disk]:
    tools = ("mkfs.ext4", "mkfs.vfat", "mcopy", "debugfs")
    with attached_disk(tmp_path / "pi.img", LAYOUT, tools) as loop:
        names = {"boot-a": 1, "boot-b": 2, "a": 3, "b": 4, "data": 5}
        partitions = {key: Path(f"{loop}p{number}") for key, number in names.items()}
        for key in ("boot-a", "boot-b"):
            subprocess.run(["mkfs.vfat", "-n", key.upper(), str(partitions[key])],
                           capture_output=True, check=True)  # fmt: skip
        uuids = {key: probe(path)["PART_ENTRY_UUID"] for key, path in partitions.items()}
        yield Disk(tmp_path / "pi.img", loop, partitions, uuids)


@pytest.fixture
def pi(pi_disk: Disk, kernel: FakeKernel, tmp_path: Path, keys: dict[str, KeyPair]) -> Device:
    config = f"""
device_type = "raspberrypi4"
data_dir = "{tmp_path}/data"
trusted_keys = ["{keys["ecdsa"].public}"]
[bootloader]
backend = "file"
[slots.a]
root = "PARTUUID={pi_disk.partuuids["a"]}"
boot = "PARTUUID={pi_disk.partuuids["boot-a"]}"
[slots.b]
root = "PARTUUID={pi_disk.partuuids["b"]}"
boot = "PARTUUID={pi_disk.partuuids["boot-b"]}"
"""
    bootloader = FileBootloader(tmp_path / "bootloader.json")
    bootloader.initialize(Slot.A)
    kernel.boot_slot(pi_disk.partuuids["a"])
    store = StateStore(tmp_path / "data")
    store.save(initial_state(Slot.A, Release("pi-1", "1.0")))
    return Device(pi_disk, kernel, bootloader, config, keys["ecdsa"].verifier, store)


def _rootfs_artifact(tmp_path: Path, keys: dict[str, KeyPair], firmware: bool) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('PRETTY_NAME="pi 2.0"\n')
    if firmware:
        boot = tree / "boot" / "firmware"
        (boot / "overlays").mkdir(parents=True)
        (boot / "config.txt").write_text("arm_64bit=1\n")
        (boot / "cmdline.txt").write_text("console=tty1 root=PARTUUID=0badf00d-02 rootwait\n")
        (boot / "kernel8.img").write_bytes(os.urandom(300_000))
        (boot / "overlays" / "vc4-kms-v3d.dtbo").write_bytes(os.urandom(2000))
    image = tmp_path / "rootfs.ext4"
    with image.open("wb") as out:
        out.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    spec = ArtifactSpec(
        name="pi-2",
        device_types=("raspberrypi4",),
        payload=rootfs_image(image, software_version="2.0"),
        compression=Compression.ZSTD,
        signer=keys["ecdsa"].signer,
    )
    return write_artifact(spec, tmp_path / "pi-2.mender").path


def _fat_file(device: Path, name: str) -> bytes:
    result = subprocess.run(["mtype", "-i", str(device), f"::{name}"], capture_output=True,
                            check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    return result.stdout


def test_install_fills_the_target_boot_partition(
    pi: Device, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    boot_a_before = pi.disk.partitions["boot-a"].read_bytes()

    pi.install(_rootfs_artifact(tmp_path, keys, firmware=True))

    boot_b = pi.disk.partitions["boot-b"]
    cmdline = _fat_file(boot_b, "cmdline.txt").decode()
    assert f"root=PARTUUID={pi.disk.partuuids['b']}" in cmdline
    assert "console=tty1" in cmdline
    assert _fat_file(boot_b, "config.txt") == b"arm_64bit=1\n"
    assert pi.disk.partitions["boot-a"].read_bytes() == boot_a_before
    assert pi.bootloader.status().next_boot is Slot.B


def test_image_without_boot_files_fails_before_any_trial(
    pi: Device, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    with pytest.raises(BootSyncError, match="/boot/firmware"):
        pi.install(_rootfs_artifact(tmp_path, keys, firmware=False))

    state = pi.store.load()
    assert state is not None
    assert state.phase is Phase.IDLE
    assert state.slots[Slot.B].status is SlotStatus.EMPTY
    assert pi.bootloader.status().next_boot is Slot.A
