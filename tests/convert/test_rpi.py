"""Converting a Raspberry Pi OS-like image, checked from outside the converter.

The stock image (tests/convert/rpi_stock.py) is converted once per architecture with the
real otad .deb and its dependencies of that architecture, installed through
qemu-user-static. The result is read with sfdisk, blkid, mtools, read-only loop mounts
and otad's own parsers; nothing here calls the converter's modules to judge its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.artifact.reader import SignatureStatus, VerifyPolicy, verify_artifact
from otad.bootloader import make_bootloader
from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.rpi import RpiTrybootBootloader, firmware_partition, parse_autoboot
from otad.bootsync import sync_boot_partition
from otad.config import BackendName, RefKind, parse_config
from tests.conftest import KeyPair, require_tool
from tests.convert import rpi_stock
from tests.convert.conftest import (
    MTOOLS_ENV,
    Part,
    leftovers,
    mounted_read_only,
    otad_convert,
    require_root_and_tools,
    sh,
    sha256,
)

STORAGE = "1600M"
DEVICE_TYPE = "raspberrypi4"  # given to the arm64 conversion; the armhf one takes the default


def device_type(architecture: str) -> str:
    """The device type the conversion of `architecture` must write."""
    return DEVICE_TYPE if architecture == "arm64" else f"raspberrypi-{architecture}"


PI_TOOLS = ("qemu-aarch64-static", "qemu-arm-static", "update-binfmts", "debugfs", "mdel")
STOCK_BOOT_LABEL = "bootfs"


@dataclass(frozen=True)
class PiConversion:
    architecture: str
    stock: Path
    stock_sha256: str
    output: Path
    artifact: Path
    keys: KeyPair
    debs: tuple[Path, ...]
    report: str
    log: str
    seconds: float


def require_pi_tools() -> None:
    require_root_and_tools()
    for tool in PI_TOOLS:
        require_tool(tool)


def otad_debs(architecture: str) -> tuple[Path, ...]:
    from tests.boot.harness import otad_deb

    deb = otad_deb()
    return (*rpi_stock.dependency_debs(deb, architecture), deb)


def convert_pi(architecture: str, work: Path, keys: KeyPair, *extra: str | Path) -> PiConversion:
    started = time.monotonic()
    image = rpi_stock.pi_image(architecture)
    debs = otad_debs(architecture)
    print(f"{architecture} stock image and packages ready in {time.monotonic() - started:.1f} s")
    before = sha256(image)
    output = work / "pi.img"
    started = time.monotonic()
    result = otad_convert(
        image, "-o", output, "--storage-size", STORAGE,
        *(["--device-type", DEVICE_TYPE] if architecture == "arm64" else []),
        "--artifact-name", f"pi-{architecture}-1", "--key", keys.private,
        "--verify-key", keys.public, *_deb_options(debs), *extra,
    )  # fmt: skip
    seconds = time.monotonic() - started
    print(f"{architecture} conversion took {seconds:.1f} s")
    assert result.returncode == 0, result.stderr
    return PiConversion(architecture, image, before, output, work / "pi.mender", keys, debs,
                        result.stdout, result.stderr, seconds)  # fmt: skip


def _deb_options(debs: tuple[Path, ...]) -> list[str | Path]:
    words: list[str | Path] = []
    for deb in debs:
        words += ["--deb", deb]
    return words


@pytest.fixture(scope="session", params=["arm64", "armhf"])
def pi(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    keys: dict[str, KeyPair],
) -> PiConversion:
    require_pi_tools()
    architecture = str(request.param)
    return convert_pi(architecture, tmp_path_factory.mktemp(f"pi-{architecture}"), keys["ecdsa"])


@dataclass(frozen=True)
class MbrPart:
    number: int
    start: int
    size: int
    type: str

    @property
    def offset(self) -> int:
        return self.start * 512

    @property
    def bytes(self) -> int:
        return self.size * 512

    def as_part(self) -> Part:
        return Part(self.number, self.start, self.size, self.type, "", "")


def table(image: Path) -> tuple[str, dict[int, MbrPart]]:
    """The disk identifier (8 hex digits) and the partitions by number, from sfdisk --json."""
    value = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    assert value["label"] == "dos"
    found = {}
    for entry in value["partitions"]:
        number = int(entry["node"][len(str(image)) :])
        found[number] = MbrPart(number, entry["start"], entry["size"], entry["type"])
    return value["id"].removeprefix("0x"), found


def probe(image: Path, part: MbrPart) -> dict[str, str]:
    output = sh("blkid", "-p", "-o", "export", "-O", str(part.offset), image)
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def fat_read(image: Path, part: MbrPart, path: str) -> bytes:
    result = subprocess.run(
        ["mtype", "-i", f"{image}@@{part.offset}", f"::/{path}"],
        capture_output=True, check=True, env=MTOOLS_ENV,
    )  # fmt: skip
    return result.stdout


def fat_tree(image: Path, part: MbrPart, target: Path) -> dict[str, bytes]:
    """Every file of the FAT partition, by relative path."""
    target.mkdir(parents=True)
    subprocess.run(
        ["mcopy", "-s", "-n", "-i", f"{image}@@{part.offset}", "::/", target],
        check=True, env=MTOOLS_ENV, capture_output=True,
    )  # fmt: skip
    return {
        path.relative_to(target).as_posix(): path.read_bytes()
        for path in sorted(target.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def slot_a_root(pi: PiConversion, tmp_path: Path) -> Iterator[Path]:
    _, parts = table(pi.output)
    with mounted_read_only(pi.output, parts[5].as_part(), tmp_path / "root-a") as root:
        yield root


# -- the partition table and the filesystems -----------------------------------------


def test_the_layout_has_three_primary_fat_partitions_and_logical_slots(pi: PiConversion) -> None:
    disk_id, parts = table(pi.output)
    _, stock_parts = table(pi.stock)

    assert sorted(parts) == [1, 2, 3, 4, 5, 6, 7]
    assert [parts[n].type for n in range(1, 8)] == ["c", "c", "c", "5", "83", "83", "83"]
    assert disk_id != rpi_stock.DISK_ID
    assert parts[2].size == parts[3].size >= stock_parts[1].size
    assert parts[5].size == parts[6].size
    # The extended partition holds 5 to 7 and reaches the end of the disk, as data does.
    extended = parts[4]
    assert all(extended.start < parts[n].start < parts[n].start + parts[n].size
               <= extended.start + extended.size for n in (5, 6, 7))  # fmt: skip
    assert (parts[7].start + parts[7].size) * 512 == pi.output.stat().st_size
    assert extended.start + extended.size == parts[7].start + parts[7].size
    assert all(part.start % 2048 == 0 for part in parts.values())
    sh("sfdisk", "--verify", pi.output)


def test_every_filesystem_has_its_own_uuid(pi: PiConversion) -> None:
    _, parts = table(pi.output)
    found = {number: probe(pi.output, parts[number]) for number in (1, 2, 3, 5, 6, 7)}

    assert {n: f["TYPE"] for n, f in found.items()} == {
        1: "vfat", 2: "vfat", 3: "vfat", 5: "ext4", 6: "ext4", 7: "ext4"
    }  # fmt: skip
    assert [found[n].get("LABEL") for n in (1, 2, 3, 7)] == ["AUTOBOOT", "BOOT-A", "BOOT-B", "data"]
    uuids = [found[n]["UUID"] for n in (1, 2, 3, 5, 6, 7)]
    assert len(set(uuids)) == 6
    assert rpi_stock.ROOT_UUID not in uuids
    assert rpi_stock.BOOT_SERIAL not in {u.replace("-", "") for u in uuids}
    assert found[5].get("LABEL") == found[6].get("LABEL") == "rootfs"  # the stock label stays


# -- the boot side: autoboot.txt and each slot's boot partition ---------------------


def test_autoboot_boots_slot_a_and_otad_reads_it(pi: PiConversion, tmp_path: Path) -> None:
    _, parts = table(pi.output)
    text = fat_read(pi.output, parts[1], "autoboot.txt").decode()

    lines = [line.strip() for line in text.splitlines()]
    assert lines.index("[all]") < lines.index("tryboot_a_b=1") < lines.index("[tryboot]")
    assert firmware_partition(text, tryboot=False) == 2
    assert firmware_partition(text, tryboot=True) == 2
    assert parse_autoboot(text.encode(), "autoboot.txt").default_partition == 2
    # otad's backend, as the converted otad.conf configures it, on what the firmware says.
    (tmp_path / "autoboot.txt").write_text(text)
    node = tmp_path / "device-tree/chosen/bootloader"
    node.mkdir(parents=True)
    (node / "partition").write_bytes((2).to_bytes(4, "big"))
    (node / "tryboot").write_bytes((0).to_bytes(4, "big"))
    backend = RpiTrybootBootloader(tmp_path, {Slot.A: 2, Slot.B: 3}, tmp_path / "device-tree")
    status = backend.status()
    assert (status.booted, status.default, status.trial) == (Slot.A, Slot.A, None)
    assert status.slots[Slot.A] is SlotBootState.GOOD
    assert sorted(fat_tree(pi.output, parts[1], tmp_path / "all")) == ["autoboot.txt"]


FIRST_RUN = (
    "systemd.run=/boot/firmware/firstrun.sh",
    "systemd.run_success_action=reboot",
    "systemd.unit=kernel-command-line.target",
)


@pytest.mark.parametrize(("number", "root"), [(2, 5), (3, 6)])
def test_each_boot_partition_boots_its_own_root(pi: PiConversion, number: int, root: int) -> None:
    disk_id, parts = table(pi.output)
    words = fat_read(pi.output, parts[number], "cmdline.txt").decode().split()
    stock_words = rpi_stock.CMDLINE.split()

    assert [w for w in words if w.startswith("root=")] == [f"root=PARTUUID={disk_id}-{root:02d}"]
    assert not [w for w in words if w.startswith("init=")]
    # Everything else stays, in order; Imager's first run only where the first boot is.
    kept = [w for w in stock_words if not w.startswith(("root=", "init="))]
    if number == 3:
        kept = [w for w in kept if w not in FIRST_RUN]
    assert [w for w in words if not w.startswith("root=")] == kept
    assert all(word in stock_words for word in FIRST_RUN)


def test_boot_a_has_the_first_boot_files_and_both_the_stock_boot_files(
    pi: PiConversion, tmp_path: Path
) -> None:
    _, parts = table(pi.output)
    expected = rpi_stock.boot_files(pi.architecture)
    every_boot = {k: v for k, v in expected.items() if k not in rpi_stock.USER_FILES}

    boot_a = fat_tree(pi.output, parts[2], tmp_path / "a")
    boot_b = fat_tree(pi.output, parts[3], tmp_path / "b")

    assert sorted(boot_a) == sorted(expected)
    assert sorted(boot_b) == sorted(every_boot)
    for name, data in expected.items():
        if name != "cmdline.txt":
            assert boot_a[name] == data, name
            assert name not in every_boot or boot_b[name] == data, name
    assert rpi_stock.KERNELS[pi.architecture] in every_boot


def test_an_update_fills_a_boot_partition_exactly_as_the_converter_did(
    pi: PiConversion, tmp_path: Path
) -> None:
    """bootsync, run on the artifact's payload for slot B, writes what boot B holds now."""
    disk_id, parts = table(pi.output)
    payload = tmp_path / "payload.ext4"
    sh(
        "dd",
        f"if={pi.output}",
        f"of={payload}",
        "bs=1M",
        f"skip={parts[5].offset}",
        f"count={parts[5].bytes}",
        "iflag=skip_bytes,count_bytes",
        "conv=sparse",
        "status=none",
    )
    boot = tmp_path / "boot-b.vfat"
    with boot.open("wb") as stream:
        stream.truncate(parts[3].bytes)
    sh("mkfs.vfat", "-n", "BOOT-B", boot)

    sync_boot_partition(payload, boot, cmdline_root=f"PARTUUID={disk_id}-06")

    synced = fat_tree(boot, MbrPart(0, 0, parts[3].size, "c"), tmp_path / "synced")
    assert synced == fat_tree(pi.output, parts[3], tmp_path / "converted")


