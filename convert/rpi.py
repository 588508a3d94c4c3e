"""What a Raspberry Pi image needs for A/B: its boot files, first-boot hooks and fstab.

The stock boot partition is read with mtools into the work directory; its files go into
the root filesystem's /boot/firmware (so that every artifact carries them: on an
update, otad/bootsync.py fills the target slot's boot partition from there) and from
the finished root into each slot's boot partition, through the same bootsync code the
device runs, with root= set to that slot. Hooks that grow the root partition or change
the disk identifier are removed; those that customise the device for its user stay.
"""

from __future__ import annotations

import importlib.resources
import logging
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convert import filesystems
from convert.errors import ImageError, NotSupportedYet
from convert.fat import MTOOLS_ENV
from convert.layout import Partition
from convert.mbr import BOOT_A, BOOT_B, MbrPlan
from convert.rootfs import (
    DATA_MOUNT,
    check_device_type,
    otad_conf_head,
    write_otad_config,
)
from otad.bootloader.base import Slot
from otad.bootloader.rpi import AUTOBOOT, RpiTrybootBootloader
from otad.bootsync import sync_boot_partition
from otad.process import run

log = logging.getLogger(__name__)

FIRMWARE_MOUNT = "/boot/firmware"
AUTOBOOT_MOUNT = "/boot/autoboot"  # otad.conf's boot_dir: where autoboot.txt is written
REQUIRED_BOOT_FILES = ("cmdline.txt", "config.txt")
# init= programs that resize the root partition or re-randomise the disk identifier
# (Raspberry Pi OS bookworm's firstboot, bullseye's init_resize.sh): with a partition
# after the root and PARTUUIDs in otad.conf, either would break the A/B layout.
RESIZING_INITS = (
    "/usr/lib/raspberrypi-sys-mods/firstboot",
    "/usr/lib/raspi-config/init_resize.sh",
)
# Units that grow the root partition on first boot: masked.
RESIZING_UNITS = ("resize2fs_once.service", "rpi-resizerootfs.service")
SYSV_RESIZE = "etc/init.d/resize2fs_once"
BOOT_MAP = Path("etc/otad/boot-partitions")
GENERATOR = Path("etc/systemd/system-generators/otad-boot-firmware")
HOST_KEYS_UNIT = "otad-ssh-host-keys.service"
BOOT_LABELS = {Slot.A: "BOOT-A", Slot.B: "BOOT-B"}
AUTOBOOT_LABEL = "AUTOBOOT"
PI_WRITTEN_PATHS = (
    "boot", "boot/firmware", "boot/autoboot", "etc/otad", "etc/systemd",
    "etc/systemd/system", "etc/systemd/system-generators", str(GENERATOR), str(BOOT_MAP),
    "etc/systemd/system/multi-user.target.wants", "etc/init.d", SYSV_RESIZE,
)  # fmt: skip


# What Raspberry Pi Imager (and a person) leaves on the boot partition for the first boot
# only: it goes to boot A, which boots first, and not into the root's /boot/firmware, so
# that no update brings it back. Each is consumed (and deleted) by the service named.
FIRST_BOOT_FILES = (
    "firstrun.sh",  # Imager's script, run once through systemd.run= on the command line
    "userconf.txt", "userconf",  # userconf-pi's userconfig.service: the first user
    "ssh", "ssh.txt",  # raspberrypi-sys-mods' sshswitch.service: enables SSH
    "wpa_supplicant.conf",  # older Imager Wi-Fi settings
    "custom.toml",  # newer Imager settings, read by raspberrypi-sys-mods
    "user-data", "meta-data", "network-config",  # cloud-init NoCloud seed
    # Debian's Pi images: rpi-set-sysconf.service applies it on every boot and rewrites it
    # without its settings; kept out of artifacts so that a root_pw= put there before the
    # conversion does not travel in every update (on a slot without it, the service
    # writes a fresh one).
    "sysconf.txt",
)  # fmt: skip
# Command-line words that run firstrun.sh once (the script removes them afterwards).
FIRST_BOOT_WORDS = (
    "systemd.run=", "systemd.run_success_action=", "systemd.run_failure_action=",
    "systemd.unit=kernel-command-line.target",
)  # fmt: skip


@dataclass(frozen=True)
class CmdlineChange:
    text: str  # every slot's command line
    first_boot_text: str  # boot A's, for the first boot: with the first-run words
    removed: tuple[str, ...]


def read_boot_files(image: Path, boot: Partition, target: Path) -> str:
    """Copy the FAT boot partition of `image` into the directory `target`; return its label."""
    fields = filesystems.probe_at(image, boot.offset)
    if fields.get("TYPE") != "vfat":
        raise ImageError(
            f"{image}: partition {boot.number} should hold the FAT boot files, found "
            f"{fields.get('TYPE') or 'no filesystem blkid knows'}"
        )
    target.mkdir()
    spec = f"{image}@@{boot.offset}"
    run(["mcopy", "-s", "-m", "-n", "-i", spec, "::/", target], env=MTOOLS_ENV)
    for name in REQUIRED_BOOT_FILES:
        if not (target / name).is_file():
            raise ImageError(
                f"{image}: the boot partition (partition {boot.number}) has no {name}: not a "
                "Raspberry Pi boot partition, or an incomplete one"
            )
    return fields.get("LABEL", "")


