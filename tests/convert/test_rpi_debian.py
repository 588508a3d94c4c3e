"""Converting an image laid out like Debian's own Raspberry Pi images, checked from outside.

The stock image (tests/convert/rpi_debian_stock.py) names its partitions by label
(RASPIFIRM, RASPIROOT) and carries Debian's real raspi-firmware hooks. It is converted
once, without --deb (the Raspberry Pi OS tests install otad through qemu-user-static;
nothing here depends on it). The result is read with sfdisk, blkid, mtools and loop
mounts; the hook is then run in a chroot of each converted slot, as a kernel or
initramfs update runs it on the device, with that slot's kernel command line on
/proc/cmdline.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.bootsync import sync_boot_partition
from otad.config import RefKind, parse_config
from tests.conftest import KeyPair, require_tool
from tests.convert import rpi_debian_stock as debian
from tests.convert.conftest import (
    MTOOLS_ENV,
    leftovers,
    mounted_read_only,
    otad_convert,
    sh,
    sha256,
)
from tests.convert.test_rpi import (
    STORAGE,
    MbrPart,
    fat_read,
    fat_tree,
    probe,
    require_pi_tools,
    table,
)

DEVICE_TYPE = "raspberrypi4"
STOCK_WORDS = "console=tty0 console=ttyS1,115200 rw fsck.repair=yes net.ifnames=0 rootwait".split()
NEW_KERNEL = "6.1.0-29-arm64"


@dataclass(frozen=True)
class DebianConversion:
    stock: Path
    stock_sha256: str
    output: Path
    artifact: Path
    report: str
    seconds: float


@pytest.fixture(scope="session")
def conversion(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]
) -> DebianConversion:
    require_pi_tools()
    for tool in ("cpio", "zstd"):  # the stock initrd is built, and read back, with them
        require_tool(tool)
    started = time.monotonic()
    image = debian.debian_pi_image()
    print(f"Debian Pi stock image ready in {time.monotonic() - started:.1f} s")
    before = sha256(image)
    work = tmp_path_factory.mktemp("debian-pi")
    output = work / "pi.img"
    started = time.monotonic()
    result = otad_convert(
        image, "-o", output, "--storage-size", STORAGE, "--device-type", DEVICE_TYPE,
        "--artifact-name", "debian-pi-1", "--key", keys["ecdsa"].private,
        "--verify-key", keys["ecdsa"].public,
    )  # fmt: skip
    seconds = time.monotonic() - started
    print(f"Debian Pi conversion took {seconds:.1f} s")
    assert result.returncode == 0, result.stderr
    return DebianConversion(image, before, output, work / "pi.mender", result.stdout, seconds)


@pytest.fixture
def slot_a_root(conversion: DebianConversion, tmp_path: Path) -> Iterator[Path]:
    _, parts = table(conversion.output)
    with mounted_read_only(conversion.output, parts[5].as_part(), tmp_path / "a") as root:
        yield root


# -- partitions and labels ------------------------------------------------------------


def test_no_partition_keeps_a_stock_label_that_both_slots_would_share(
    conversion: DebianConversion,
) -> None:
    _, parts = table(conversion.output)
    found = {n: probe(conversion.output, parts[n]) for n in (1, 2, 3, 5, 6, 7)}

    assert sorted(parts) == [1, 2, 3, 4, 5, 6, 7]
    assert {n: f["TYPE"] for n, f in found.items()} == {
        1: "vfat", 2: "vfat", 3: "vfat", 5: "ext4", 6: "ext4", 7: "ext4"
    }  # fmt: skip
    labels = {n: f.get("LABEL") for n, f in found.items()}
    assert labels == {1: "AUTOBOOT", 2: "BOOT-A", 3: "BOOT-B", 5: None, 6: None, 7: "data"}
    stock_labels = {
        probe(conversion.stock, p).get("LABEL") for p in table(conversion.stock)[1].values()
    }
    assert stock_labels == {debian.BOOT_LABEL, debian.ROOT_LABEL}
    assert len({f["UUID"] for f in found.values()}) == 6
    assert sha256(conversion.stock) == conversion.stock_sha256  # the input was never written


# -- the boot partitions --------------------------------------------------------------


@pytest.mark.parametrize(("number", "root"), [(2, 5), (3, 6)])
def test_each_boot_partition_boots_its_slot_by_partuuid(
    conversion: DebianConversion, number: int, root: int
) -> None:
    disk_id, parts = table(conversion.output)
    words = fat_read(conversion.output, parts[number], "cmdline.txt").decode().split()

    assert [w for w in words if w.startswith("root=")] == [f"root=PARTUUID={disk_id}-{root:02d}"]
    assert [w for w in words if not w.startswith("root=")] == STOCK_WORDS
    assert "LABEL=" not in " ".join(words)


def test_config_txt_loads_a_kernel_and_initrd_each_boot_partition_holds(
    conversion: DebianConversion, tmp_path: Path
) -> None:
    _, parts = table(conversion.output)
    stock_parts = table(conversion.stock)[1]
    stock_config = fat_read(conversion.stock, stock_parts[1], "config.txt")

    for number in (2, 3):
        files = fat_tree(conversion.output, parts[number], tmp_path / str(number))
        assert files["config.txt"] == stock_config
        lines = stock_config.decode().splitlines()
        kernel = next(line.split("=", 1)[1] for line in lines if line.startswith("kernel="))
        initrd = next(line.split()[1] for line in lines if line.startswith("initramfs "))
        assert (kernel, initrd) == (f"vmlinuz-{debian.KERNEL_VERSION}",
                                    f"initrd.img-{debian.KERNEL_VERSION}")  # fmt: skip
        assert files[kernel] == debian.stand_in_kernel_files()[f"boot/{kernel}"]
        stock_initrd = fat_read(conversion.stock, stock_parts[1], initrd)
        assert files[initrd].startswith(stock_initrd)  # and an override, see below
        assert "start4.elf" in files
        assert "bcm2711-rpi-4-b.dtb" in files


def test_sysconf_txt_is_on_boot_a_only_and_its_service_still_runs(
    conversion: DebianConversion, slot_a_root: Path, tmp_path: Path
) -> None:
    _, parts = table(conversion.output)
    boot_a = fat_tree(conversion.output, parts[2], tmp_path / "boot-a")
    boot_b = fat_tree(conversion.output, parts[3], tmp_path / "boot-b")

    assert boot_a["sysconf.txt"] == debian.SYSCONF.encode()
    assert "sysconf.txt" not in boot_b
    assert not (slot_a_root / "boot/firmware/sysconf.txt").exists()  # not in artifacts
    units = slot_a_root / "etc/systemd/system"
    link = units / "basic.target.requires/rpi-set-sysconf.service"
    assert os.readlink(link) == "/etc/systemd/system/rpi-set-sysconf.service"
    assert (units / "rpi-set-sysconf.service").read_text() == debian.UNITS[
        "rpi-set-sysconf.service"
    ][0]
    program = (slot_a_root / "usr/local/sbin/rpi-set-sysconf").read_text()
    assert "/boot/firmware/sysconf.txt" in program  # the booted slot's boot partition


# -- the root filesystem --------------------------------------------------------------


def test_fstab_names_no_label_and_mounts_the_shared_partitions_by_partuuid(
    conversion: DebianConversion, slot_a_root: Path
) -> None:
    disk_id, _ = table(conversion.output)
    text = (slot_a_root / "etc/fstab").read_text()
    entries = {
        fields[1]: fields
        for line in text.splitlines()
        if (fields := line.split()) and not fields[0].startswith("#")
    }

    assert entries["/"][:4] == ["/dev/root", "/", "ext4", "rw"]
    assert entries["/boot/autoboot"][0] == f"PARTUUID={disk_id}-01"
    assert entries["/data"][0] == f"PARTUUID={disk_id}-07"
    assert "/boot/firmware" not in entries  # the generator mounts the booted slot's
    assert "LABEL=" not in text


def test_raspi_firmware_defaults_compute_rootpart_from_the_booted_slot(
    conversion: DebianConversion, slot_a_root: Path
) -> None:
    disk_id, _ = table(conversion.output)
    text = (slot_a_root / "etc/default/raspi-firmware").read_text()
    active = [line for line in text.splitlines() if line.startswith("ROOTPART=")]

    assert active == [f"ROOTPART=PARTUUID={disk_id}-05"]  # the fallback, then the loop
    assert f"# ROOTPART=LABEL={debian.ROOT_LABEL}" in text  # the stock line, kept as comment
    assert f"root=PARTUUID={disk_id}-05|root=PARTUUID={disk_id}-06)" in text
    # This host's /proc/cmdline names no slot: the shell file falls back to slot A.
    value = sh("sh", "-c", f'. "{slot_a_root}/etc/default/raspi-firmware"; echo "$ROOTPART"')
    assert value.strip() == f"PARTUUID={disk_id}-05"
    hook = slot_a_root / debian.HOOK
    assert hook.read_bytes() == _packaged_file(debian.HOOK)  # the real hook, unchanged


def test_root_resizing_is_masked_and_the_other_first_boot_units_stay(
    slot_a_root: Path,
) -> None:
    units = slot_a_root / "etc/systemd/system"

    assert os.readlink(units / "rpi-resizerootfs.service") == "/dev/null"
    assert not (units / "local-fs-pre.target.requires/rpi-resizerootfs.service").is_symlink()
    for unit in ("rpi-generate-ssh-host-keys.service", "rpi-reconfigure-raspi-firmware.service"):
        assert (units / "multi-user.target.requires" / unit).is_symlink(), unit
        assert (units / unit).read_text() == debian.UNITS[unit][0]
    assert (units / "local-fs.target.wants/otad-grow-data.service").is_symlink()


def test_otad_conf_names_the_slots_by_partuuid(
    conversion: DebianConversion, slot_a_root: Path
) -> None:
    disk_id, _ = table(conversion.output)
    config = parse_config((slot_a_root / "etc/otad/otad.conf").read_text())

    assert config.device_type == DEVICE_TYPE
    for slot, root, boot in ((Slot.A, 5, 2), (Slot.B, 6, 3)):
        assert config.slots[slot].root.kind is RefKind.PARTUUID
        assert str(config.slots[slot].root) == f"PARTUUID={disk_id}-{root:02d}"
        assert str(config.slots[slot].boot) == f"PARTUUID={disk_id}-{boot:02d}"


def test_the_report_says_what_was_done_for_debians_image(conversion: DebianConversion) -> None:
    assert "label RASPIROOT removed" in conversion.report
    assert "/etc/default/raspi-firmware: ROOTPART (stock: LABEL=RASPIROOT)" in conversion.report
    assert "rpi-resizerootfs.service" in conversion.report
    assert "sysconf.txt" in conversion.report


def test_the_initrds_first_boot_resize_is_overridden_by_a_script_that_does_nothing(
    conversion: DebianConversion, slot_a_root: Path, tmp_path: Path
) -> None:
    """Unpacked as the kernel unpacks an initramfs: each archive in turn, later files
    replacing earlier ones (cpio -u), here with the host's zstd and cpio."""
    _, parts = table(conversion.output)
    name = f"initrd.img-{debian.KERNEL_VERSION}"
    stock = fat_read(conversion.stock, table(conversion.stock)[1][1], name)
    converted = {
        "boot A": fat_read(conversion.output, parts[2], name),
        "boot B": fat_read(conversion.output, parts[3], name),
        "/boot": (slot_a_root / "boot" / name).read_bytes(),
        "/boot/firmware": (slot_a_root / "boot/firmware" / name).read_bytes(),
    }
    assert len(set(converted.values())) == 1, converted.keys()
    initrd = converted["boot A"]
    assert initrd.startswith(stock)
    appended = initrd[len(stock) :]
    assert (len(stock) + len(appended) - len(appended.lstrip(b"\0"))) % 4 == 0

    tree = tmp_path / "unpacked"
    tree.mkdir()
    main = subprocess.run(["zstd", "-dc"], input=stock, capture_output=True, check=True).stdout
    for archive in (main, appended.lstrip(b"\0")):
        subprocess.run(["cpio", "-idu", "--quiet"], input=archive, cwd=tree, check=True)
    script = tree / "scripts/local-bottom/rpi-resizerootfs"
    assert script.read_text() != debian.INITRD_FILES["scripts/local-bottom/rpi-resizerootfs"]
    assert "resize2fs" not in script.read_text()
    assert (tree / "scripts/local-bottom/ORDER").read_text() == debian.INITRD_FILES[
        "scripts/local-bottom/ORDER"
    ]
    assert (tree / "init").read_text() == debian.INITRD_FILES["init"]
    assert os.stat(script).st_mode & 0o777 == 0o755
    for argv in (["sh", str(script), "prereqs"], ["sh", str(script)]):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert (result.returncode, result.stdout.strip()) == (0, "")
    assert "rpi-resizerootfs) overridden" in conversion.report