# -- the root filesystem ------------------------------------------------------------


def test_otad_conf_describes_the_layout(pi: PiConversion, slot_a_root: Path) -> None:
    disk_id, _ = table(pi.output)
    config = parse_config((slot_a_root / "etc/otad/otad.conf").read_text())

    assert config.bootloader.backend is BackendName.RPI_TRYBOOT
    assert dict(config.bootloader.options) == {
        "boot_dir": "/boot/autoboot", "partition_a": 2, "partition_b": 3
    }  # fmt: skip
    assert config.device_type == device_type(pi.architecture)
    for slot, root, boot in ((Slot.A, 5, 2), (Slot.B, 6, 3)):
        assert config.slots[slot].root.kind is RefKind.PARTUUID
        assert str(config.slots[slot].root) == f"PARTUUID={disk_id}-{root:02d}"
        assert str(config.slots[slot].boot) == f"PARTUUID={disk_id}-{boot:02d}"
    backend = make_bootloader(config.bootloader)
    assert isinstance(backend, RpiTrybootBootloader)
    assert backend.path == Path("/boot/autoboot/autoboot.txt")
    for key in config.trusted_keys:
        assert (slot_a_root / key.relative_to("/")).read_bytes() == pi.keys.public.read_bytes()


def test_fstab_mounts_the_shared_partitions_and_leaves_the_boot_partition_to_the_slot(
    pi: PiConversion, slot_a_root: Path, tmp_path: Path
) -> None:
    disk_id, parts = table(pi.output)
    entries = {
        fields[1]: fields
        for line in (slot_a_root / "etc/fstab").read_text().splitlines()
        if (fields := line.split()) and not fields[0].startswith("#")
    }

    assert entries["/"][:3] == ["/dev/root", "/", "ext4"]
    assert "noatime" in entries["/"][3]  # the stock options stay
    assert entries["/boot/autoboot"][:3] == [f"PARTUUID={disk_id}-01", "/boot/autoboot", "vfat"]
    assert entries["/data"][:3] == [f"PARTUUID={disk_id}-07", "/data", "ext4"]
    assert "/boot/firmware" not in entries
    assert entries["/proc"][0] == "proc"
    assert rpi_stock.DISK_ID not in (slot_a_root / "etc/fstab").read_text()

    # The generator picks the booted slot's boot partition from the kernel's root=.
    generator = slot_a_root / "etc/systemd/system-generators/otad-boot-firmware"
    for number, boot in ((2, 2), (3, 3)):
        cmdline = tmp_path / f"cmdline-{number}"
        cmdline.write_bytes(fat_read(pi.output, parts[number], "cmdline.txt"))
        units = tmp_path / f"units-{number}"
        units.mkdir()
        env = {
            **os.environ,
            "OTAD_CMDLINE": str(cmdline),
            "OTAD_BOOT_PARTITIONS": str(slot_a_root / "etc/otad/boot-partitions"),
        }
        subprocess.run(["sh", generator, units], check=True, env=env)  # fmt: skip
        unit = (units / "boot-firmware.mount").read_text()
        assert f"What=/dev/disk/by-partuuid/{disk_id}-{boot:02d}\n" in unit
        assert "Where=/boot/firmware\n" in unit
        assert (units / "local-fs.target.wants/boot-firmware.mount").resolve().name == (
            "boot-firmware.mount"
        )


