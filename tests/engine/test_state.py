"""The state record: golden form, round trip, atomic replacement, corrupt input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.errors import StateCorrupt
from otad.state import (
    Outcome,
    Phase,
    Release,
    SlotRecord,
    SlotStatus,
    State,
    StateStore,
    initial_state,
    parse,
    serialize,
)

TRIAL = State(
    phase=Phase.TRIAL,
    slots={
        Slot.A: SlotRecord(
            SlotStatus.GOOD, Release("release-1", "1.0", {"artifact_name": "release-1"})
        ),
        Slot.B: SlotRecord(SlotStatus.TRIAL, Release("release-2", "2.0")),
    },
    target=Slot.B,
    transaction="0123abcd",
    boot_id="6f1d",
    last=Outcome("commit", True, "slot a committed", "release-1", 1700000000.0),
)


@pytest.mark.parametrize(
    "state", [TRIAL, initial_state(Slot.A, None), initial_state(Slot.B, Release("factory"))]
)
def test_round_trip(state: State) -> None:
    assert parse(serialize(state), "state.json") == state


def test_golden_fields() -> None:
    value = json.loads(serialize(TRIAL))

    assert value["format"] == 1
    assert value["phase"] == "trial"
    assert value["target"] == "b"
    assert value["slots"]["b"] == {
        "status": "trial",
        "release": {"artifact": "release-2", "version": "2.0", "provides": {}},
    }


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a valid state record"),
        (b"{", "not a valid state record"),
        (b'{"format": 2}', "format 2"),
        (serialize(TRIAL).replace(b'"trial"', b'"flying"', 1), "not a valid state record"),
        (serialize(TRIAL).replace(b'"b": {', b'"c": {', 1), "not a valid state record"),
    ],
)
def test_corrupt_records(data: bytes, fragment: str) -> None:
    with pytest.raises(StateCorrupt, match=fragment):
        parse(data, "state.json")


def test_store_saves_atomically_and_quarantines(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "otad")
    assert store.load() is None

    store.save(TRIAL)
    store.save(initial_state(Slot.A, None))

    assert store.load() == initial_state(Slot.A, None)
    assert sorted(p.name for p in store.directory.iterdir()) == ["state.json"]
    store.path.write_bytes(b"garbage")
    with pytest.raises(StateCorrupt):
        store.load()
    aside = store.quarantine()
    assert aside.read_bytes() == b"garbage"
    assert store.load() is None
