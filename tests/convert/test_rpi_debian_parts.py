"""The pieces of Debian-Pi conversion that need no image: labels, ROOTPART, initrds."""

from __future__ import annotations

import gzip
import lzma
import subprocess
from pathlib import Path

import pytest
import zstandard

from convert import rpi_debian
from convert.errors import ImageError
from convert.layout import Partition
from convert.mbr import MbrPlan
from tests.conftest import require_tool

FSTAB = "LABEL=RASPIROOT / ext4 rw 0 1\nLABEL=RASPIFIRM /boot/firmware vfat rw 0 2\n"
CMDLINE = "console=tty0 root=LABEL=RASPIROOT rw rootwait"


def _root(tmp_path: Path, fstab: str = FSTAB, defaults: str | None = None) -> Path:
    root = tmp_path / "root"
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/fstab").write_text(fstab)
    if defaults is not None:
        (root / "etc/default/raspi-firmware").write_text(defaults)
    return root


@pytest.mark.parametrize(
    ("cmdline", "fstab", "defaults", "labels", "message"),
    [
        (CMDLINE, FSTAB, 'ROOTPART="LABEL=RASPIROOT"\n', ("RASPIFIRM", "RASPIROOT"), None),
        ("root=PARTUUID=x-02", "/dev/root / ext4 rw 0 1\n", None, ("bootfs", "rootfs"), None),
        (CMDLINE.replace("RASPIROOT", "ROOT2"), FSTAB, None, ("RASPIFIRM", "RASPIROOT"),
         "cmdline.txt root= names LABEL=ROOT2, but partition 2"),
        (CMDLINE, FSTAB, None, ("FIRMWARE", "RASPIROOT"),
         "/etc/fstab for /boot/firmware names LABEL=RASPIFIRM, but partition 1"),
        ("root=PARTUUID=x-02", "/dev/root / ext4 rw 0 1\n", "ROOTPART=LABEL=OTHER # old\n",
         ("RASPIFIRM", "RASPIROOT"), "ROOTPART in /etc/default/raspi-firmware names LABEL=OTHER"),
        (CMDLINE, FSTAB, None, ("RASPIROOT", "RASPIROOT"), "are both labelled 'RASPIROOT'"),
    ],
)  # fmt: skip
def test_labels_must_name_the_partition_they_stand_for(
    tmp_path: Path,
    cmdline: str,
    fstab: str,
    defaults: str | None,
    labels: tuple[str, str],
    message: str | None,
) -> None:
    uses = rpi_debian.label_uses(_root(tmp_path, fstab, defaults), cmdline)

    if message is None:
        rpi_debian.check_labels(uses, *labels)
    else:
        with pytest.raises(ImageError, match=message.replace("(", r"\(")):
            rpi_debian.check_labels(uses, *labels)


def _plan() -> MbrPlan:
    def part(number: int) -> Partition:
        return Partition(number, number * 2048, 2048, "83", f"abcd0123-{number:02d}")

    return MbrPlan(1 << 30, "abcd0123", *(part(n) for n in (1, 2, 3, 4, 5, 6, 7)))


def test_rootpart_is_commented_out_and_computed_from_the_kernel_command_line(
    tmp_path: Path,
) -> None:
    stock = "# comment\n#ROOTPART=/dev/mmcblk0p2\nROOTPART=LABEL=RASPIROOT\nCMA=64M\n"
    root = _root(tmp_path, defaults=stock)

    assert rpi_debian.point_hook_at_booted_slot(root, _plan()) == "LABEL=RASPIROOT"

    text = (root / "etc/default/raspi-firmware").read_text()
    assert text.startswith("# comment\n#ROOTPART=/dev/mmcblk0p2\n# ROOTPART=LABEL=RASPIROOT")
    assert "CMA=64M\n" in text
    assert [line for line in text.splitlines() if line.startswith("ROOTPART=")] == [
        "ROOTPART=PARTUUID=abcd0123-05"
    ]
    assert "root=PARTUUID=abcd0123-05|root=PARTUUID=abcd0123-06)" in text
    result = subprocess.run(["sh", "-n", root / "etc/default/raspi-firmware"], check=False)
    assert result.returncode == 0  # the hook sources it: it must be valid shell