def test_otad_and_its_dependencies_are_installed_for_the_architecture(
    pi: PiConversion, slot_a_root: Path
) -> None:
    status = (slot_a_root / "var/lib/dpkg/status").read_text().split("\n\n")
    installed = {}
    for paragraph in status:
        fields = dict(
            line.split(": ", 1)
            for line in paragraph.splitlines()
            if ": " in line and line[0] != " "
        )
        if fields.get("Status") == "install ok installed":
            installed[fields["Package"]] = fields.get("Architecture")

    assert installed["otad"] == "all"
    assert installed["python3-cryptography"] == pi.architecture
    assert installed["python3-dbus-next"] == "all"
    assert (slot_a_root / "usr/bin/otactl").exists()
    assert not (slot_a_root / "tmp/otad-convert-debs").exists()
    assert not (slot_a_root / "usr/sbin/policy-rc.d").exists()
    assert "through qemu-user-static" in pi.report


def test_root_resizing_hooks_are_gone_and_user_hooks_stay(
    pi: PiConversion, slot_a_root: Path
) -> None:
    units = slot_a_root / "etc/systemd/system"
    for unit in ("rpi-resizerootfs.service", "resize2fs_once.service",
                 "systemd-growfs-root.service", "systemd-repart.service"):  # fmt: skip
        assert os.readlink(units / unit) == "/dev/null", unit
    assert not (units / "multi-user.target.wants/rpi-resizerootfs.service").is_symlink()
    assert not (slot_a_root / "etc/init.d/resize2fs_once").exists()
    assert not (slot_a_root / "etc/rc3.d/S01resize2fs_once").is_symlink()
    assert (slot_a_root / "etc/growroot-disabled").exists()
    cloud = (slot_a_root / "etc/cloud/cloud.cfg.d/90-otad-no-growroot.cfg").read_text()
    assert "mode: 'off'" in cloud

    assert (units / "multi-user.target.wants/userconfig.service").is_symlink()
    assert (slot_a_root / "usr/lib/userconf-pi/userconf").exists()
    assert (units / "multi-user.target.wants/otad-ssh-host-keys.service").is_symlink()
    assert (units / "local-fs.target.wants/otad-grow-data.service").is_symlink()
    grow = (slot_a_root / "usr/local/lib/otad/otad-grow-data").read_text()
    assert "extended" in grow


