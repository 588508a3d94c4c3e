"""Reading a partition table, recognising the stock layout and planning the A/B one.

The table is read with `sfdisk --json` into frozen dataclasses. A stock image is
recognised by its partition types: a GPT cloud layout (an ESP, a BIOS boot partition,
one Linux root) or a BIOS/MBR layout as the Debian installer makes it (one Linux root,
optionally a swap partition, GRUB in the gap after the MBR). Either way the plan is a GPT
with the ESP first (copied, or new for an MBR input), then the BIOS boot partition, slot
A, slot B, the swap partition if the input had one, and the data partition last, so that
the data partition is the one that can grow. An MBR input becomes GPT because both
firmware paths then boot the same way, from the same ESP, as a converted cloud image,
and because the four primary partitions of an MBR cannot hold ESP, two slots, swap and
data without an extended partition.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import AlreadyConverted, ImageError, NotSupportedYet, TooSmall
from otad.process import run

SECTOR = 512
MIB = 1 << 20
ALIGN = MIB // SECTOR  # partitions start and end on 1 MiB boundaries
GPT_TAIL = 34  # sectors the backup GPT needs at the end of the disk

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
# Root partition types of other architectures (discoverable partitions specification).
FOREIGN_ROOT_TYPES = {
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "arm64",
    "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3": "armhf",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "i386",
    "72EC70A6-CF74-40E6-BD49-4BDA08E8F224": "riscv64",
}
SWAP_TYPE = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
MBR_FAT_TYPES = {"b", "c", "e", "6"}
MBR_LINUX_TYPE = "83"
MBR_SWAP_TYPE = "82"
MBR_EXTENDED_TYPES = {"5", "f", "85"}
NEW_ESP_SIZE = 128 * MIB // SECTOR  # an ESP made for an MBR input
NEW_BIOS_BOOT_SIZE = 3 * MIB // SECTOR  # as in Debian's cloud images
SLOT_NAMES = ("root-a", "root-b")


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str
    uuid: str | None = None
    name: str | None = None

    @property
    def offset(self) -> int:
        """Byte offset of the partition in the image."""
        return self.start * SECTOR

    @property
    def bytes(self) -> int:
        return self.size * SECTOR

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size


@dataclass(frozen=True)
class Table:
    label: str
    sector_size: int
    partitions: tuple[Partition, ...]


@dataclass(frozen=True)
class StockLayout:
    """The partitions of a recognised stock image: `esp` and `bios_boot` are None for an
    MBR image (the converter makes them), `swap` is the swap partition the output keeps."""

    root: Partition
    esp: Partition | None
    bios_boot: Partition | None
    swap: Partition | None = None

    @property
    def is_mbr(self) -> bool:
        return self.esp is None


@dataclass(frozen=True)
class Plan:
    """The A/B layout to write: every partition with its number, place and PARTUUID."""

    disk_bytes: int
    esp: Partition
    bios_boot: Partition
    slot_a: Partition
    slot_b: Partition
    data: Partition
    swap: Partition | None = None

    @property
    def partitions(self) -> tuple[Partition, ...]:
        middle = (self.swap,) if self.swap is not None else ()
        return (self.esp, self.bios_boot, self.slot_a, self.slot_b, *middle, self.data)


def read_table(image: Path) -> Table:
    """The partition table of `image`; ImageError if it has none sfdisk can read."""
    result = run(["sfdisk", "--json", image], check=False)
    if result.returncode != 0 or not result.stdout.strip():
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ImageError(
            f"{image} has no partition table sfdisk can read"
            + (f": {detail[-1]}" if detail else "")
        )
    return parse_table(json.loads(result.stdout))


def parse_table(value: dict[str, Any]) -> Table:
    table = value["partitiontable"]
    partitions = []
    for entry in table.get("partitions", []):
        number = re.search(r"([0-9]+)$", entry["node"])
        assert number is not None, entry["node"]
        partitions.append(
            Partition(
                number=int(number[1]),
                start=int(entry["start"]),
                size=int(entry["size"]),
                type=str(entry["type"]).upper(),
                uuid=str(entry["uuid"]).lower() if "uuid" in entry else None,
                name=entry.get("name"),
            )
        )
    return Table(str(table["label"]), int(table.get("sectorsize", SECTOR)), tuple(partitions))


def recognise(table: Table, image_bytes: int, source: Path) -> StockLayout:
    """The stock layout of `table`, or an error that says what kind of image it is."""
    if table.sector_size != SECTOR:
        raise NotSupportedYet(f"{source}: {table.sector_size}-byte sectors are not supported yet")
    if table.label == "dos":
        if any(p.type.lower() == "ee" for p in table.partitions):
            raise ImageError(
                f"{source} has a protective MBR but no GPT sfdisk can read: the image is "
                "truncated or its GPT is damaged"
            )
        if any(p.type.lower() in MBR_FAT_TYPES for p in table.partitions):
            raise NotSupportedYet(
                f"{source} has an MBR table with a FAT boot partition, the layout of Raspberry "
                "Pi and U-Boot boards: converting those is not supported yet"
            )
        _check_not_truncated(table, image_bytes, source)
        return _recognise_bios_mbr(table, source)
    _check_not_truncated(table, image_bytes, source)
    for partition in table.partitions:
        if partition.type in FOREIGN_ROOT_TYPES:
            raise NotSupportedYet(
                f"{source}: partition {partition.number} is a root for "
                f"{FOREIGN_ROOT_TYPES[partition.type]}; only amd64 is supported yet"
            )
    names = {p.name for p in table.partitions}
    if all(name in names for name in SLOT_NAMES):
        raise AlreadyConverted(f"{source} already has otad's A/B layout (partitions {SLOT_NAMES})")

    by_type: dict[str, list[Partition]] = {}
    for partition in table.partitions:
        by_type.setdefault(partition.type, []).append(partition)
    roots = by_type.get(ROOT_X86_64_TYPE, []) + by_type.get(LINUX_TYPE, [])
    esps = by_type.get(ESP_TYPE, [])
    bios = by_type.get(BIOS_BOOT_TYPE, [])
    if len(roots) != 1 or len(esps) != 1 or len(bios) != 1:
        found = ", ".join(f"{p.number}:{p.type}" for p in table.partitions) or "none"
        raise ImageError(
            f"{source}: unknown partition layout: expected one Linux root, one EFI system "
            f"partition and one BIOS boot partition (as in Debian's cloud images); "
            f"found partitions {found}"
        )
    return StockLayout(root=roots[0], esp=esps[0], bios_boot=bios[0])


def _check_not_truncated(table: Table, image_bytes: int, source: Path) -> None:
    for partition in table.partitions:
        if partition.end * SECTOR > image_bytes:
            raise ImageError(
                f"{source} is truncated: partition {partition.number} ends at byte "
                f"{partition.end * SECTOR}, but the image has only {image_bytes} bytes"
            )


def _recognise_bios_mbr(table: Table, source: Path) -> StockLayout:
    """One Linux root and at most one swap partition, as the Debian installer lays out a
    BIOS disk by default; extended partitions only contain them."""
    kinds: dict[str, list[Partition]] = {}
    for partition in table.partitions:
        kind = partition.type.lower()
        if kind in MBR_EXTENDED_TYPES:
            continue
        kinds.setdefault(kind, []).append(partition)
    roots = kinds.pop(MBR_LINUX_TYPE, [])
    swaps = kinds.pop(MBR_SWAP_TYPE, [])
    found = ", ".join(f"{p.number}:{p.type}" for p in table.partitions) or "none"
    if len(roots) > 1:
        raise NotSupportedYet(
            f"{source}: {len(roots)} Linux partitions; only a single root filesystem (with "
            f"/boot inside, the Debian installer's default) is supported yet; found {found}"
        )
    if len(roots) != 1 or len(swaps) > 1 or kinds:
        raise ImageError(
            f"{source}: unknown partition layout: expected an MBR with one Linux root "
            f"(type 83) and at most one swap partition (type 82); found partitions {found}"
        )
    return StockLayout(root=roots[0], esp=None, bios_boot=None, swap=swaps[0] if swaps else None)


def _round_up(sectors: int) -> int:
    return -(-sectors // ALIGN) * ALIGN


def plan_layout(stock: StockLayout, storage_bytes: int, data_bytes: int) -> Plan:
    """Split `storage_bytes` into ESP, BIOS boot, two equal slots, the stock swap partition
    if any, and `data_bytes` of data."""
    total = storage_bytes // SECTOR
    esp_size = _round_up(stock.esp.size if stock.esp is not None else NEW_ESP_SIZE)
    bios_stock = stock.bios_boot.size if stock.bios_boot is not None else NEW_BIOS_BOOT_SIZE
    bios_size = _round_up(max(bios_stock, ALIGN))
    swap_size = _round_up(stock.swap.size) if stock.swap is not None else 0
    data_size = _round_up(data_bytes // SECTOR)
    usable = (total - GPT_TAIL) // ALIGN * ALIGN - ALIGN
    slot_size = (usable - esp_size - bios_size - swap_size - data_size) // 2 // ALIGN * ALIGN
    if slot_size < 16 * ALIGN:
        swap = f", swap ({swap_size // ALIGN} MiB)" if swap_size else ""
        raise TooSmall(
            f"storage size {storage_bytes // MIB} MiB leaves no room for two slots: the ESP "
            f"({esp_size // ALIGN} MiB), BIOS boot ({bios_size // ALIGN} MiB){swap} and data "
            f"({data_size // ALIGN} MiB) partitions already take most of it; pass a larger "
            "--storage-size or a smaller --data-size"
        )
    esp = Partition(1, ALIGN, esp_size, ESP_TYPE, _new_uuid(), "esp")
    bios_boot = Partition(2, esp.end, bios_size, BIOS_BOOT_TYPE, _new_uuid(), "bios-boot")
    slot_a = Partition(3, bios_boot.end, slot_size, LINUX_TYPE, _new_uuid(), SLOT_NAMES[0])
    slot_b = Partition(4, slot_a.end, slot_size, LINUX_TYPE, _new_uuid(), SLOT_NAMES[1])
    swap_part = None
    if swap_size:
        swap_part = Partition(5, slot_b.end, swap_size, SWAP_TYPE, _new_uuid(), "swap")
    data_start = swap_part.end if swap_part is not None else slot_b.end
    data_end = (total - GPT_TAIL) // ALIGN * ALIGN
    data = Partition(
        6 if swap_part else 5, data_start, data_end - data_start, LINUX_TYPE, _new_uuid(), "data"
    )
    return Plan(total * SECTOR, esp, bios_boot, slot_a, slot_b, data, swap_part)


def _new_uuid() -> str:
    return str(uuid.uuid4())


def check_slot_fits(plan: Plan, needed_bytes: int, storage_bytes: int) -> None:
    """TooSmall when the root filesystem needs more than a slot holds."""
    if needed_bytes <= plan.slot_a.bytes:
        return
    shortfall = 2 * (needed_bytes - plan.slot_a.bytes)
    raise TooSmall(
        f"slots of {plan.slot_a.bytes // MIB} MiB cannot hold the root filesystem, which "
        f"needs at least {needed_bytes // MIB} MiB; pass --storage-size "
        f"{-(-(storage_bytes + shortfall) // MIB)}M or more"
    )
