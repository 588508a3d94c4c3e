"""Syncing a slot's FAT boot partition from its ext4 root, on a real loop device.

The disk is laid out as a Raspberry Pi's: an MBR with a FAT boot partition and an ext4
root partition built with `mkfs.ext4 -d`. The tests read the FAT back with mtools on
their own, and every refusal checks that both partitions were left as they were.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import otad.bootsync
from otad.bootsync import sync_boot_partition
from otad.devices import probe
from otad.errors import BootSyncError, DeviceError, UsageError
from tests.engine.conftest import attached_disk

BOOT_SIZE = 8 << 20
ROOT_SIZE = 40 << 20
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
CMDLINE = (
    "console=serial0,115200 console=tty1 root=PARTUUID=0ddba11-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait\n"
)
KERNEL = random.Random(8).randbytes(300_000)
HOST_LINE = "otad-test-image\n"
FIRMWARE = "/boot/firmware"


@dataclass(frozen=True)
class PiDisk:
    """A loop-attached disk image: p1 the FAT boot partition, p2 the ext4 root."""

    loop: Path
    boot: Path
    root: Path
    fresh_free: int  # bytes free on the boot partition's FAT as mkfs.vfat made it

    def make_root(self, tree: Path) -> None:
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-N", "4096", "-d", str(tree), str(self.root)],
            check=True,
        )


def _sh(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=True, env=env
    )
    return result.stdout.strip()


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _free_bytes(device: Path) -> int:
    last = _sh("mdir", "-i", device, "::", env=MTOOLS).splitlines()[-1]
    return int(last.replace(" bytes free", "").replace(" ", ""))


def _read_fat(device: Path, into: Path) -> dict[str, bytes]:
    """Every file on the FAT `device`, by relative path, copied out with mtools."""
    subprocess.run(
        ["mcopy", "-s", "-n", "-i", str(device), "::/", str(into)],
        check=True, capture_output=True, env=MTOOLS,
    )  # fmt: skip
    return {
        path.relative_to(into).as_posix(): path.read_bytes()
        for path in sorted(into.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PiDisk]:
    """64 MiB, MBR: boot (FAT, label BOOTA, holding an old config.txt) and root."""
    layout = f"label: dos\nsize={BOOT_SIZE >> 10}KiB, type=c\nsize={ROOT_SIZE >> 10}KiB\n"
    tools = ("mkfs.ext4", "debugfs", "mkfs.vfat", "mcopy")
    with attached_disk(tmp_path / "disk.img", layout, tools) as loop:
        boot = Path(f"{loop}p1")
        _sh("mkfs.vfat", "-n", "BOOTA", boot)
        found = PiDisk(loop, boot, Path(f"{loop}p2"), _free_bytes(boot))
        old = tmp_path / "old-config.txt"
        old.write_text("# the release before\n")
        _sh("mcopy", "-i", found.boot, old, "::/config.txt", env=MTOOLS)
        yield found


def _firmware(tree: Path, cmdline: str = CMDLINE) -> dict[str, bytes]:
    """A Raspberry Pi OS root in `tree`; returns its boot files by relative path."""
    files = {
        "config.txt": b"arm_64bit=1\nkernel=kernel8.img\ndtoverlay=x\n",
        "cmdline.txt": cmdline.encode(),
        "kernel8.img": KERNEL,
        "overlays/x.dtbo": random.Random(1).randbytes(4_000),
        "bcm2711-rpi-4-b.dtb": random.Random(2).randbytes(50_000),
    }
    for name, data in files.items():
        path = tree / "boot" / "firmware" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc" / "hostname").write_text(HOST_LINE)
    return files


@pytest.mark.parametrize(
    ("cmdline", "cmdline_root", "expected"),
    [
        pytest.param(CMDLINE, None, CMDLINE, id="kept"),
        pytest.param(
            CMDLINE,
            "PARTUUID=5b1c9e63-03",
            CMDLINE.replace("root=PARTUUID=0ddba11-02", "root=PARTUUID=5b1c9e63-03"),
            id="rewritten",
        ),
        pytest.param(
            "root=/dev/mmcblk0p2 quiet  root=LABEL=x rootwait\n",
            "PARTUUID=5b1c9e63-03",
            "root=PARTUUID=5b1c9e63-03 quiet  root=PARTUUID=5b1c9e63-03 rootwait\n",
            id="every-root-word",
        ),
        pytest.param(
            "console=tty1 rootwait\n",
            "PARTUUID=5b1c9e63-03",
            "console=tty1 rootwait root=PARTUUID=5b1c9e63-03\n",
            id="appended",
        ),
    ],
)
def test_sync_copies_every_file(
    disk: PiDisk, tmp_path: Path, cmdline: str, cmdline_root: str | None, expected: str
) -> None:
    files = _firmware(tmp_path / "tree", cmdline)
    disk.make_root(tmp_path / "tree")
    root_before = _sha256(disk.root)
    volume_id = probe(disk.boot)["UUID"]

    report = sync_boot_partition(disk.root, disk.boot, label="BOOTB", cmdline_root=cmdline_root)

    back = _read_fat(disk.boot, tmp_path / "back")
    assert back == {**files, "cmdline.txt": expected.encode()}
    assert report.files == 5
    assert report.directories == 1
    assert report.bytes == sum(len(data) for data in back.values())
    assert report.cmdline_root == cmdline_root
    assert report.capacity == disk.fresh_free
    assert report.bytes <= report.needed <= report.capacity
    assert _free_bytes(disk.boot) >= report.capacity - report.needed
    fields = probe(disk.boot)
    assert (fields["TYPE"], fields["LABEL"], fields["UUID"]) == ("vfat", "BOOTB", volume_id)
    assert _sha256(disk.root) == root_before


def test_links_become_the_content_they_point_to(disk: PiDisk, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    files = _firmware(tree)
    (tree / "boot" / "vmlinuz-6.1").write_bytes(b"the real kernel")
    firmware = tree / "boot" / "firmware"
    (firmware / "kernel8.img").unlink()
    (firmware / "kernel8.img").symlink_to("../vmlinuz-6.1")
    (firmware / "alias.dtb").symlink_to("bcm2711-rpi-4-b.dtb")
    (firmware / "overlays" / "chain.dtbo").symlink_to("../alias.dtb")
    (firmware / "hostname").symlink_to("/etc/hostname")  # the image's, not the host's
    disk.make_root(tree)

    report = sync_boot_partition(disk.root, disk.boot)

    dtb = files["bcm2711-rpi-4-b.dtb"]
    assert _read_fat(disk.boot, tmp_path / "back") == {
        **files,
        "kernel8.img": b"the real kernel",
        "alias.dtb": dtb,
        "overlays/chain.dtbo": dtb,
        "hostname": HOST_LINE.encode(),
    }
    assert report.files == 8
    assert probe(disk.boot)["LABEL"] == "BOOTA"


def _missing(tree: Path) -> str:
    _firmware(tree)
    return "/boot/absent"


def _empty(tree: Path) -> str:
    (tree / "boot" / "firmware" / "overlays").mkdir(parents=True)
    return FIRMWARE


def _not_a_directory(tree: Path) -> str:
    _firmware(tree)
    return "/etc/hostname"


def _one_file_too_large(tree: Path) -> str:
    _firmware(tree)
    (tree / "boot" / "firmware" / "kernel8.img").write_bytes(os.urandom(BOOT_SIZE + 4096))
    return FIRMWARE


def _clusters_too_many(tree: Path) -> str:
    """2,500 files of 2,049 bytes: 5 MiB of data, but 10 MiB of 2 KiB clusters."""
    _firmware(tree)
    many = tree / "boot" / "firmware" / "many"
    many.mkdir()
    data = bytes(2049)
    for number in range(2500):
        (many / f"f{number:04}.bin").write_bytes(data)
    return FIRMWARE


def _dangling_link(tree: Path) -> str:
    _firmware(tree)
    (tree / "boot" / "firmware" / "start4.elf").symlink_to("/usr/lib/absent.elf")
    return FIRMWARE


def _link_to_directory(tree: Path) -> str:
    _firmware(tree)
    (tree / "boot" / "firmware" / "more").symlink_to("overlays")
    return FIRMWARE


def _names_differing_in_case(tree: Path) -> str:
    _firmware(tree)
    (tree / "boot" / "firmware" / "CONFIG.TXT").write_text("shadow\n")
    return FIRMWARE


def _name_fat_cannot_hold(tree: Path) -> str:
    _firmware(tree)
    (tree / "boot" / "firmware" / "a:b.txt").write_text("colon\n")
    return FIRMWARE


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (_missing, "/boot/absent in .* is no such directory"),
        (_empty, "/boot/firmware in .* holds no files"),
        (_not_a_directory, "/etc/hostname in .* is a file"),
        (_one_file_too_large, r"need \d+ bytes in clusters of 2048, .* would have 8\d{6}"),
        (_clusters_too_many, r"2505 files, 5\d{6} bytes\) need 1\d{7} bytes"),
        (_dangling_link, "symbolic link to /usr/lib/absent.elf, which is nothing"),
        (_link_to_directory, "/boot/firmware/overlays, which is a directory"),
        (_names_differing_in_case, "'CONFIG.TXT' and 'config.txt' differ only in case"),
        (_name_fat_cannot_hold, "'a:b.txt' cannot be stored on FAT"),
    ],
)
def test_refused_before_formatting(
    disk: PiDisk, tmp_path: Path, build: Callable[[Path], str], fragment: str
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    source_dir = build(tree)
    disk.make_root(tree)
    boot_before, root_before = _sha256(disk.boot), _sha256(disk.root)

    with pytest.raises(BootSyncError, match=fragment) as caught:
        sync_boot_partition(disk.root, disk.boot, source_dir=source_dir, cmdline_root="LABEL=r")

    assert caught.value.changed is False
    assert caught.value.device == str(disk.boot)
    assert "it was not changed" in str(caught.value)
    assert _sha256(disk.boot) == boot_before
    assert _sha256(disk.root) == root_before


def test_second_sync_replaces_stale_files(disk: PiDisk, tmp_path: Path) -> None:
    old_tree = tmp_path / "old"
    _firmware(old_tree)
    (old_tree / "boot" / "firmware" / "stale.txt").write_text("from the old release\n")
    (old_tree / "boot" / "firmware" / "overlays" / "old.dtbo").write_bytes(b"old overlay")
    disk.make_root(old_tree)
    sync_boot_partition(disk.root, disk.boot)
    assert {"stale.txt", "overlays/old.dtbo"} <= _read_fat(disk.boot, tmp_path / "back1").keys()
    volume_id = probe(disk.boot)["UUID"]

    new_tree = tmp_path / "new"
    files = _firmware(new_tree)
    disk.make_root(new_tree)
    report = sync_boot_partition(disk.root, disk.boot)

    assert _read_fat(disk.boot, tmp_path / "back2") == files
    assert report.files == len(files)
    fields = probe(disk.boot)
    assert (fields["LABEL"], fields["UUID"]) == ("BOOTA", volume_id)


def test_root_that_is_not_ext4_is_refused(disk: PiDisk) -> None:
    with disk.root.open("r+b") as root:
        root.write(bytes(1 << 20))
    boot_before = _sha256(disk.boot)

    with pytest.raises(BootSyncError, match="as an ext2/3/4 filesystem: Bad magic") as caught:
        sync_boot_partition(disk.root, disk.boot)

    assert caught.value.changed is False
    assert _sha256(disk.boot) == boot_before


def test_corruption_after_copying_is_reported(
    disk: PiDisk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _firmware(tmp_path / "tree")
    disk.make_root(tmp_path / "tree")
    flush = otad.bootsync._flush
    bad = tmp_path / "bad.txt"
    bad.write_text("not what was written\n")

    def flush_then_corrupt(boot: Path) -> None:
        flush(boot)
        _sh("mcopy", "-o", "-i", boot, bad, "::/overlays/x.dtbo", env=MTOOLS)

    monkeypatch.setattr(otad.bootsync, "_flush", flush_then_corrupt)

    with pytest.raises(BootSyncError, match="overlays/x.dtbo reads back as 21 bytes") as caught:
        sync_boot_partition(disk.root, disk.boot)

    assert caught.value.changed is True
    assert "its old content was erased" in str(caught.value)


@pytest.mark.parametrize(
    ("source_dir", "label", "cmdline_root", "error", "fragment"),
    [
        ("boot/firmware", None, None, UsageError, "absolute directory below /"),
        ("/", None, None, UsageError, "absolute directory below /"),
        (FIRMWARE, "MUCH-TOO-LONG", None, UsageError, "is not a FAT label"),
        (FIRMWARE, "A/B", None, UsageError, "is not a FAT label"),
        (FIRMWARE, None, "PARTUUID=1 quiet", UsageError, "must be the value of root="),
        (FIRMWARE, None, "root=PARTUUID=1", UsageError, "must be the value of root="),
        (FIRMWARE, None, "", UsageError, "must be the value of root="),
        (FIRMWARE, "BOOTB", "PARTUUID=1", DeviceError, "root.img does not exist"),
    ],
)
def test_bad_requests_are_refused_first(
    tmp_path: Path,
    source_dir: str,
    label: str | None,
    cmdline_root: str | None,
    error: type[Exception],
    fragment: str,
) -> None:
    with pytest.raises(error, match=fragment):
        sync_boot_partition(
            tmp_path / "root.img",
            tmp_path / "boot.img",
            source_dir=source_dir,
            label=label,
            cmdline_root=cmdline_root,
        )
    assert not (tmp_path / "boot.img").exists()


def test_boot_must_not_be_the_root(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(bytes(4096))

    with pytest.raises(UsageError, match="is the root filesystem"):
        sync_boot_partition(image, image)
