"""The engine's durable state: one small JSON record in the data directory.

The record is rewritten atomically (temporary file, fsync, rename, fsync of the
directory) before every step that changes the device, so after a power cut or a kill
the engine finds either the old record or the new one, never a mix, and knows what it
was doing. Each phase has a defined recovery (see otad.engine). An install from a URL
keeps a second record beside this one, written the same way (`write_atomically`), with
what it needs to resume after a restart (otad.resume).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from otad.bootloader.base import Slot
from otad.errors import StateCorrupt

log = logging.getLogger(__name__)

FORMAT = 1
FILE_NAME = "state.json"


class Phase(enum.Enum):
    """Where the engine is; the value is the on-disk spelling."""

    IDLE = "idle"
    INSTALLING = "installing"  # writing the target slot
    INSTALLED = "installed"  # target verified, trial boot requested, waiting for reboot
    TRIAL = "trial"  # running the target on trial, waiting for commit or rollback


class SlotStatus(enum.Enum):
    GOOD = "good"
    BAD = "bad"
    TRIAL = "trial"
    EMPTY = "empty"


@dataclass(frozen=True)
class Release:
    """What a slot holds: the artifact's name, version and provides."""

    artifact: str
    version: str | None = None
    provides: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlotRecord:
    status: SlotStatus
    release: Release | None = None


@dataclass(frozen=True)
class Outcome:
    """How the last operation ended."""

    operation: str
    success: bool
    message: str
    artifact: str | None = None
    time: float = 0.0


@dataclass(frozen=True)
class State:
    phase: Phase
    slots: Mapping[Slot, SlotRecord]
    target: Slot | None = None
    transaction: str | None = None
    rollback_requested: bool = False
    # Why the rollback was requested, when not by a person: reported after the reboot.
    rollback_reason: str = ""
    recovery_attempts: int = 0
    # The kernel's boot ID when the phase was entered: tells a restart of the daemon
    # (same boot) from a reboot.
    boot_id: str | None = None
    # For a payload installed by an update module (no slot is written): the module's
    # payload type, and the release the running slot will hold once it is committed.
    module: str | None = None
    pending: Release | None = None
    last: Outcome | None = None

    def with_slot(self, slot: Slot, record: SlotRecord) -> State:
        return replace(self, slots={**self.slots, slot: record})

    def finished(self, outcome: Outcome) -> State:
        """Back to idle with `outcome` recorded."""
        return replace(
            self,
            phase=Phase.IDLE,
            target=None,
            transaction=None,
            rollback_requested=False,
            rollback_reason="",
            recovery_attempts=0,
            boot_id=None,
            module=None,
            pending=None,
            last=replace(outcome, time=outcome.time or time.time()),
        )


def initial_state(booted: Slot, release: Release | None) -> State:
    """The state of a device otad has never updated: the booted slot is good."""
    return State(
        phase=Phase.IDLE,
        slots={
            booted: SlotRecord(SlotStatus.GOOD, release),
            booted.other: SlotRecord(SlotStatus.EMPTY),
        },
    )


def _release_to_json(release: Release | None) -> dict[str, Any] | None:
    if release is None:
        return None
    return {
        "artifact": release.artifact,
        "version": release.version,
        "provides": dict(release.provides),
    }


def serialize(state: State) -> bytes:
    value = {
        "format": FORMAT,
        "phase": state.phase.value,
        "target": state.target.value if state.target else None,
        "transaction": state.transaction,
        "rollback_requested": state.rollback_requested,
        "rollback_reason": state.rollback_reason,
        "recovery_attempts": state.recovery_attempts,
        "boot_id": state.boot_id,
        "module": state.module,
        "pending": _release_to_json(state.pending),
        "slots": {
            slot.value: {"status": record.status.value, "release": _release_to_json(record.release)}
            for slot, record in sorted(state.slots.items(), key=lambda item: item[0].value)
        },
        "last": None
        if state.last is None
        else {
            "operation": state.last.operation,
            "success": state.last.success,
            "message": state.last.message,
            "artifact": state.last.artifact,
            "time": state.last.time,
        },
    }
    return json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"


def _release_from_json(value: Any) -> Release | None:
    if value is None:
        return None
    provides = value.get("provides") or {}
    if not isinstance(value["artifact"], str) or not isinstance(provides, dict):
        raise TypeError("release")
    return Release(value["artifact"], value.get("version"), dict(provides))


def parse(data: bytes, source: str) -> State:
    """Parse a state record; StateCorrupt for anything that is not one."""
    try:
        value = json.loads(data)
        if value.get("format") != FORMAT:
            raise StateCorrupt(f"{source}: format {value.get('format')!r}, expected {FORMAT}")
        last = value.get("last")
        slots = {
            Slot(name): SlotRecord(
                SlotStatus(entry["status"]), _release_from_json(entry["release"])
            )
            for name, entry in value["slots"].items()
        }
        if set(slots) != set(Slot):
            raise StateCorrupt(f"{source}: records for slots {sorted(value['slots'])}")
        return State(
            phase=Phase(value["phase"]),
            slots=slots,
            target=Slot(value["target"]) if value.get("target") else None,
            transaction=value.get("transaction"),
            rollback_requested=bool(value.get("rollback_requested", False)),
            rollback_reason=str(value.get("rollback_reason") or ""),
            recovery_attempts=int(value.get("recovery_attempts", 0)),
            boot_id=value.get("boot_id"),
            module=value.get("module"),
            pending=_release_from_json(value.get("pending")),
            last=None
            if last is None
            else Outcome(
                str(last["operation"]),
                bool(last["success"]),
                str(last["message"]),
                last.get("artifact"),
                float(last.get("time", 0.0)),
            ),
        )
    except StateCorrupt:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StateCorrupt(f"{source} is not a valid state record: {error!r}") from None


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old file or the new one.

    Temporary file in the same directory, fsync, rename over `path`, fsync the directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(descriptor, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync `directory`, making a rename or an unlink in it durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateStore:
    """Loads and atomically saves the state record in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME

    def load(self) -> State | None:
        """The saved state, or None if there is none yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return parse(data, str(self.path))

    def save(self, state: State) -> None:
        write_atomically(self.path, serialize(state))
        log.info(
            "state saved: %s%s",
            state.phase.value,
            f" (slot {state.target.value})" if state.target else "",
        )

    def quarantine(self) -> Path:
        """Move a corrupt record aside, keeping it for inspection; return its new path."""
        aside = self.path.with_name(f"{FILE_NAME}.corrupt-{int(time.time())}")
        os.replace(self.path, aside)
        return aside