def clean_cmdline(text: str, root: str) -> CmdlineChange:
    """The kernel command line with root= set to `root` and the resizing init= removed."""
    words = text.split()
    if not words:
        raise ImageError("cmdline.txt is empty: no kernel command line to boot a slot with")
    kept: list[str] = []
    removed: list[str] = []
    for word in words:
        name, _, value = word.partition("=")
        if name == "init" and (value in RESIZING_INITS or "resize" in value):
            removed.append(word)
        elif name == "root":
            if f"root={root}" not in kept:
                kept.append(f"root={root}")
        else:
            kept.append(word)
    if f"root={root}" not in kept:
        kept.insert(0, f"root={root}")
    every_boot = [word for word in kept if not word.startswith(FIRST_BOOT_WORDS)]
    return CmdlineChange(" ".join(every_boot) + "\n", " ".join(kept) + "\n", tuple(removed))


def split_first_boot_files(boot_files: Path, target: Path) -> list[str]:
    """Move the first-boot-only files out of `boot_files` into `target`; their names."""
    target.mkdir()
    moved = []
    for name in FIRST_BOOT_FILES:
        for child in boot_files.iterdir():
            if child.name.lower() == name and child.is_file():
                child.rename(target / child.name)
                moved.append(child.name)
    return moved


def add_first_boot_files(disk: Path, boot: Partition, files: Path, cmdline: str) -> None:
    """Put the first-boot files and the first boot's cmdline.txt onto boot partition `boot`."""
    (files / "cmdline.txt").write_text(cmdline)
    spec = f"{disk}@@{boot.offset}"
    for child in sorted(files.iterdir()):
        run(["mcopy", "-o", "-i", spec, child, f"::/{child.name}"], env=MTOOLS_ENV)


def check_boot_mount(root: Path) -> None:
    """Refuse a root whose fstab mounts the FAT boot partition elsewhere than /boot/firmware."""
    fstab = root / "etc/fstab"
    lines = fstab.read_text().splitlines() if fstab.exists() else []
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and not fields[0].startswith("#") and fields[1:3] == ["/boot", "vfat"]:
            raise NotSupportedYet(
                "the image mounts its FAT boot partition at /boot (Raspberry Pi OS "
                "bullseye and older); only /boot/firmware (bookworm) is supported yet"
            )


def rewrite_fstab(root: Path, plan: MbrPlan) -> None:
    """/ as /dev/root, autoboot and data by PARTUUID; /boot/firmware left to the generator."""
    path = root / "etc/fstab"
    lines = path.read_text().splitlines() if path.exists() else []
    taken = ("/", FIRMWARE_MOUNT, AUTOBOOT_MOUNT, DATA_MOUNT)
    kept = []
    root_options = "defaults"
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#") or fields[1] not in taken:
            kept.append(line)
            continue
        if fields[1] == "/" and len(fields) > 3:
            root_options = ",".join(o for o in fields[3].split(",") if o != "x-systemd.growfs")
    entries = [
        "# Written by otad-convert: the root is the slot the firmware booted, and",
        f"# {FIRMWARE_MOUNT} that slot's own boot partition (see /{GENERATOR}).",
        f"/dev/root {'/':<15} ext4 {root_options or 'defaults'} 0 1",
        f"{plan.partuuid(plan.autoboot)} {AUTOBOOT_MOUNT:<15} vfat defaults 0 2",
        f"{plan.partuuid(plan.data)} {DATA_MOUNT:<15} ext4 defaults 0 2",
    ]
    path.write_text("\n".join([*entries, *kept]) + "\n")
    for mountpoint in (FIRMWARE_MOUNT, AUTOBOOT_MOUNT, DATA_MOUNT):
        (root / mountpoint.lstrip("/")).mkdir(parents=True, exist_ok=True)


def install_boot_mount(root: Path, plan: MbrPlan) -> None:
    """The generator that mounts the booted slot's boot partition, and its table."""
    (root / BOOT_MAP).parent.mkdir(parents=True, exist_ok=True)
    (root / BOOT_MAP).write_text(
        "# Written by otad-convert: kernel root= of a slot, and that slot's boot partition.\n"
        f"{plan.partuuid(plan.slot_a)} {plan.partuuid(plan.boot_a)}\n"
        f"{plan.partuuid(plan.slot_b)} {plan.partuuid(plan.boot_b)}\n"
    )
    data = importlib.resources.files("convert") / "data"
    generator = root / GENERATOR
    generator.parent.mkdir(parents=True, exist_ok=True)
    generator.write_bytes((data / "otad-boot-firmware").read_bytes())
    generator.chmod(0o755)


