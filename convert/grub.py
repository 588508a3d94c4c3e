"""otad's A/B integration of GRUB, for both firmware paths, configured from the ESP.

EFI: the stock GRUB binaries on the ESP stay as they are (so a signed boot chain stays
signed); its configuration EFI/debian/grub.cfg, which in a stock image chain-loads the
root's /boot/grub/grub.cfg, is replaced by otad's selection script and one boot entry
per slot. BIOS: a new core image, built in a chroot of the root filesystem from its own
grub-pc-bin modules, is written into the BIOS boot partition by grub-bios-setup; its
embedded config finds the ESP by filesystem UUID and loads the same EFI/debian/grub.cfg.
The slot table lives on the ESP in EFI/otad, the directory otad's GRUB backend writes.

An MBR input has no ESP: the converter makes one, and fills it with GRUB EFI binaries
built in the same chroot from the image's own grub-efi-amd64-bin when it has them
(unsigned: such an image boots under EFI with Secure Boot off), else it boots by BIOS only.

The slot entries name their partitions on the disk that holds the ESP, which is GRUB's
root when the config runs, rather than a fixed hd0: GRUB 2.06 cannot search by PARTUUID,
and a filesystem UUID does not tell the slots apart once an artifact has been installed
(the artifact carries one filesystem, with one UUID, for either slot).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from convert.errors import NotSupportedYet
from convert.fat import FatVolume
from convert.layout import Plan
from convert.mounts import chroot_mounts
from convert.rootfs import ENV_DIR, Kernel
from otad.bootloader.base import Slot
from otad.bootloader.grub import GrubBootloader, GrubSlotEntry, render_grub_config
from otad.process import run

log = logging.getLogger(__name__)

EFI_CONFIG = "EFI/debian/grub.cfg"
EFI_BINARIES = ("EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi", "EFI/debian/shimx64.efi")
EFI_MODULES_DIR = "usr/lib/grub/x86_64-efi"
# Built into a new EFI GRUB (MBR inputs): what otad's script and a Linux boot need.
EFI_MODULES = (
    "part_gpt part_msdos fat ext2 search search_fs_uuid normal configfile linux loadenv "
    "regexp test echo gzio all_video boot minicmd reboot halt"
).split()
EFI_PREFIX = "/EFI/debian"  # where Debian's EFI GRUB reads its config, on the ESP
DISK_VARIABLE = "otad_disk"  # set by the config to the disk of the ESP
BIOS_PREFIX = "/EFI/debian"  # the BIOS core's prefix on the ESP: same config as EFI
BIOS_MODULES_DIR = "usr/lib/grub/i386-pc"
# Embedded in the BIOS core, so that otad's script needs nothing loaded from disk.
BIOS_MODULES = (
    "biosdisk part_gpt fat ext2 search_fs_uuid normal configfile linux loadenv regexp "
    "test echo gzio"
).split()


@dataclass(frozen=True)
class GrubSetup:
    """What was found and done, for the report."""

    efi_binaries: tuple[str, ...]
    bios: bool


def detect(esp: FatVolume) -> tuple[str, ...]:
    """The GRUB EFI binaries on the ESP; NotSupportedYet when it has no GRUB config to replace."""
    binaries = tuple(name for name in EFI_BINARIES if esp.exists(name))
    if not binaries or not esp.exists(EFI_CONFIG):
        raise NotSupportedYet(
            f"the EFI system partition has no GRUB ({EFI_CONFIG} and {EFI_BINARIES[0]} "
            "expected): only GRUB images are supported yet"
        )
    return binaries


def render_config(plan: Plan, kernel: Kernel) -> str:
    """EFI/debian/grub.cfg: otad's selection script and the slot entries."""
    entries = {
        slot: GrubSlotEntry(
            partuuid=str(partition.uuid),
            device=f"(${{{DISK_VARIABLE}}},gpt{partition.number})",
            kernel=kernel.kernel,
            initrd=kernel.initrd,
        )
        for slot, partition in ((Slot.A, plan.slot_a), (Slot.B, plan.slot_b))
    }
    header = (
        "# Written by otad-convert: boots the slot otad's environment in EFI/otad chooses.\n"
        "# Read by GRUB from the ESP on both EFI and BIOS; root is the ESP here, and the\n"
        "# slots are partitions of the disk that holds it (hd0 if root names no disk).\n"
        f"set {DISK_VARIABLE}=hd0\n"
        f"regexp --set=1:{DISK_VARIABLE} '^\\(?([^,()]+),' \"$root\"\n"
    )
    return header + render_grub_config(f"($root)/{ENV_DIR}", entries, kernel.arguments)


