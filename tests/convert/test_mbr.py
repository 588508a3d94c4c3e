"""BIOS/MBR Debian images: recognised, planned and converted to the same GPT A/B layout.

The first tests are fast and need no root; the rest convert the installer-like image
of tests/convert/stock_mbr.py once and inspect the result from outside, as
test_conversion.py does for the cloud layout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from convert import grub, layout
from convert.errors import ImageError, NotSupportedYet
from convert.partition import render_script
from convert.rootfs import Kernel
from otad.artifact.reader import SignatureStatus, VerifyPolicy, verify_artifact
from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.grub import COPY_FILES, GrubSlotEntry, parse_copy, render_grub_config
from otad.errors import UsageError
from tests.conftest import KeyPair, require_tool
from tests.convert import stock_mbr
from tests.convert.conftest import (
    STORAGE,
    Conversion,
    esp_read,
    leftovers,
    mounted_read_only,
    otad_convert,
    partitions,
    require_root_and_tools,
    sh,
    sha256,
)

MIB = 1 << 20


def _table(*entries: tuple[int, int, int, str]) -> layout.Table:
    partitions = [
        {"node": f"disk.img{number}", "start": start, "size": size, "type": kind}
        for number, start, size, kind in entries
    ]
    return layout.parse_table({"partitiontable": {"label": "dos", "partitions": partitions}})


INSTALLER = ((1, 2048, 2617344, "83"), (2, 2619392, 526336, "5"), (5, 2621440, 524288, "82"))


def test_an_installer_layout_is_recognised_with_its_swap() -> None:
    found = layout.recognise(_table(*INSTALLER), 1536 * MIB, Path("disk.img"))

    assert found.is_mbr
    assert (found.esp, found.bios_boot) == (None, None)
    assert found.root.number == 1
    assert found.swap is not None
    assert found.swap.number == 5


def test_an_mbr_plan_is_gpt_with_a_new_esp_and_the_swap_before_data() -> None:
    found = layout.recognise(_table(*INSTALLER), 1536 * MIB, Path("disk.img"))
    plan = layout.plan_layout(found, 4 << 30, 128 * MIB)

    names = [p.name for p in plan.partitions]
    assert names == ["esp", "bios-boot", "root-a", "root-b", "swap", "data"]
    assert [p.number for p in plan.partitions] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(plan.partitions, plan.partitions[1:], strict=False):
        assert before.end == after.start
    assert plan.esp.bytes == 128 * MIB
    assert plan.bios_boot.bytes == 3 * MIB
    assert plan.swap is not None
    assert plan.swap.bytes == 256 * MIB
    assert plan.swap.type == layout.SWAP_TYPE
    assert plan.data.end * 512 <= (4 << 30) - layout.GPT_TAIL * 512
    assert "label: gpt" in render_script(plan)


def test_an_mbr_without_swap_plans_data_as_partition_5() -> None:
    found = layout.recognise(_table(INSTALLER[0]), 1536 * MIB, Path("disk.img"))
    plan = layout.plan_layout(found, 4 << 30, 128 * MIB)

    assert found.swap is None
    assert [p.name for p in plan.partitions] == ["esp", "bios-boot", "root-a", "root-b", "data"]
    assert plan.data.number == 5


@pytest.mark.parametrize(
    ("entries", "error", "message"),
    [
        (((1, 2048, 1000000, "83"), (2, 1002048, 1000000, "83")), NotSupportedYet,
         "2 Linux partitions; only a single root"),
        (((1, 2048, 1000000, "82"),), ImageError, "expected an MBR with one Linux root"),
        (((1, 2048, 1000000, "83"), (2, 1002048, 1000, "82"), (3, 1003048, 1000, "82")),
         ImageError, "at most one swap partition"),
        (((1, 2048, 1000000, "83"), (2, 1002048, 1000, "8e")), ImageError, "found partitions"),
        (((1, 2048, 9000000, "83"),), ImageError, "is truncated: partition 1 ends"),
    ],
)  # fmt: skip
def test_mbr_layouts_that_are_refused(
    entries: tuple[tuple[int, int, int, str], ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        layout.recognise(_table(*entries), 1536 * MIB, Path("disk.img"))


def test_slot_entries_name_the_disk_of_the_esp_not_hd0() -> None:
    found = layout.recognise(_table(*INSTALLER), 1536 * MIB, Path("disk.img"))
    plan = layout.plan_layout(found, 4 << 30, 128 * MIB)

    config = grub.render_config(plan, Kernel("/vmlinuz", "/initrd.img", "ro"))

    assert "hd0," not in config
    assert 'set root="(${otad_disk},gpt3)"' in config
    assert 'set root="(${otad_disk},gpt4)"' in config
    assert config.index("regexp --set=1:otad_disk") < config.index("menuentry")


@pytest.mark.parametrize("device", ["(${x},gpt2)'; reboot", "($x,gpt2)", "(${x};reboot)"])
def test_a_device_variable_is_refused_unless_plain(device: str) -> None:
    good = GrubSlotEntry("0fc6", "(hd0,gpt3)")
    with pytest.raises(UsageError, match="GRUB device"):
        render_grub_config("/otad", {Slot.A: GrubSlotEntry("0fc6", device), Slot.B: good})


# The conversion of the installer-like image, inspected from outside.


@pytest.fixture(scope="session")
def mbr_image() -> Path:
    require_root_and_tools()
    return stock_mbr.mbr_image()


@pytest.fixture(scope="session")
def mbr_conversion(
    mbr_image: Path, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]
) -> Conversion:
    work = tmp_path_factory.mktemp("mbr-conversion")
    before = sha256(mbr_image)
    output = work / "device.img"
    result = otad_convert(
        mbr_image, "-o", output, "--storage-size", STORAGE, "--artifact-name", "release-1",
        "--key", keys["ecdsa"].private, "--artifact-compression", "zstd",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return Conversion(
        work, mbr_image, before, output, work / "device.mender", keys["ecdsa"],
        result.stdout, result.stderr, 0.0,
    )  # fmt: skip


@pytest.mark.slow
def test_the_mbr_input_is_untouched_and_nothing_is_left_behind(
    mbr_conversion: Conversion,
) -> None:
    assert sha256(mbr_conversion.stock) == mbr_conversion.stock_sha256
    assert [p.name for p in mbr_conversion.work.iterdir() if p.name.startswith(".")] == []
    assert leftovers(mbr_conversion.work) == ([], [])


@pytest.mark.slow
def test_the_output_is_gpt_with_esp_bios_boot_slots_swap_and_data(
    mbr_conversion: Conversion,
) -> None:
    table = json.loads(sh("sfdisk", "--json", mbr_conversion.output))["partitiontable"]
    parts = partitions(mbr_conversion.output)

    assert table["label"] == "gpt"
    assert list(parts) == ["esp", "bios-boot", "root-a", "root-b", "swap", "data"]
    assert [p.number for p in parts.values()] == [1, 2, 3, 4, 5, 6]
    assert parts["esp"].type == layout.ESP_TYPE
    assert parts["bios-boot"].type == layout.BIOS_BOOT_TYPE
    assert parts["swap"].type == layout.SWAP_TYPE
    assert parts["swap"].size * 512 == stock_mbr.SWAP_SIZE
    assert parts["root-a"].size == parts["root-b"].size
    assert len({p.uuid for p in parts.values()}) == 6
    assert "MBR input: now GPT" in mbr_conversion.report

    def probe(name: str) -> dict[str, str]:
        text = sh("blkid", "-p", "-o", "export", "-O", str(parts[name].offset),
                  mbr_conversion.output)  # fmt: skip
        return dict(line.split("=", 1) for line in text.splitlines())

    a, b, swap, esp = probe("root-a"), probe("root-b"), probe("swap"), probe("esp")
    assert a["TYPE"] == b["TYPE"] == "ext4"
    assert len({a["UUID"], b["UUID"], stock_mbr.ROOT_UUID}) == 3
    assert (swap["TYPE"], swap["UUID"], swap["LABEL"]) == (
        "swap", stock_mbr.SWAP_UUID, stock_mbr.SWAP_LABEL,
    )  # fmt: skip
    assert (esp["TYPE"], esp["VERSION"]) == ("vfat", "FAT32")


@pytest.mark.slow
@pytest.mark.parametrize("slot", ["root-a", "root-b"])
def test_fstab_names_the_new_esp_and_data_and_keeps_the_swap(
    mbr_conversion: Conversion, slot: str, tmp_path: Path
) -> None:
    parts = partitions(mbr_conversion.output)

    with mounted_read_only(mbr_conversion.output, parts[slot], tmp_path / "slot") as root:
        fstab = (root / "etc/fstab").read_text()
        resume = (root / "etc/initramfs-tools/conf.d/resume").read_text()
        assert (root / "boot/efi").is_dir()

    lines = [line.split() for line in fstab.splitlines() if line and not line.startswith("#")]
    by_mount = {fields[1]: fields for fields in lines}
    assert by_mount["/"][0] == "/dev/root"
    assert by_mount["/boot/efi"][:3] == [f"PARTUUID={parts['esp'].uuid}", "/boot/efi", "vfat"]
    assert by_mount["/data"][0] == f"PARTUUID={parts['data'].uuid}"
    assert by_mount["none"][:3] == [f"UUID={stock_mbr.SWAP_UUID}", "none", "swap"]
    assert "/media/cdrom0" in by_mount
    assert stock_mbr.ROOT_UUID not in fstab
    assert resume == f"RESUME=UUID={stock_mbr.SWAP_UUID}\n"


@pytest.mark.slow
def test_the_new_esp_has_efi_grub_the_otad_config_and_the_slot_table(
    mbr_conversion: Conversion,
) -> None:
    parts = partitions(mbr_conversion.output)
    esp = parts["esp"]
    config = esp_read(mbr_conversion.output, esp, grub.EFI_CONFIG).decode()

    for slot, number in (("a", 3), ("b", 4)):
        assert f'set root="(${{otad_disk}},gpt{number})"' in config
        assert f"root=PARTUUID={parts['root-' + slot].uuid} ro quiet console=ttyS0,115200" in config
    for binary in ("EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi"):
        assert esp_read(mbr_conversion.output, esp, binary)[:2] == b"MZ"
    assert esp_read(mbr_conversion.output, esp, "EFI/debian/i386-pc/normal.mod")[:4] == b"\x7fELF"
    for name in COPY_FILES:
        copy = parse_copy(esp_read(mbr_conversion.output, esp, f"EFI/otad/{name}"))
        assert copy is not None
        assert copy.table.default is Slot.A
        assert copy.table.state_of(Slot.A) is SlotBootState.GOOD


@pytest.mark.slow
def test_the_zstd_artifact_verifies_and_holds_slot_a(mbr_conversion: Conversion) -> None:
    parts = partitions(mbr_conversion.output)
    slot_a = parts["root-a"]
    names = sh("tar", "--list", "--file", mbr_conversion.artifact).split()

    with mbr_conversion.artifact.open("rb") as stream:
        header, files = verify_artifact(stream, VerifyPolicy(keys=(mbr_conversion.keys.verifier,)))

    assert "data/0000.tar.zst" in names
    assert header.signature is SignatureStatus.VERIFIED
    assert files[0].size == slot_a.size * 512
    assert files[0].checksum == sha256(mbr_conversion.output, slot_a.offset, slot_a.size * 512)
    assert "timings (" in mbr_conversion.report
    assert "  writing the slots: " in mbr_conversion.report


@pytest.mark.slow
def test_bios_boot_code_loads_a_core_from_the_bios_boot_partition(
    mbr_conversion: Conversion,
) -> None:
    parts = partitions(mbr_conversion.output)
    modules = stock_mbr.tree() / grub.BIOS_MODULES_DIR

    with mbr_conversion.output.open("rb") as disk:
        mbr = disk.read(512)
        gap = disk.read(2047 * 512)
        disk.seek(parts["bios-boot"].offset)
        core = disk.read(parts["bios-boot"].size * 512)
    boot_img = (modules / "boot.img").read_bytes()
    diskboot = (modules / "diskboot.img").read_bytes()

    assert mbr[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert int.from_bytes(mbr[0x5C:0x64], "little") == parts["bios-boot"].start
    assert mbr[450] == 0xEE  # protective MBR: the stock MBR table is gone
    assert core[:0x100] == diskboot[:0x100]
    assert int.from_bytes(core[0x1F4:0x1FC], "little") == parts["bios-boot"].start + 1
    # The stock core.img in the MBR gap was not carried over (sector 1 is the GPT header).
    assert gap[:8] == b"EFI PART"
    assert diskboot[:0x100] not in gap


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mbr_conversion", "conversion"])
def test_grub_boots_slot_a_from_the_disk_of_the_esp_even_as_second_disk(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """grub-emu with the converted image as (hd1): the ESP's config boots slot A from hd1."""
    require_tool("grub-emu")
    converted: Conversion = request.getfixturevalue(which)
    grub_dir = tmp_path / "grub"
    grub_dir.mkdir()
    (grub_dir / "x86_64-emu").symlink_to("/usr/lib/grub/x86_64-emu")
    # grub-emu has no Linux loader: stand-ins say what the default entry would load.
    (grub_dir / "grub.cfg").write_text(
        'function linux { echo "OTAD-LINUX root=$root $*"; '
        "if [ -f $1 ]; then echo OTAD-KERNEL-FOUND; fi; }\n"
        "function initrd { if [ -f $1 ]; then echo OTAD-INITRD-FOUND; fi; halt; }\n"
        "set root=hd1,gpt1\n"
        f"source /{grub.EFI_CONFIG}\n"
    )
    other = tmp_path / "other-disk.img"
    other.write_bytes(b"")
    sh("truncate", "-s", "64M", other)
    (tmp_path / "device.map").write_text(f"(hd0) {other}\n(hd1) {converted.output}\n")

    result = subprocess.run(
        ["grub-emu", "-d", grub_dir, "-m", tmp_path / "device.map"],
        capture_output=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin"},
    )  # fmt: skip
    output = result.stdout.decode("latin-1")
    # grub-emu's terminal wraps lines at 80 columns, between words or inside one.
    unwrapped = "".join(output.split())

    uuid = partitions(converted.output)["root-a"].uuid
    assert f"OTAD-LINUXroot=hd1,gpt3/vmlinuzroot=PARTUUID={uuid}ro" in unwrapped, output[-2000:]
    assert "otad.slot=aOTAD-KERNEL-FOUND" in unwrapped
    assert "OTAD-KERNEL-FOUND" in output
    assert "OTAD-INITRD-FOUND" in output
