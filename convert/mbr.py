"""The MBR layout of Raspberry Pi images: recognising the stock one, planning and writing A/B.

A stock Raspberry Pi OS or Debian Raspberry Pi image has two primary partitions: the
FAT boot partition (mounted at /boot/firmware) and the ext4 root. The A/B layout keeps
what the Pi firmware reads on primary partitions and puts the Linux side in logical
ones, because an MBR holds only four primary partitions:

    1  autoboot  FAT, autoboot.txt only: the firmware reads it from the first partition
    2  boot-a    FAT, slot A's boot files (config.txt, cmdline.txt, kernels, DTBs)
    3  boot-b    FAT, slot B's
    4  (extended partition, to the end of the disk)
    5  root-a    ext4, slot A
    6  root-b    ext4, slot B
    7  data      ext4, otad's state; the last partition, the only one that grows

The firmware only ever loads from partitions 1 to 3 (`boot_partition=` in autoboot.txt
names 2 or 3); the kernel finds its root by PARTUUID, `<disk id>-05` or `-06`, which
works for logical partitions as for primary ones.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from convert.errors import AlreadyConverted, ImageError, NotSupportedYet, TooSmall
from convert.layout import ALIGN, MIB, SECTOR, Partition, Table
from otad.process import run

log = logging.getLogger(__name__)

FAT_TYPES = {"b", "c", "e", "6"}  # FAT32 (CHS, LBA), FAT16 (LBA, CHS)
LINUX = "83"
FAT32_LBA = "c"
EXTENDED_TYPES = {"5", "f", "85"}
AUTOBOOT_BYTES = 16 * MIB  # FAT16 with room to spare for a 100-byte file
# Partition numbers of the A/B layout; otad.conf and autoboot.txt name them.
AUTOBOOT, BOOT_A, BOOT_B, EXTENDED, ROOT_A, ROOT_B, DATA = 1, 2, 3, 4, 5, 6, 7


@dataclass(frozen=True)
class PiStock:
    """The partitions of a recognised stock Raspberry Pi image."""

    boot: Partition
    root: Partition


@dataclass(frozen=True)
class MbrPlan:
    """The A/B layout to write; `uuid` of each partition is its MBR PARTUUID."""

    disk_bytes: int
    disk_id: str  # 8 hex digits
    autoboot: Partition
    boot_a: Partition
    boot_b: Partition
    extended: Partition
    slot_a: Partition
    slot_b: Partition
    data: Partition

    @property
    def partitions(self) -> tuple[Partition, ...]:
        """The partitions that hold filesystems (the extended container left out)."""
        return (self.autoboot, self.boot_a, self.boot_b, self.slot_a, self.slot_b, self.data)

    def partuuid(self, partition: Partition) -> str:
        return f"PARTUUID={partition.uuid}"


def is_pi_layout(table: Table) -> bool:
    """Whether `table` is an MBR with a FAT partition: the Raspberry Pi (and U-Boot) kind."""
    return table.label == "dos" and any(p.type.lower() in FAT_TYPES for p in table.partitions)


def recognise(table: Table, image_bytes: int, source: Path) -> PiStock:
    """The boot and root partitions of a stock Pi image, or an error saying what is wrong."""
    if table.sector_size != SECTOR:
        raise NotSupportedYet(f"{source}: {table.sector_size}-byte sectors are not supported yet")
    for partition in table.partitions:
        if partition.end * SECTOR > image_bytes:
            raise ImageError(
                f"{source} is truncated: partition {partition.number} ends at byte "
                f"{partition.end * SECTOR}, but the image has only {image_bytes} bytes"
            )
    kinds = {p.number: p.type.lower() for p in table.partitions}
    if any(kind in EXTENDED_TYPES for kind in kinds.values()) or len(kinds) > 2:
        raise _unexpected_partitions(source, table)
    boot = next((p for p in table.partitions if p.number == 1), None)
    root = next((p for p in table.partitions if p.number == 2), None)
    if boot is None or root is None or kinds[1] not in FAT_TYPES or kinds[2] != LINUX:
        found = ", ".join(f"{p.number}:{p.type}" for p in table.partitions) or "none"
        raise ImageError(
            f"{source}: unknown Raspberry Pi layout: expected a FAT boot partition 1 and a "
            f"Linux root partition 2 (as Raspberry Pi OS and Debian's Pi images have); "
            f"found partitions {found}"
        )
    return PiStock(boot, root)


def _unexpected_partitions(source: Path, table: Table) -> ImageError:
    """The error for an MBR with more than the two stock partitions."""
    numbers = sorted(p.number for p in table.partitions)
    if numbers == [AUTOBOOT, BOOT_A, BOOT_B, EXTENDED, ROOT_A, ROOT_B, DATA]:
        return AlreadyConverted(f"{source} already has otad's Raspberry Pi A/B layout")
    found = ", ".join(f"{p.number}:{p.type}" for p in table.partitions)
    return ImageError(
        f"{source}: unknown Raspberry Pi layout: expected only a FAT boot partition 1 and a "
        f"Linux root partition 2; found partitions {found}"
    )


def _round_up(sectors: int) -> int:
    return -(-sectors // ALIGN) * ALIGN


def plan_layout(
    stock: PiStock, storage_bytes: int, data_bytes: int, disk_id: str | None = None
) -> MbrPlan:
    """Split `storage_bytes` into autoboot, two boot partitions, two slots and data."""
    disk_id = disk_id or f"{secrets.randbits(32) | 1:08x}"  # 0 means "no id" to some tools
    total = storage_bytes // SECTOR // ALIGN * ALIGN
    boot_size = _round_up(stock.boot.size)
    data_size = _round_up(data_bytes // SECTOR)
    autoboot = _part(disk_id, AUTOBOOT, ALIGN, AUTOBOOT_BYTES // SECTOR, FAT32_LBA, "autoboot")
    boot_a = _part(disk_id, BOOT_A, autoboot.end, boot_size, FAT32_LBA, "boot-a")
    boot_b = _part(disk_id, BOOT_B, boot_a.end, boot_size, FAT32_LBA, "boot-b")
    # Each logical partition is preceded by its extended boot record: one MiB of gap each.
    logical_room = total - boot_b.end - 3 * ALIGN
    slot_size = (logical_room - data_size) // 2 // ALIGN * ALIGN
    if slot_size < 16 * ALIGN:
        raise TooSmall(
            f"storage size {storage_bytes // MIB} MiB leaves no room for two slots: the "
            f"autoboot ({AUTOBOOT_BYTES // MIB} MiB), two boot ({boot_size // ALIGN} MiB "
            f"each) and data ({data_size // ALIGN} MiB) partitions already take most of it; "
            "pass a larger --storage-size or a smaller --data-size"
        )
    extended = Partition(EXTENDED, boot_b.end, total - boot_b.end, "5", None, "extended")
    slot_a = _part(disk_id, ROOT_A, extended.start + ALIGN, slot_size, LINUX, "root-a")
    slot_b = _part(disk_id, ROOT_B, slot_a.end + ALIGN, slot_size, LINUX, "root-b")
    data_start = slot_b.end + ALIGN
    data = _part(disk_id, DATA, data_start, total - data_start, LINUX, "data")
    return MbrPlan(
        total * SECTOR, disk_id, autoboot, boot_a, boot_b, extended, slot_a, slot_b, data
    )


def _part(disk_id: str, number: int, start: int, size: int, kind: str, name: str) -> Partition:
    return Partition(number, start, size, kind, f"{disk_id}-{number:02d}", name)


def render_script(plan: MbrPlan) -> str:
    """The sfdisk script of `plan`, the disk identifier included."""
    lines = ["label: dos", f"label-id: 0x{plan.disk_id}", "unit: sectors", ""]
    ordered = (plan.autoboot, plan.boot_a, plan.boot_b, plan.extended,
               plan.slot_a, plan.slot_b, plan.data)  # fmt: skip
    for partition in ordered:
        lines.append(
            f"{partition.number}: start={partition.start}, size={partition.size}, "
            f"type={partition.type}"
        )
    return "\n".join(lines) + "\n"


def create_disk(image: Path, plan: MbrPlan) -> None:
    """Create the sparse file `image` of the planned size and write the MBR into it."""
    with image.open("xb") as stream:
        stream.truncate(plan.disk_bytes)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        input=render_script(plan).encode())  # fmt: skip
    run(["sfdisk", "--verify", "--quiet", image])
    log.info("wrote the A/B MBR (disk id %s, %d MiB disk)", plan.disk_id, plan.disk_bytes >> 20)


def check_slot_fits(plan: MbrPlan, needed_bytes: int, storage_bytes: int) -> None:
    """TooSmall when the root filesystem needs more than a slot holds."""
    if needed_bytes <= plan.slot_a.bytes:
        return
    shortfall = 2 * (needed_bytes - plan.slot_a.bytes)
    raise TooSmall(
        f"slots of {plan.slot_a.bytes // MIB} MiB cannot hold the root filesystem, which "
        f"needs at least {needed_bytes // MIB} MiB; pass --storage-size "
        f"{-(-(storage_bytes + shortfall) // MIB)}M or more"
    )
