"""The state every backend stores, and the transitions start_trial, mark_good, mark_bad.

Backends differ in where they keep it (a JSON file, GRUB environment copies, the U-Boot
environment, autoboot.txt) but not in what a transition means, so it is decided here
once, without I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from otad.bootloader.base import Slot, SlotBootState
from otad.errors import SlotConflict


@dataclass(frozen=True)
class SlotTable:
    """Default slot, pending trial and what is known of each slot."""

    default: Slot
    trial: Slot | None
    states: tuple[tuple[Slot, SlotBootState], ...]

    @classmethod
    def initial(cls, default: Slot) -> SlotTable:
        """A fresh device: `default` is good, the other slot was never booted."""
        table = cls(default, None, ())
        return table.with_state(default, SlotBootState.GOOD).with_state(
            default.other, SlotBootState.UNKNOWN
        )

    def state_of(self, slot: Slot) -> SlotBootState:
        return dict(self.states).get(slot, SlotBootState.UNKNOWN)

    def slot_states(self) -> dict[Slot, SlotBootState]:
        """Each slot's state, TRIAL for the pending trial."""
        states = {slot: self.state_of(slot) for slot in Slot}
        if self.trial is not None:
            states[self.trial] = SlotBootState.TRIAL
        return states

    def with_state(self, slot: Slot, state: SlotBootState) -> SlotTable:
        states = dict(self.states)
        states[slot] = state
        ordered = tuple((each, states[each]) for each in Slot if each in states)
        return replace(self, states=ordered)


def start_trial(table: SlotTable, slot: Slot) -> SlotTable:
    """Arrange a trial of `slot`; it must not be the default (nothing to try)."""
    if slot is table.default:
        raise SlotConflict(f"slot {slot.value} is the default already: there is nothing to try")
    return replace(table.with_state(slot, SlotBootState.TRIAL), trial=slot)


def mark_good(table: SlotTable, slot: Slot) -> SlotTable:
    """Commit `slot`: it becomes the default and any trial ends."""
    return replace(table.with_state(slot, SlotBootState.GOOD), default=slot, trial=None)


def mark_bad(table: SlotTable, slot: Slot) -> SlotTable:
    """Reject `slot`: its trial ends; if it was the default, the other good slot takes over."""
    trial = None if table.trial is slot else table.trial
    default = table.default
    if slot is default:
        if table.state_of(slot.other) is not SlotBootState.GOOD:
            raise SlotConflict(
                f"slot {slot.value} is the default and slot {slot.other.value} is not good: "
                "marking it bad would leave no slot to boot"
            )
        default = slot.other
    return replace(table.with_state(slot, SlotBootState.BAD), default=default, trial=trial)