# -- the raspi-firmware hook run inside a converted slot ------------------------------


@pytest.mark.parametrize(("slot", "root", "boot"), [(Slot.A, 5, 2), (Slot.B, 6, 3)])
def test_a_kernel_update_in_a_slot_rewrites_cmdline_txt_for_that_slot(
    conversion: DebianConversion, tmp_path: Path, slot: Slot, root: int, boot: int
) -> None:
    """Debian's real hook, as update-initramfs calls it, in a chroot of the slot (arm64
    through qemu-user-static), with the slot's booted cmdline.txt as /proc/cmdline."""
    require_tool("qemu-aarch64-static")
    disk_id, parts = table(conversion.output)
    copy = tmp_path / "slot.ext4"
    _extract(conversion.output, parts[root], copy)
    booted = tmp_path / "cmdline"
    booted.write_bytes(fat_read(conversion.output, parts[boot], "cmdline.txt"))

    with _chroot(copy, tmp_path / "root", booted) as chroot:
        (chroot / f"boot/vmlinuz-{NEW_KERNEL}").write_bytes(debian.blob("new kernel", 5000))
        (chroot / f"boot/initrd.img-{NEW_KERNEL}").write_bytes(debian.blob("its initrd", 3000))
        result = subprocess.run(
            ["chroot", chroot, "/etc/initramfs/post-update.d/z50-raspi-firmware"],
            capture_output=True, text=True, check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        firmware = chroot / "boot/firmware"
        written = (firmware / "cmdline.txt").read_text()
        words = written.split()
        config = (firmware / "config.txt").read_text()
        assert (firmware / f"vmlinuz-{NEW_KERNEL}").is_file()

    assert [w for w in words if w.startswith("root=")] == [f"root=PARTUUID={disk_id}-{root:02d}"]
    assert f"kernel=vmlinuz-{NEW_KERNEL}\n" in config
    assert f"initramfs initrd.img-{NEW_KERNEL}" in config

    # The generator mounts, for that command line, this slot's own boot partition.
    units = tmp_path / "units"
    units.mkdir()
    with mounted_read_only(conversion.output, parts[root].as_part(), tmp_path / "ro") as ro:
        (tmp_path / "written").write_text(written)
        env = {**os.environ, "OTAD_CMDLINE": str(tmp_path / "written"),
               "OTAD_BOOT_PARTITIONS": str(ro / "etc/otad/boot-partitions")}  # fmt: skip
        sh_argv: list[str | Path] = [
            "sh",
            ro / "etc/systemd/system-generators/otad-boot-firmware",
            units,
        ]
        subprocess.run(sh_argv, check=True, env=env)
    mount = (units / "boot-firmware.mount").read_text()
    assert f"What=/dev/disk/by-partuuid/{disk_id}-{boot:02d}\n" in mount


def test_an_update_built_from_a_slot_the_hook_rewrote_boots_the_other_slot(
    conversion: DebianConversion, tmp_path: Path
) -> None:
    """bootsync sets root= of the slot it fills, whatever the hook wrote in the payload."""
    require_tool("qemu-aarch64-static")
    disk_id, parts = table(conversion.output)
    payload = tmp_path / "slot-b.ext4"
    _extract(conversion.output, parts[6], payload)
    booted = tmp_path / "cmdline"
    booted.write_bytes(fat_read(conversion.output, parts[3], "cmdline.txt"))
    with _chroot(payload, tmp_path / "root", booted) as chroot:
        subprocess.run(["chroot", chroot, "/etc/initramfs/post-update.d/z50-raspi-firmware"],
                       check=True, capture_output=True,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    boot = tmp_path / "boot-a.vfat"
    with boot.open("wb") as stream:
        stream.truncate(parts[2].bytes)
    sh("mkfs.vfat", "-n", "BOOT-A", boot)

    sync_boot_partition(payload, boot, cmdline_root=f"PARTUUID={disk_id}-05")

    synced = fat_read(boot, MbrPart(0, 0, parts[2].size, "c"), "cmdline.txt").decode().split()
    assert [w for w in synced if w.startswith("root=")] == [f"root=PARTUUID={disk_id}-05"]


# -- bad input ------------------------------------------------------------------------


def _copy(work: Path) -> Path:
    copy = work / "stock-copy.img"
    sh("cp", "--sparse=always", debian.debian_pi_image(), copy)
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("cmdline", "cmdline.txt root= names LABEL=OTHERROOT, but partition 2 (the root "
                    "partition) is labelled 'RASPIROOT'"),
        ("boot-label", "are both labelled 'RASPIROOT'"),
        ("fat-label", "/etc/fstab for /boot/firmware names LABEL=RASPIFIRM, but partition 1 "
                      "(the boot partition) is labelled 'FIRMWARE'"),
    ],
)  # fmt: skip
def test_labels_that_name_no_partition_or_both_are_refused(
    tmp_path: Path, keys: dict[str, KeyPair], change: str, message: str
) -> None:
    require_pi_tools()
    require_tool("mlabel")
    image = _copy(tmp_path)
    spec = f"{image}@@{debian.BOOT[0] * 512}"
    if change == "cmdline":
        cmdline = tmp_path / "cmdline.txt"
        cmdline.write_text("console=tty0 root=LABEL=OTHERROOT rw rootwait\n")
        sh("mcopy", "-o", "-i", spec, cmdline, "::/cmdline.txt", **MTOOLS_ENV)
    else:
        label = "RASPIROOT" if change == "boot-label" else "FIRMWARE"
        sh("mlabel", "-i", spec, f"::{label}", **MTOOLS_ENV)
    before = sha256(image)
    output = tmp_path / "out.img"

    result = otad_convert(image, "-o", output, "--storage-size", STORAGE,
                          "--verify-key", keys["ecdsa"].public)  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sha256(image) == before
    assert not output.exists()
    assert not (tmp_path / "out.mender").exists()
    assert leftovers(tmp_path) == ([], [])


