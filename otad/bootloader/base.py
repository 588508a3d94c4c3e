"""The one small interface every bootloader backend implements.

A device has two slots, A and B. At any time one of them is the *default* (the last
good slot, which boots unless a trial is pending). `start_trial(slot)` arranges for the
next boot, and only a bounded number of boots, to try `slot`; if the trial boot fails
(the kernel panics, the watchdog fires, the health check never commits) the bootloader
returns to the default by itself. `mark_good(slot)` makes a slot the default (commit);
`mark_bad(slot)` ends any pending trial of it and keeps it from booting (rollback).

Backends never decide policy: the update engine calls them, in this order, and records
its own state before each call. Every method that changes the bootloader's state must
be power-safe: interrupted at any byte, the bootloader still boots a good slot.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class Slot(enum.Enum):
    """A root filesystem slot; the value is the spelling in files and on D-Bus."""

    A = "a"
    B = "b"

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A


class SlotBootState(enum.Enum):
    """What the bootloader knows of a slot."""

    GOOD = "good"
    BAD = "bad"
    TRIAL = "trial"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class BootStatus:
    """A snapshot of the bootloader's view, read in one go."""

    booted: Slot
    default: Slot
    trial: Slot | None
    trial_boots_left: int | None
    slots: dict[Slot, SlotBootState]

    @property
    def next_boot(self) -> Slot:
        """The slot the next boot will start (the trial slot while one is pending)."""
        if self.trial is not None and (self.trial_boots_left or 0) > 0:
            return self.trial
        return self.default

    @property
    def is_trial_boot(self) -> bool:
        """True when the running system is a trial of a slot that is not yet the default."""
        return self.booted is not self.default and self.slots.get(self.booted) is (
            SlotBootState.TRIAL
        )


class Bootloader(abc.ABC):
    """A bootloader backend; see the module documentation for the contract."""

    name: str

    @abc.abstractmethod
    def status(self) -> BootStatus:
        """Read which slot is booted, which is the default, and any pending trial."""

    @abc.abstractmethod
    def start_trial(self, slot: Slot) -> None:
        """Let the next boot (a bounded number of boots) try `slot`, then fall back."""

    @abc.abstractmethod
    def mark_good(self, slot: Slot) -> None:
        """Make `slot` the default: it boots from now on (commit)."""

    @abc.abstractmethod
    def mark_bad(self, slot: Slot) -> None:
        """End any trial of `slot` and keep it from booting (rollback)."""
