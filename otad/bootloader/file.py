"""A bootloader backend kept in one JSON file, for tests of the update engine.

It behaves like the real backends: a default slot, a trial with a bounded number of
boots, and a fall back to the default once they are used up. `simulate_boot()` plays
the firmware's part at power-on; `set_booted()` lets a test pretend a slot is running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from otad.bootloader import slots
from otad.bootloader.base import Bootloader, BootStatus, Slot, SlotBootState
from otad.bootloader.durable import read_bytes, write_atomically
from otad.bootloader.slots import SlotTable
from otad.errors import BootloaderStateError, UsageError

FORMAT = 1


@dataclass(frozen=True)
class FileState:
    """The content of the state file."""

    table: SlotTable
    trial_boots_left: int | None
    booted: Slot


def serialize_state(state: FileState) -> bytes:
    record = {
        "format": FORMAT,
        "booted": state.booted.value,
        "default": state.table.default.value,
        "trial": state.table.trial.value if state.table.trial else None,
        "trial_boots_left": state.trial_boots_left,
        "slots": {slot.value: value.value for slot, value in state.table.states},
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def parse_state(data: bytes, path: str) -> FileState:
    """The state in `data`; BootloaderStateError names what is wrong."""
    try:
        record = json.loads(data)
        if record["format"] != FORMAT:
            raise BootloaderStateError(path, f"format {record['format']}, expected {FORMAT}")
        trial = record["trial"]
        left = record["trial_boots_left"]
        if left is not None and (not isinstance(left, int) or left < 0):
            raise BootloaderStateError(path, f"trial_boots_left is {left!r}")
        states = tuple(
            (Slot(name), SlotBootState(value)) for name, value in sorted(record["slots"].items())
        )
        table = SlotTable(Slot(record["default"]), Slot(trial) if trial else None, states)
        return FileState(table, left, Slot(record["booted"]))
    except BootloaderStateError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise BootloaderStateError(path, f"not a valid state file: {err!r}") from err


class FileBootloader(Bootloader):
    """The bootloader backend for tests; its whole state is one file."""

    name = "file"

    def __init__(self, path: Path, trial_boots: int = 3) -> None:
        if trial_boots < 1:
            raise UsageError(f"trial_boots must be at least 1, got {trial_boots}")
        self.path = path
        self.trial_boots = trial_boots

    def initialize(self, default: Slot = Slot.A) -> None:
        """Write the state of a freshly installed device that runs `default`."""
        self._write(FileState(SlotTable.initial(default), None, default))

    def status(self) -> BootStatus:
        state = self._read()
        return BootStatus(
            booted=state.booted,
            default=state.table.default,
            trial=state.table.trial,
            trial_boots_left=state.trial_boots_left if state.table.trial else None,
            slots=state.table.slot_states(),
        )

    def start_trial(self, slot: Slot) -> None:
        state = self._read()
        table = slots.start_trial(state.table, slot)
        self._write(replace(state, table=table, trial_boots_left=self.trial_boots))

    def mark_good(self, slot: Slot) -> None:
        state = self._read()
        self._write(replace(state, table=slots.mark_good(state.table, slot), trial_boots_left=None))

    def mark_bad(self, slot: Slot) -> None:
        state = self._read()
        table = slots.mark_bad(state.table, slot)
        left = state.trial_boots_left if table.trial else None
        self._write(replace(state, table=table, trial_boots_left=left))

    def simulate_boot(self) -> Slot:
        """Power on: pick the slot as firmware would, spend one trial boot, return the slot."""
        state = self._read()
        left = state.trial_boots_left
        if state.table.trial is not None and left:
            booted, left = state.table.trial, left - 1
        else:
            booted = state.table.default
        self._write(replace(state, trial_boots_left=left, booted=booted))
        return booted

    def set_booted(self, slot: Slot) -> None:
        """Pretend `slot` is running, whatever the firmware would have chosen."""
        self._write(replace(self._read(), booted=slot))

    def _read(self) -> FileState:
        data = read_bytes(self.path)
        if data is None:
            raise BootloaderStateError(str(self.path), "no bootloader state: not initialized")
        return parse_state(data, str(self.path))

    def _write(self, state: FileState) -> None:
        write_atomically(self.path, serialize_state(state))
