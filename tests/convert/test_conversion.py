"""A stock Debian 12 cloud-like image, converted, inspected from outside."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from convert import grub, rootfs, watchdog
from convert.layout import BIOS_BOOT_TYPE, ESP_TYPE, LINUX_TYPE
from otad.artifact.reader import SignatureStatus, VerifyPolicy, verify_artifact
from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.grub import COPY_FILES, COUNTER_FILE, parse_copy, parse_counter
from otad.config import RefKind, parse_config
from otad.state import Phase, SlotStatus, parse
from tests.conftest import require_tool
from tests.convert import stock, stock_mbr
from tests.convert.conftest import (
    Conversion,
    esp_read,
    leftovers,
    mounted_read_only,
    partitions,
    sh,
    sha256,
)

pytestmark = pytest.mark.slow


def test_the_input_is_byte_identical_and_the_work_directory_is_gone(
    conversion: Conversion,
) -> None:
    assert sha256(conversion.stock) == conversion.stock_sha256
    assert sorted(p.name for p in conversion.work.iterdir() if p.name.startswith(".")) == []
    assert leftovers(conversion.work) == ([], [])
    print(f"conversion took {conversion.seconds:.1f} s")


def test_every_phase_says_when_it_starts_and_ends(conversion: Conversion) -> None:
    # The heartbeat of a phase that outlasts pipeline.HEARTBEAT: test_progress.py.
    for phase in ("copying the root filesystem", "writing and verifying the artifact"):
        assert f"== {phase}\n" in conversion.log
        assert f"   {phase}: done in " in conversion.log


def test_partition_table_is_esp_bios_boot_two_equal_slots_and_data(
    conversion: Conversion,
) -> None:
    table = json.loads(sh("sfdisk", "--json", conversion.output))["partitiontable"]
    parts = partitions(conversion.output)

    assert table["label"] == "gpt"
    assert list(parts) == ["esp", "bios-boot", "root-a", "root-b", "data"]
    assert [p.number for p in parts.values()] == [1, 2, 3, 4, 5]
    assert parts["esp"].type == ESP_TYPE
    assert parts["bios-boot"].type == BIOS_BOOT_TYPE
    assert {parts[n].type for n in ("root-a", "root-b", "data")} == {LINUX_TYPE}
    assert parts["root-a"].size == parts["root-b"].size
    assert parts["esp"].size == stock.ESP[1]
    assert all(p.start % 2048 == 0 for p in parts.values())
    assert conversion.output.stat().st_size == 2200 << 20
    assert len({p.uuid for p in parts.values()}) == 5
    assert "root-a" in conversion.report
    assert "signed" in conversion.report


def test_each_slot_has_its_own_filesystem_uuid(conversion: Conversion) -> None:
    parts = partitions(conversion.output)

    def probe(name: str) -> dict[str, str]:
        text = sh("blkid", "-p", "-o", "export", "-O", str(parts[name].offset), conversion.output)
        return dict(line.split("=", 1) for line in text.splitlines())

    a, b, data = probe("root-a"), probe("root-b"), probe("data")
    assert a["TYPE"] == b["TYPE"] == data["TYPE"] == "ext4"
    assert len({a["UUID"], b["UUID"], data["UUID"], stock.ROOT_UUID}) == 4
    assert data["LABEL"] == "data"
    esp = sh("blkid", "-p", "-o", "value", "-s", "TYPE", "-O", str(parts["esp"].offset),
             conversion.output)  # fmt: skip
    assert esp.strip() == "vfat"


@pytest.mark.parametrize("slot", ["root-a", "root-b"])
def test_slot_is_configured_for_ab(conversion: Conversion, slot: str, tmp_path: Path) -> None:
    parts = partitions(conversion.output)

    with mounted_read_only(conversion.output, parts[slot], tmp_path / "slot") as root:
        fstab = (root / "etc/fstab").read_text()
        config = parse_config((root / "etc/otad/otad.conf").read_text())
        key = (root / "etc/otad/keys" / conversion.keys.public.name).read_bytes()
        grow_unit = root / "etc/systemd/system/local-fs.target.wants/otad-grow-data.service"
        grow_script = root / "usr/local/lib/otad/otad-grow-data"
        assert grow_unit.is_symlink()
        assert grow_script.stat().st_mode & 0o111
        assert (root / "etc/growroot-disabled").exists()
        assert (root / "etc/cloud/cloud.cfg.d/90-otad-no-growroot.cfg").exists()
        assert (root / "etc/systemd/system/systemd-growfs-root.service").readlink() == Path(
            "/dev/null"
        )
        assert (root / "usr/share/doc/otad-test-good/hello").read_text() == "hello\n"
        assert not (root / "usr/sbin/policy-rc.d").exists()
        assert not list((root / "tmp").iterdir())

    lines = [line.split() for line in fstab.splitlines() if line and not line.startswith("#")]
    by_mount = {fields[1]: fields for fields in lines}
    assert by_mount["/"][0] == "/dev/root"
    assert by_mount["/boot/efi"][0] == f"PARTUUID={parts['esp'].uuid}"
    assert by_mount["/data"][0] == f"PARTUUID={parts['data'].uuid}"
    assert "x-systemd.growfs" not in fstab
    assert stock.ROOT_PARTUUID not in fstab
    assert stock.ESP_PARTUUID not in fstab

    assert config.device_type == "qemux86-64"
    assert config.data_dir == Path("/data/otad")
    assert config.bootloader.options == {"env_dir": "/boot/efi/EFI/otad"}
    assert config.slots[Slot.A].root.kind is RefKind.PARTUUID
    assert config.slots[Slot.A].root.value == parts["root-a"].uuid
    assert config.slots[Slot.B].root.value == parts["root-b"].uuid
    assert config.trusted_keys == (Path("/etc/otad/keys") / conversion.keys.public.name,)
    assert key == conversion.keys.public.read_bytes()


def test_without_otads_initramfs_hook_only_systemd_arms_the_watchdog(
    conversion: Conversion, tmp_path: Path
) -> None:
    parts = partitions(conversion.output)

    with mounted_read_only(conversion.output, parts["root-a"], tmp_path / "slot") as root:
        setting = (root / watchdog.SETTING).read_text()
        drop_in = (root / watchdog.DROP_IN).read_text()
        # Rebuilds were deferred while --deb installed, and the conffile put back as it was.
        conf = (root / rootfs.UPDATE_INITRAMFS_CONF).read_bytes()
        assert conf == (stock.stock_tree() / rootfs.UPDATE_INITRAMFS_CONF).read_bytes()

    assert f"\nOTAD_WATCHDOG_SEC={watchdog.DEFAULT_TIMEOUT}\n" in setting
    assert f"\nRuntimeWatchdogSec={watchdog.DEFAULT_TIMEOUT}s\n" in drop_in
    # The conversion installs a test package, not otad: the report says what is missing.
    assert f"not armed earlier: the image has no /{watchdog.HOOK}" in conversion.report
    assert "armed only once systemd starts" in conversion.log


@pytest.mark.parametrize("slot", ["root-a", "root-b"])
def test_overlay_keeps_capabilities_acls_xattrs_links_and_owners(
    conversion: Conversion, slot: str, tmp_path: Path
) -> None:
    parts = partitions(conversion.output)

    with mounted_read_only(conversion.output, parts[slot], tmp_path / "slot") as root:
        tool = root / "usr/local/bin/otad-ping"
        secret = root / "etc/otad-test/secret"
        capabilities = sh("getcap", tool)
        acl = sh("getfacl", "--numeric", "--omit-header", secret)
        xattr = sh("getfattr", "--only-values", "-n", "user.otad", secret)
        assert (root / "usr/local/bin/otad-ping-hardlink").stat().st_ino == tool.stat().st_ino
        assert (root / "usr/local/bin/otad-ping-symlink").readlink() == Path("otad-ping")
        info = secret.stat()

    assert "cap_net_raw=ep" in capabilities
    assert "user:1235:r--" in acl
    assert xattr == "kept"
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (1234, 4321, 0o640)


def test_esp_boots_the_chosen_slot_on_efi_and_bios(conversion: Conversion, tmp_path: Path) -> None:
    parts = partitions(conversion.output)
    esp = parts["esp"]
    config = esp_read(conversion.output, esp, "EFI/debian/grub.cfg").decode()

    assert "configfile $prefix/grub.cfg" not in config  # no longer chain-loads the root
    assert 'otad_load_copy "($root)/EFI/otad/copy1/grubenv"' in config
    for slot, number in (("a", 3), ("b", 4)):
        assert f'set root="(${{otad_disk}},gpt{number})"' in config
        assert f"root=PARTUUID={parts['root-' + slot].uuid} ro " in config
        assert f"otad.slot={slot}" in config
    assert "console=ttyS0,115200" in config
    assert "linux /vmlinuz " in config
    assert "initrd /initrd.img" in config

    copies = [parse_copy(esp_read(conversion.output, esp, f"EFI/otad/{n}")) for n in COPY_FILES]
    assert all(copy is not None for copy in copies)
    for copy in copies:
        assert copy is not None
        assert copy.table.default is Slot.A
        assert copy.table.trial is None
        assert copy.table.state_of(Slot.A) is SlotBootState.GOOD
    assert parse_counter(esp_read(conversion.output, esp, f"EFI/otad/{COUNTER_FILE}"), 0) == 0
    # The stock EFI binaries are still there, and BIOS GRUB's modules are on the ESP.
    assert esp_read(conversion.output, esp, "EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ"
    assert esp_read(conversion.output, esp, "EFI/debian/i386-pc/normal.mod")[:4] == b"\x7fELF"

    with conversion.output.open("rb") as disk:
        mbr = disk.read(512)
        disk.seek(parts["bios-boot"].offset)
        core = disk.read(parts["bios-boot"].size * 512)
    boot_img = Path(stock_mbr.tree() / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    # GRUB's boot code, apart from the BPB and the fields grub-bios-setup patches.
    assert mbr[:3] == boot_img[:3]
    assert mbr[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert int.from_bytes(mbr[0x5C:0x64], "little") == parts["bios-boot"].start
    assert mbr[450] == 0xEE
    assert mbr[510:] == b"\x55\xaa"
    diskboot = (stock_mbr.tree() / "usr/lib/grub/i386-pc/diskboot.img").read_bytes()
    assert core[:0x100] == diskboot[:0x100]
    # diskboot's blocklist, as grub-bios-setup fills it: the rest of the core follows.
    assert int.from_bytes(core[0x1F4:0x1FC], "little") == parts["bios-boot"].start + 1
    assert int.from_bytes(core[0x1FC:0x1FE], "little") > 0
    # The core is the one the converter meant, with the config that finds the ESP.
    esp_uuid = sh("blkid", "-p", "-o", "value", "-s", "UUID", "-O", str(esp.offset),
                  conversion.output).strip()  # fmt: skip
    early = tmp_path / "early.cfg"
    early.write_text(f"search.fs_uuid {esp_uuid} root\nset prefix=($root){grub.BIOS_PREFIX}\n")
    expected = tmp_path / "core.img"
    sh("grub-mkimage", "-O", "i386-pc", "-d", stock_mbr.tree() / grub.BIOS_MODULES_DIR,
       "-c", early, "-p", grub.BIOS_PREFIX, "-o", expected, *grub.BIOS_MODULES)  # fmt: skip
    rebuilt = expected.read_bytes()
    assert core[1024 : len(rebuilt)] == rebuilt[1024:]


def test_data_partition_holds_the_initial_state(conversion: Conversion, tmp_path: Path) -> None:
    parts = partitions(conversion.output)

    with mounted_read_only(conversion.output, parts["data"], tmp_path / "data") as data:
        record = (data / "otad/state.json").read_bytes()
    state = parse(record, "state.json")

    assert state.phase is Phase.IDLE
    assert state.slots[Slot.A].status is SlotStatus.GOOD
    assert state.slots[Slot.B].status is SlotStatus.EMPTY
    release = state.slots[Slot.A].release
    assert release is not None
    assert release.artifact == "release-1"
    assert release.version == "release-1"


def test_artifact_verifies_and_its_payload_is_slot_a(conversion: Conversion) -> None:
    parts = partitions(conversion.output)
    slot_a = parts["root-a"]
    policy = VerifyPolicy(keys=(conversion.keys.verifier,))

    with conversion.artifact.open("rb") as stream:
        header, files = verify_artifact(stream, policy)

    assert header.signature is SignatureStatus.VERIFIED
    assert header.name == "release-1"
    assert header.compatible_devices == ("qemux86-64",)
    assert len(files) == 1
    assert files[0].size == slot_a.size * 512
    # The reader checked the payload against the signed manifest while it streamed.
    assert files[0].checksum == sha256(conversion.output, slot_a.offset, slot_a.size * 512)


def test_the_converted_image_is_refused_as_input(conversion: Conversion, tmp_path: Path) -> None:
    from tests.convert.conftest import leftovers, otad_convert

    result = otad_convert(conversion.output, "-o", tmp_path / "again.img",
                          "--verify-key", conversion.keys.public)  # fmt: skip

    assert result.returncode == 1
    assert "already has otad's A/B layout" in result.stderr
    assert list(tmp_path.iterdir()) == []
    assert leftovers(tmp_path) == ([], [])


def test_a_boot_entry_reads_back_with_debugfs(conversion: Conversion) -> None:
    """The kernel the entries name exists in the slot (read without mounting)."""
    parts = partitions(conversion.output)
    slot_b = parts["root-b"]
    device = sh("losetup", "--find", "--show", "--read-only", "--offset", str(slot_b.offset),
                "--sizelimit", str(slot_b.size * 512), conversion.output).strip()  # fmt: skip
    try:
        link = subprocess.run(["debugfs", "-R", "stat /vmlinuz", device],
                              capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        sh("losetup", "--detach", device)
    assert "Type: symlink" in link.stdout
    assert "boot/vmlinuz-" in link.stdout


def test_real_grub_runs_the_esp_config_and_finds_slot_a_kernel(
    conversion: Conversion, tmp_path: Path
) -> None:
    """grub-emu sees the converted image as (hd0) and runs the ESP's config from it."""
    require_tool("grub-emu")
    grub_dir = tmp_path / "grub"
    grub_dir.mkdir()
    (grub_dir / "x86_64-emu").symlink_to("/usr/lib/grub/x86_64-emu")
    (grub_dir / "grub.cfg").write_text(
        "set root=hd0,gpt1\n"
        "source /EFI/debian/grub.cfg\n"
        'echo "OTAD-RESULT boot=$otad_boot default=$default"\n'
        "if [ -f (hd0,gpt3)/vmlinuz ]; then echo OTAD-KERNEL-A; fi\n"
        "if [ -f (hd0,gpt4)/initrd.img ]; then echo OTAD-INITRD-B; fi\n"
        "halt\n"
    )
    device_map = tmp_path / "device.map"
    device_map.write_text(f"(hd0) {conversion.output}\n")
    before = sha256(conversion.output, 0, 512 << 20)

    result = subprocess.run(
        ["grub-emu", "-d", grub_dir, "-m", device_map],
        capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin"},
    )  # fmt: skip
    output = result.stdout.decode("latin-1")

    assert "OTAD-RESULT boot=a default=otad-a" in output, output[-2000:]
    assert "OTAD-KERNEL-A" in output
    assert "OTAD-INITRD-B" in output
    assert sha256(conversion.output, 0, 512 << 20) == before  # no trial: nothing written