def test_an_image_without_the_hook_gets_no_defaults_file(tmp_path: Path) -> None:
    root = _root(tmp_path)

    assert rpi_debian.point_hook_at_booted_slot(root, _plan()) is None
    assert not (root / "etc/default/raspi-firmware").exists()


def _cpio(files: dict[str, bytes], tmp_path: Path) -> bytes:
    require_tool("cpio")
    tree = tmp_path / "tree"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    names = "\n".join(sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")))
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                          input=names.encode(), capture_output=True, check=True).stdout  # fmt: skip


@pytest.mark.parametrize("compress", ["none", "gzip", "xz", "zstd", "early+gzip"])
def test_initrd_members_are_found_in_every_usual_compression(tmp_path: Path, compress: str) -> None:
    main = _cpio({rpi_debian.RESIZE_SCRIPT: b"resize\n", "init": b"#!/bin/sh\n"}, tmp_path)
    if compress == "zstd":
        require_tool("zstd")
        packed = subprocess.run(["zstd", "-q", "-c"], input=main, capture_output=True,
                                check=True).stdout  # fmt: skip
    else:
        packed = {"none": main, "gzip": gzip.compress(main), "xz": lzma.compress(main)}.get(
            compress, gzip.compress(main)
        )
    if compress.startswith("early+"):  # an uncompressed archive first, as x86 microcode
        early = _cpio({"kernel/x86/microcode/GenuineIntel.bin": b"u"}, tmp_path / "early")
        packed = early + bytes(-len(early) % 4) + packed

    assert rpi_debian.has_member(packed, rpi_debian.RESIZE_SCRIPT)
    assert rpi_debian.has_member(packed, "init")
    assert not rpi_debian.has_member(packed, "scripts/local-bottom/other")


def test_the_override_archive_is_read_by_cpio(tmp_path: Path) -> None:
    require_tool("cpio")
    archive = rpi_debian.newc_archive({rpi_debian.RESIZE_SCRIPT: rpi_debian.RESIZE_STUB})
    (tmp_path / "out").mkdir()

    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path / "out", check=True)

    script = tmp_path / "out" / rpi_debian.RESIZE_SCRIPT
    assert script.read_bytes() == rpi_debian.RESIZE_STUB
    assert script.stat().st_mode & 0o777 == 0o755
    assert len(archive) % 512 == 0


def test_only_initrds_with_the_resize_script_are_changed(tmp_path: Path) -> None:
    require_tool("cpio")
    root = tmp_path / "root"
    (root / "boot/firmware").mkdir(parents=True)
    with_resize = gzip.compress(_cpio({rpi_debian.RESIZE_SCRIPT: b"resize\n"}, tmp_path / "a"))
    without = gzip.compress(_cpio({"init": b"#!/bin/sh\n"}, tmp_path / "b"))
    (root / "boot/initrd.img-1").write_bytes(with_resize)
    (root / "boot/firmware/initrd.img-1").write_bytes(with_resize)
    (root / "boot/initrd.img-2").write_bytes(without)
    (root / "boot/initrd.img-3").symlink_to("initrd.img-1")

    changed = rpi_debian.neutralize_initrd_resize(root)

    assert changed == ["/boot/firmware/initrd.img-1", "/boot/initrd.img-1"]
    assert (root / "boot/initrd.img-2").read_bytes() == without
    assert (root / "boot/initrd.img-1").read_bytes().startswith(with_resize)


def test_a_corrupt_initrd_is_a_clear_error_and_stays_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    good = zstandard.ZstdCompressor().compress(b"070701" + bytes(100_000))
    corrupt = good[:20] + b"not what zstd wrote" + good[40:]
    (root / "boot/initrd.img-1").write_bytes(corrupt)

    with pytest.raises(ImageError, match=r"the initrd /boot/initrd.img-1 cannot be read: its "
                       r"compressed archive is corrupt \(zstd"):  # fmt: skip
        rpi_debian.neutralize_initrd_resize(root)
    assert (root / "boot/initrd.img-1").read_bytes() == corrupt
