"""The Raspberry Pi tryboot backend (Pi 4, 400, CM4, 5), through autoboot.txt.

The boot-selector FAT partition holds autoboot.txt; each slot has its own FAT boot
partition, and the firmware picks one:

    [all]
    tryboot_a_b=1
    boot_partition=<default slot's partition>
    [tryboot]
    boot_partition=<trial slot's partition, or the default's>

A trial is armed by writing the [tryboot] section and run by rebooting with the
firmware's one-shot tryboot flag (`trial_reboot_argv()`); any later reset without the
flag boots [all] again, so a failed trial falls back by itself. Commit rewrites
[all]. autoboot.txt is replaced atomically (temp file, fsync, rename, fsync of the
directory); otad's view of each slot rides along as a comment the firmware ignores.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from otad.bootloader import slots
from otad.bootloader.base import Bootloader, BootStatus, Slot, SlotBootState
from otad.bootloader.durable import read_bytes, write_atomically
from otad.bootloader.slots import SlotTable
from otad.errors import BootloaderStateError, FirmwareTooOld, UsageError

AUTOBOOT = "autoboot.txt"
DEVICE_TREE = Path("/proc/device-tree")
BOOTLOADER_NODE = "chosen/bootloader"
# tryboot_a_b in autoboot.txt needs a bootloader EEPROM built in 2023 or later.
REQUIRED_BUILD = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)
_STATE_COMMENT = re.compile(r"# otad: a=(\w+) b=(\w+)")


@dataclass(frozen=True)
class Autoboot:
    """What autoboot.txt says: the partition each section boots, and otad's slot states."""

    default_partition: int
    tryboot_partition: int
    states: tuple[tuple[Slot, SlotBootState], ...]


def serialize_autoboot(autoboot: Autoboot) -> bytes:
    states = dict(autoboot.states)
    a, b = (states.get(slot, SlotBootState.UNKNOWN).value for slot in Slot)
    return (
        f"# otad: a={a} b={b}\n"
        "[all]\n"
        "tryboot_a_b=1\n"
        f"boot_partition={autoboot.default_partition}\n"
        "[tryboot]\n"
        f"boot_partition={autoboot.tryboot_partition}\n"
    ).encode()


def firmware_partition(text: str, tryboot: bool) -> int | None:
    """The boot_partition the firmware applies: sections [all] and, on tryboot, [tryboot]."""
    section = "all"
    found: int | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        name, _, value = line.partition("=")
        applies = section == "all" or (tryboot and section == "tryboot")
        if applies and name.strip() == "boot_partition" and value.strip().isdigit():
            found = int(value.strip())
    return found


def parse_autoboot(data: bytes, path: str) -> Autoboot:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BootloaderStateError(path, "autoboot.txt is not ASCII text") from None
    default = firmware_partition(text, tryboot=False)
    tryboot = firmware_partition(text, tryboot=True)
    if default is None or tryboot is None or "tryboot_a_b=1" not in text.split():
        raise BootloaderStateError(path, "no [all] boot_partition with tryboot_a_b=1")

    states: tuple[tuple[Slot, SlotBootState], ...] = ()
    match = _STATE_COMMENT.search(text)
    if match:
        states = tuple(
            (slot, _slot_state(value)) for slot, value in zip(Slot, match.groups(), strict=True)
        )
    return Autoboot(default, tryboot, states)


def _slot_state(value: str) -> SlotBootState:
    try:
        return SlotBootState(value)
    except ValueError:
        return SlotBootState.UNKNOWN


def read_u32(path: Path) -> int | None:
    """A big-endian 32-bit device-tree property, or None when absent."""
    data = read_bytes(path)
    if data is None:
        return None
    if len(data) != 4:
        raise BootloaderStateError(str(path), f"{len(data)} bytes, expected a 4-byte integer")
    return int.from_bytes(data, "big")


def trial_reboot_argv() -> list[str]:
    """The command that reboots into the armed trial (partition 0: as autoboot.txt says)."""
    return ["reboot", "0 tryboot"]


class RpiTrybootBootloader(Bootloader):
    """Slots as boot partitions, chosen by the firmware from autoboot.txt."""

    name = "rpi-tryboot"

    def __init__(
        self,
        boot_dir: Path,
        partitions: Mapping[Slot, int],
        device_tree: Path = DEVICE_TREE,
    ) -> None:
        if set(partitions) != set(Slot) or partitions[Slot.A] == partitions[Slot.B]:
            raise UsageError("give each slot its own boot partition number")
        if not all(1 < number < 100 for number in partitions.values()):
            raise UsageError(f"boot partitions must be 2 to 99, got {dict(partitions)}")
        self.boot_dir = boot_dir
        self.partitions = dict(partitions)
        self.device_tree = device_tree

    @property
    def path(self) -> Path:
        return self.boot_dir / AUTOBOOT

    def initialize(self, default: Slot = Slot.A) -> None:
        """Write autoboot.txt for a fresh device that boots `default`."""
        self._write(SlotTable.initial(default))

    def check_firmware(self) -> None:
        """Raise FirmwareTooOld unless the bootloader supports tryboot_a_b."""
        node = self.device_tree / BOOTLOADER_NODE
        stamp = read_u32(node / "build-timestamp")
        required = REQUIRED_BUILD.date().isoformat()
        if stamp is None:
            raise FirmwareTooOld("tryboot_a_b", f"no build-timestamp in {node}", required)
        built = datetime.datetime.fromtimestamp(stamp, tz=datetime.UTC)
        if built < REQUIRED_BUILD:
            raise FirmwareTooOld("tryboot_a_b", built.date().isoformat(), required)

    def status(self) -> BootStatus:
        autoboot = self._read()
        table = self._table(autoboot)
        node = self.device_tree / BOOTLOADER_NODE
        partition = read_u32(node / "partition")
        tryboot = read_u32(node / "tryboot")
        booted = self._slot_of(partition, str(node / "partition"))
        left = None
        if table.trial is not None:
            # The tryboot flag is one-shot: once the trial is running, none is left.
            left = 0 if tryboot and booted is table.trial else 1
        return BootStatus(booted, table.default, table.trial, left, table.slot_states())

    def start_trial(self, slot: Slot) -> None:
        self.check_firmware()
        self._write(slots.start_trial(self._table(self._read()), slot))

    def mark_good(self, slot: Slot) -> None:
        self._write(slots.mark_good(self._table(self._read()), slot))

    def mark_bad(self, slot: Slot) -> None:
        self._write(slots.mark_bad(self._table(self._read()), slot))

    def _table(self, autoboot: Autoboot) -> SlotTable:
        default = self._slot_of(autoboot.default_partition, str(self.path))
        trial = self._slot_of(autoboot.tryboot_partition, str(self.path))
        table = SlotTable(default, trial if trial is not default else None, ())
        for slot, state in autoboot.states:
            table = table.with_state(slot, state)
        return table

    def _slot_of(self, partition: int | None, source: str) -> Slot:
        for slot, number in self.partitions.items():
            if number == partition:
                return slot
        raise BootloaderStateError(
            source, f"partition {partition} is no slot's, expected one of {self.partitions}"
        )

    def _read(self) -> Autoboot:
        data = read_bytes(self.path)
        if data is None:
            raise BootloaderStateError(str(self.path), "missing: the trial setup is not installed")
        return parse_autoboot(data, str(self.path))

    def _write(self, table: SlotTable) -> None:
        tryboot = table.trial or table.default
        autoboot = Autoboot(self.partitions[table.default], self.partitions[tryboot], table.states)
        write_atomically(self.path, serialize_autoboot(autoboot))