def install_efi(esp: FatVolume, plan: Plan, kernel: Kernel, work: Path) -> None:
    """Replace the ESP's GRUB config with otad's and write a fresh slot table (A boots)."""
    # TODO: keep grub-install (run by grub-efi/grub-pc package upgrades inside a slot) from
    # rewriting EFI/debian/grub.cfg and the BIOS core, when devices upgrade packages in place.
    config = work / "grub.cfg"
    config.write_text(render_config(plan, kernel))
    esp.put(config, EFI_CONFIG)
    if esp.exists("EFI/BOOT/grub.cfg"):
        esp.put(config, "EFI/BOOT/grub.cfg")

    environment = work / "otad-env"
    GrubBootloader(environment).initialize(Slot.A)
    esp.make_directory("EFI/otad")
    for child in sorted(environment.iterdir()):
        esp.put(child, f"{ENV_DIR}/{child.name}")
    log.info("GRUB on the ESP: %s and the slot table in %s", EFI_CONFIG, ENV_DIR)


def has_bios_modules(root: Path) -> bool:
    return (root / BIOS_MODULES_DIR / "boot.img").is_file()


def has_efi_modules(root: Path) -> bool:
    return (root / EFI_MODULES_DIR / "linux.mod").is_file()


def prepare_new_esp(esp: FatVolume) -> None:
    """The directories GRUB's config and binaries go to on a freshly made ESP."""
    for directory in ("EFI", "EFI/BOOT", "EFI/debian"):
        esp.make_directory(directory)


def install_efi_binaries(root: Path, esp: FatVolume) -> tuple[str, ...]:
    """Build GRUB for x86_64 EFI in a chroot of `root` and put it where firmware finds it.

    The image loads its config from /EFI/debian on the partition it was loaded from, the
    ESP, like Debian's own GRUB; EFI/BOOT/BOOTX64.EFI is the removable-media path that
    firmware without a boot entry tries.
    """
    # TODO: install shim and Debian's signed GRUB instead, for Secure Boot, when the image
    # has shim-signed and grub-efi-amd64-signed.
    with tempfile.TemporaryDirectory(dir=root / "tmp", prefix="otad-efi.") as scratch:
        inside = Path("/") / Path(scratch).relative_to(root)
        with chroot_mounts(root):
            run(["chroot", root, "grub-mkimage", "-O", "x86_64-efi", "-d", f"/{EFI_MODULES_DIR}",
                 "-p", EFI_PREFIX, "-o", inside / "grubx64.efi", *EFI_MODULES])  # fmt: skip
        binary = Path(scratch) / "grubx64.efi"
        targets = EFI_BINARIES[:2]
        for target in targets:
            esp.put(binary, target)
    log.info("GRUB for EFI: %s, built from the image's grub-efi-amd64-bin", ", ".join(targets))
    return targets


def install_bios(root: Path, root_device: Path, disk: Path, esp: FatVolume, esp_uuid: str) -> None:
    """Build a BIOS core in a chroot of `root` and embed it into `disk`'s BIOS boot partition.

    `root` is mounted from `root_device`; `disk` is a loop device of the output image.
    grub-bios-setup guesses a root device from the directory holding the core, so the
    device map names `root_device` too; it is never written.
    """
    # TODO: mark the protective MBR's partition active, when a boot test on real BIOS
    # firmware shows that one needs it (SeaBIOS does not).
    with tempfile.TemporaryDirectory(dir=root / "tmp", prefix="otad-bios.") as scratch:
        inside = Path("/") / Path(scratch).relative_to(root)
        (Path(scratch) / "early.cfg").write_text(
            f"search.fs_uuid {esp_uuid} root\nset prefix=($root){BIOS_PREFIX}\n"
        )
        (Path(scratch) / "device.map").write_text(f"(hd0) {disk}\n(hd1) {root_device}\n")
        run(["cp", root / BIOS_MODULES_DIR / "boot.img", Path(scratch) / "boot.img"])
        with chroot_mounts(root):
            run(["chroot", root, "grub-mkimage", "-O", "i386-pc", "-d", f"/{BIOS_MODULES_DIR}",
                 "-c", inside / "early.cfg", "-p", BIOS_PREFIX, "-o", inside / "core.img",
                 *BIOS_MODULES])  # fmt: skip
            run(["chroot", root, "/" + BIOS_MODULES_DIR + "/grub-bios-setup",
                 "-d", inside, "-m", inside / "device.map", disk])  # fmt: skip
        modules = Path(scratch) / "i386-pc"
        run(["cp", "-r", root / BIOS_MODULES_DIR, modules])
        for name in ("boot.img", "core.img", "grub-bios-setup", "grub-ntldr-img"):
            (modules / name).unlink(missing_ok=True)
        esp.put(modules, f"{BIOS_PREFIX.lstrip('/')}/i386-pc")
    log.info("GRUB for BIOS: core image in the BIOS boot partition, prefix %s", BIOS_PREFIX)
