"""The phases of converting a Raspberry Pi image (MBR, FAT boot partition, ext4 root).

Called by convert.pipeline once the input's partition table shows the Pi layout, inside
its work directory, so that a failure here leaves nothing behind either. The phases:
read the boot files; copy the root out and resize it to a slot; change the root (install
--deb packages, with qemu-user-static for a foreign architecture; the overlay; fstab,
first-boot hooks, otad.conf, the boot files into /boot/firmware; for Debian's own Pi
images also their labels checked and the raspi-firmware hook and initrd made A/B-safe,
see convert/rpi_debian.py); write the MBR and both slots; fill each slot's boot
partition from the root as otad does on an update; write autoboot.txt; the artifact;
the data partition.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from convert import emulation, filesystems, mbr, rootfs, rpi, rpi_debian
from convert.errors import AlreadyConverted, ImageError
from convert.layout import MIB, Table
from convert.mbr import MbrPlan
from convert.mounts import loop_device, mounted
from convert.pipeline import Options, _added_bytes, _finish, _Keys, _phase
from convert.report import Report
from otad.bootloader.base import Slot
from otad.bootsync import TOOLS as BOOTSYNC_TOOLS
from otad.errors import UsageError
from otad.process import require_tools

log = logging.getLogger(__name__)

TOOLS = (*BOOTSYNC_TOOLS, "mkfs.vfat", "dd")


def convert_pi(
    options: Options,
    keys: _Keys,
    raw: Path,
    table: Table,
    work: Path,
    output: Path,
    artifact: Path,
) -> Report:
    """Convert the Pi image `raw` (with partition table `table`) into `output` and `artifact`."""
    require_tools(*TOOLS)
    if options.bootloader not in ("auto", "rpi-tryboot"):
        raise UsageError(
            f"{options.input} is a Raspberry Pi image: its bootloader backend is rpi-tryboot, "
            f"not {options.bootloader}"
        )
    changes: list[str] = []
    with _phase("reading the boot partition"):
        stock = mbr.recognise(table, raw.stat().st_size, options.input)
        plan = mbr.plan_layout(stock, options.storage_size, options.data_size)
        boot_files = work / "bootfs"
        labels = (
            rpi.read_boot_files(raw, stock.boot, boot_files),
            filesystems.probe_at(raw, stock.root.offset).get("LABEL", ""),
        )
        first_boot = rpi.split_first_boot_files(boot_files, work / "first-boot")
        cmdline = rpi.clean_cmdline(
            (boot_files / "cmdline.txt").read_text(errors="replace"), plan.partuuid(plan.slot_a)
        )

    with _phase("copying the root filesystem"):
        root_fs = work / "rootfs.ext4"
        filesystems.extract_root(raw, stock.root, root_fs)
        boot_bytes = sum(p.stat().st_size for p in boot_files.rglob("*") if p.is_file())
        needed = filesystems.used_bytes(root_fs) + _added_bytes(options) + boot_bytes
        mbr.check_slot_fits(plan, needed, options.storage_size)
        filesystems.resize(root_fs, plan.slot_a.bytes)

    device_type, relabel = _change_root(
        options, keys, plan, root_fs, boot_files, cmdline, labels, work, changes
    )
    if relabel:
        rpi_debian.clear_root_label(root_fs)
        changes.append(
            f"the root's label {labels[1]} removed (both slots would carry it); each slot's "
            f"root is found by PARTUUID, the boot partitions are {rpi.BOOT_LABELS[Slot.A]} "
            f"and {rpi.BOOT_LABELS[Slot.B]} (stock: {labels[0] or 'no label'})"
        )

    with _phase("writing the MBR and the slots"):
        disk = work / "output.img"
        mbr.create_disk(disk, plan)
        _write_slots(root_fs, disk, plan, work)
        changes.append("slots A and B: copies of the root with their own filesystem UUIDs")

    with _phase("filling the boot partitions and autoboot.txt"):
        for slot in Slot:
            files = rpi.make_boot_partition(root_fs, plan, slot, disk, work)
            changes.append(
                f"boot {slot.value.upper()} (partition "
                f"{plan.boot_a.number if slot is Slot.A else plan.boot_b.number}): {files} "
                f"files from {rpi.FIRMWARE_MOUNT}, cmdline.txt root="
                f"{plan.partuuid(plan.slot_a if slot is Slot.A else plan.slot_b)}"
            )
        rpi.add_first_boot_files(disk, plan.boot_a, work / "first-boot", cmdline.first_boot_text)
        words = [w for w in cmdline.first_boot_text.split() if w.startswith(rpi.FIRST_BOOT_WORDS)]
        changes.append(
            f"boot A only, for the first boot: {', '.join(first_boot) or 'no first-boot files'}"
            f"; in its cmdline.txt {' '.join(words) or 'no first-run words'}"
        )
        rpi.make_autoboot(plan, disk, work)
        changes.append(
            f"autoboot (partition {plan.autoboot.number}): autoboot.txt, tryboot_a_b=1, "
            f"boot_partition={plan.boot_a.number} (slot A), trial [tryboot] section"
        )

    _finish(options, device_type, keys, root_fs, disk, plan.data, work, output, artifact,
            changes)  # fmt: skip
    return Report(output, artifact, options.artifact_name, keys.signer is not None, plan, changes)


def _change_root(
    options: Options,
    keys: _Keys,
    plan: MbrPlan,
    root_fs: Path,
    boot_files: Path,
    cmdline: rpi.CmdlineChange,
    labels: tuple[str, str],
    work: Path,
    changes: list[str],
) -> tuple[str, bool]:
    """Every change inside the root filesystem. Returns the device type
    (`options.device_type` or, when that is None, "raspberrypi-" and the root's Debian
    architecture) and whether the stock image named its root by label."""
    with contextlib.ExitStack() as stack:
        device = stack.enter_context(loop_device(root_fs))
        root = stack.enter_context(mounted(device, work / "root"))
        architecture = _check_convertible(root)
        stock_cmdline = (boot_files / "cmdline.txt").read_text(errors="replace")
        uses = rpi_debian.label_uses(root, stock_cmdline)
        rpi_debian.check_labels(uses, *labels)
        device_type = options.device_type or f"raspberrypi-{architecture}"
        if options.debs:
            with _phase("installing packages"):
                emulation.enable(architecture, root)
                rootfs.install_debs(root, options.debs)
                how = " through qemu-user-static" if emulation.is_foreign(architecture) else ""
                changes.append(f"installed {', '.join(d.name for d in options.debs)}{how}")
        if options.overlay is not None:
            with _phase("copying the overlay"):
                rootfs.copy_overlay(root, options.overlay)
                changes.append(f"copied the overlay {options.overlay}")
        with _phase("configuring the root filesystem for A/B"):
            rpi.check_boot_mount(root)
            rpi.rewrite_fstab(root, plan)
            rpi.install_boot_mount(root, plan)
            masked = rpi.disable_resize_hooks(root)
            rootfs.disable_root_growth(root)
            rootfs.install_data_growth(root)
            rpi.install_host_keys_unit(root)
            rpi.install_otad_config(root, plan, device_type, keys.files)
            rpi.copy_boot_files(boot_files, root, cmdline.text)
            hooked = rpi_debian.has_firmware_hook(root)
            stock_rootpart = rpi_debian.point_hook_at_booted_slot(root, plan)
            initrds = rpi_debian.neutralize_initrd_resize(root) if hooked else []
            changes += [
                f"cmdline.txt: root={plan.partuuid(plan.slot_a)} (each boot partition its "
                f"slot's); removed: {' '.join(cmdline.removed) or 'nothing'}",
                "fstab: / is /dev/root; autoboot and /data by PARTUUID; /boot/firmware is the "
                f"booted slot's boot partition (/{rpi.GENERATOR}, /{rpi.BOOT_MAP})",
                "root growth off: masked "
                + ", ".join([*masked, "systemd-growfs-root", "systemd-repart"])
                + f"; growroot and cloud-init growpart off; {rootfs.GROW_UNIT} grows the "
                "data partition on first boot",
                f"{rpi.HOST_KEYS_UNIT}: SSH host keys on first boot (firstboot did it)",
                f"/{rootfs.OTAD_CONF} (rpi-tryboot, boot_dir {rpi.AUTOBOOT_MOUNT}) and "
                f"{len(keys.files)} trusted key(s) in /{rootfs.KEYS_DIR}",
                f"{rpi.FIRMWARE_MOUNT} in the root holds the boot files, so artifacts carry them",
            ]
            if initrds:
                changes.append(
                    f"initrd resize of the root off: {rpi_debian.RESIZE_SCRIPT} (image-specs' "
                    f"rpi-resizerootfs) overridden by a script that does nothing, in "
                    f"{', '.join(initrds)}"
                )
            if hooked:
                changes.append(
                    f"/{rpi_debian.FIRMWARE_DEFAULTS}: ROOTPART (stock: "
                    f"{stock_rootpart or 'unset'}) is now the booted slot's root= from "
                    "/proc/cmdline, so that raspi-firmware's kernel and initramfs hooks "
                    f"rewrite the booted slot's cmdline.txt with its own root"
                )
            if options.watchdog:
                # TODO: arm the watchdog from the initramfs of Debian's Pi images, which
                # boot one (Raspberry Pi OS boots straight into the root), when the
                # converter can rebuild an arm64 initramfs under qemu-user in good time.
                changes.append("watchdog: not armed before systemd (on PCs otad arms it in "
                               "the initramfs; not yet on a Pi)")  # fmt: skip
    return device_type, any(use.is_root for use in uses)


def _check_convertible(root: Path) -> str:
    """The root's Debian architecture; refuse links where the converter writes, or otad."""
    for relative in (*rootfs.WRITTEN_PATHS, *rpi.PI_WRITTEN_PATHS):
        if (root / relative).is_symlink():
            raise ImageError(
                f"/{relative} in the root filesystem is a symbolic link; otad-convert writes "
                "there and does not follow links that could lead out of the image"
            )
    if (root / rootfs.OTAD_CONF).exists():
        raise AlreadyConverted(f"the root filesystem already has /{rootfs.OTAD_CONF}")
    return rootfs._elf_machine(root / "usr/bin/dpkg")


def _write_slots(root_fs: Path, disk: Path, plan: MbrPlan, work: Path) -> None:
    filesystems.check(root_fs, "the converted root")
    filesystems.set_uuid(root_fs, filesystems.new_uuid())
    filesystems.write_into(root_fs, disk, plan.slot_a)
    slot_b = work / "rootfs-b.ext4"
    filesystems.copy_sparse(root_fs, slot_b)
    filesystems.set_uuid(slot_b, filesystems.new_uuid())
    filesystems.write_into(slot_b, disk, plan.slot_b)
    slot_b.unlink()
    log.info("slots of %d MiB written", plan.slot_a.bytes // MIB)