# -- helpers --------------------------------------------------------------------------


def _packaged_file(path: str) -> bytes:
    """`path` as Debian's raspi-firmware package ships it."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", debian.firmware_deb()],
                         capture_output=True, check=True).stdout  # fmt: skip
    return subprocess.run(["tar", "-xO", f"./{path}"], input=tar, capture_output=True,
                          check=True).stdout  # fmt: skip


def _extract(image: Path, part: MbrPart, target: Path) -> None:
    sh("dd", f"if={image}", f"of={target}", "bs=1M", f"skip={part.offset}", f"count={part.bytes}",
       "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none")  # fmt: skip


@contextlib.contextmanager
def _chroot(filesystem: Path, where: Path, cmdline: Path) -> Iterator[Path]:
    """`filesystem` mounted read-write at `where`, with /proc and `cmdline` over
    /proc/cmdline, for the image's programs to run in (through qemu-user-static)."""
    where.mkdir()
    with contextlib.ExitStack() as stack:
        sh("mount", "-o", "loop", filesystem, where)
        stack.callback(sh, "umount", where)
        sh("mount", "-t", "proc", "proc", where / "proc")
        stack.callback(sh, "umount", where / "proc")
        sh("mount", "--bind", cmdline, where / "proc/cmdline")
        stack.callback(sh, "umount", where / "proc/cmdline")
        yield where