def disable_resize_hooks(root: Path) -> list[str]:
    """Mask the units and remove the SysV script that grow the root; what was found."""
    found = []
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in RESIZING_UNITS:
        present = any(
            (root / directory / unit).exists() or (root / directory / unit).is_symlink()
            for directory in ("lib/systemd/system", "usr/lib/systemd/system", "etc/systemd/system")
        )
        if present:
            found.append(unit)
        for wants in [*units.glob("*.wants"), *units.glob("*.requires")]:
            link = wants / unit
            if link.is_symlink() or link.exists():  # links into the image dangle on the host
                link.unlink()
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    script = root / SYSV_RESIZE
    if script.exists() or script.is_symlink():
        found.append(f"/{SYSV_RESIZE}")
        script.unlink()
    for link in sorted(root.glob("etc/rc?.d/[SK][0-9][0-9]resize2fs_once")):
        link.unlink()
    return found


def install_host_keys_unit(root: Path) -> None:
    """Generate SSH host keys on the first boot, which firstboot did and no longer runs."""
    data = importlib.resources.files("convert") / "data"
    units = root / "etc/systemd/system"
    (units / HOST_KEYS_UNIT).write_bytes((data / HOST_KEYS_UNIT).read_bytes())
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / HOST_KEYS_UNIT).unlink(missing_ok=True)
    (wants / HOST_KEYS_UNIT).symlink_to(f"/etc/systemd/system/{HOST_KEYS_UNIT}")


def copy_boot_files(boot_files: Path, root: Path, cmdline: str) -> None:
    """Put the boot files into the root's /boot/firmware, with the cleaned cmdline.txt."""
    target = root / FIRMWARE_MOUNT.lstrip("/")
    if target.is_symlink():
        raise ImageError(f"{FIRMWARE_MOUNT} in the root filesystem is a symbolic link")
    target.mkdir(parents=True, exist_ok=True)
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    run(["cp", "-r", "--no-preserve=ownership", f"{boot_files}/.", target])
    (target / "cmdline.txt").write_text(cmdline)


def render_otad_conf(plan: MbrPlan, device_type: str, key_names: Sequence[str]) -> str:
    """otad.conf for the Pi layout: the rpi-tryboot backend and a boot partition per slot."""
    return (
        otad_conf_head(device_type, key_names) + "\n[bootloader]\n"
        'backend = "rpi-tryboot"\n'
        f'boot_dir = "{AUTOBOOT_MOUNT}"\n'
        f"partition_a = {BOOT_A}\n"
        f"partition_b = {BOOT_B}\n"
        "\n[slots.a]\n"
        f'root = "{plan.partuuid(plan.slot_a)}"\n'
        f'boot = "{plan.partuuid(plan.boot_a)}"\n'
        "\n[slots.b]\n"
        f'root = "{plan.partuuid(plan.slot_b)}"\n'
        f'boot = "{plan.partuuid(plan.boot_b)}"\n'
    )


def install_otad_config(
    root: Path, plan: MbrPlan, device_type: str, keys: Sequence[tuple[str, bytes]]
) -> None:
    """Write /etc/otad/otad.conf for the Pi layout and the trusted keys in /etc/otad/keys."""
    check_device_type(device_type)
    write_otad_config(root, render_otad_conf(plan, device_type, [n for n, _ in keys]), keys)


def make_boot_partition(rootfs: Path, plan: MbrPlan, slot: Slot, disk: Path, work: Path) -> int:
    """Fill `slot`'s boot partition from /boot/firmware of `rootfs`, as otad does on update."""
    partition = plan.boot_a if slot is Slot.A else plan.boot_b
    root = plan.slot_a if slot is Slot.A else plan.slot_b
    scratch = work / f"boot-{slot.value}.vfat"
    with scratch.open("xb") as stream:
        stream.truncate(partition.bytes)
    run(["mkfs.vfat", "-n", BOOT_LABELS[slot], "-i", _volume_id(), scratch])
    report = sync_boot_partition(rootfs, scratch, cmdline_root=plan.partuuid(root))
    run(["dd", f"if={scratch}", f"of={disk}", "bs=1M", f"seek={partition.offset}",
         "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])  # fmt: skip
    scratch.unlink()
    return report.files


def make_autoboot(plan: MbrPlan, disk: Path, work: Path) -> str:
    """Format the autoboot partition and write autoboot.txt for slot A, as otad reads it."""
    content = work / "autoboot"
    content.mkdir()
    RpiTrybootBootloader(content, {Slot.A: BOOT_A, Slot.B: BOOT_B}).initialize(Slot.A)
    part = plan.autoboot
    run(["mkfs.vfat", "-F", "16", "-n", AUTOBOOT_LABEL, "-i", _volume_id(),
         "--offset", str(part.start), disk, str(part.bytes // 1024)])  # fmt: skip
    run(["mcopy", "-i", f"{disk}@@{part.offset}", content / AUTOBOOT, f"::/{AUTOBOOT}"],
        env=MTOOLS_ENV)  # fmt: skip
    return (content / AUTOBOOT).read_text()


def _volume_id() -> str:
    return f"{secrets.randbits(32):08X}"