def test_the_root_carries_the_boot_files_for_updates(pi: PiConversion, slot_a_root: Path) -> None:
    disk_id, _ = table(pi.output)
    firmware = slot_a_root / "boot/firmware"
    expected = rpi_stock.boot_files(pi.architecture)

    found = {p.relative_to(firmware).as_posix() for p in firmware.rglob("*") if p.is_file()}
    assert found == set(expected) - set(rpi_stock.USER_FILES)  # no first boot in updates
    assert (firmware / rpi_stock.KERNELS[pi.architecture]).read_bytes() == expected[
        rpi_stock.KERNELS[pi.architecture]
    ]
    words = (firmware / "cmdline.txt").read_text().split()
    assert f"root=PARTUUID={disk_id}-05" in words
    assert not [w for w in words if w.startswith("init=") or w in FIRST_RUN]


def test_slot_b_is_a_copy_of_slot_a(pi: PiConversion, tmp_path: Path) -> None:
    _, parts = table(pi.output)
    with (
        mounted_read_only(pi.output, parts[5].as_part(), tmp_path / "a") as a,
        mounted_read_only(pi.output, parts[6].as_part(), tmp_path / "b") as b,
    ):
        for name in ("etc/fstab", "etc/otad/otad.conf", "boot/firmware/cmdline.txt",
                     "var/lib/dpkg/status"):  # fmt: skip
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_artifact_verifies_and_is_slot_a(pi: PiConversion) -> None:
    _, parts = table(pi.output)
    with pi.artifact.open("rb") as stream:
        header, files = verify_artifact(stream, VerifyPolicy(keys=(pi.keys.verifier,)))

    assert header.signature is SignatureStatus.VERIFIED
    assert header.compatible_devices == (device_type(pi.architecture),)
    assert files[0].size == parts[5].bytes
    assert files[0].checksum == sha256(pi.output, parts[5].offset, parts[5].bytes)
    assert sha256(pi.stock) == pi.stock_sha256  # the input was never written


def test_the_report_names_what_was_removed_and_kept(pi: PiConversion) -> None:
    assert "MBR" in pi.report
    assert "init=/usr/lib/raspberrypi-sys-mods/firstboot" in pi.report
    assert "rpi-resizerootfs.service" in pi.report
    assert "resize2fs_once" in pi.report
    assert "firstrun.sh" in pi.report


# -- bad input ------------------------------------------------------------------------


def _pi_copy(work: Path, architecture: str = "arm64") -> Path:
    copy = work / "stock-copy.img"
    sh("cp", "--sparse=always", rpi_stock.pi_image(architecture), copy)
    return copy


def _assert_nothing_left(work: Path, output: Path) -> None:
    assert not output.exists()
    assert not output.with_name(output.name.removesuffix(".img") + ".mender").exists()
    assert not [p.name for p in work.iterdir() if ".convert." in p.name]
    assert leftovers(work) == ([], [])


def test_a_pi_image_without_cmdline_txt_is_refused(tmp_path: Path) -> None:
    require_pi_tools()
    image = _pi_copy(tmp_path)
    part = rpi_stock.BOOT[0] * 512
    subprocess.run(["mdel", "-i", f"{image}@@{part}", "::/cmdline.txt"],
                   check=True, env=MTOOLS_ENV)  # fmt: skip
    before = sha256(image)
    output = tmp_path / "out.img"

    result = otad_convert(image, "-o", output, "--verify-key", _public_key(tmp_path))

    assert result.returncode == 1, result.stderr
    assert "has no cmdline.txt" in result.stderr
    assert sha256(image) == before
    _assert_nothing_left(tmp_path, output)


def test_a_converted_pi_image_is_refused_as_input(pi: PiConversion, tmp_path: Path) -> None:
    output = tmp_path / "again.img"
    result = otad_convert(pi.output, "-o", output, "--verify-key", pi.keys.public)

    assert result.returncode == 1
    assert "already has otad's Raspberry Pi A/B layout" in result.stderr
    _assert_nothing_left(tmp_path, output)


def test_grub_is_refused_for_a_pi_image(tmp_path: Path) -> None:
    require_pi_tools()
    output = tmp_path / "out.img"
    result = otad_convert(rpi_stock.pi_image("arm64"), "-o", output, "--bootloader", "grub",
                          "--verify-key", _public_key(tmp_path))  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert "rpi-tryboot" in result.stderr
    _assert_nothing_left(tmp_path, output)


def _public_key(directory: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = directory / "device.pub"
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return path
