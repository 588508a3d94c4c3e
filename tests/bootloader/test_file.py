"""The file-backed backend the engine's tests use: it must behave like a bootloader."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from otad.bootloader import file as file_module
from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.file import FileBootloader
from otad.errors import BootloaderError, BootloaderStateError, SlotConflict
from tests.bootloader.tearing import WriteRecorder, restore, snapshot, torn_states

Operation = Callable[[FileBootloader], object]


def make_backend(tmp_path: Path) -> FileBootloader:
    (tmp_path / "state").mkdir()
    backend = FileBootloader(tmp_path / "state" / "bootloader.json", trial_boots=3)
    backend.initialize(Slot.A)
    return backend


def test_trial_spends_boots_then_falls_back(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)

    booted = [backend.simulate_boot() for _ in range(5)]

    assert booted == [Slot.B, Slot.B, Slot.B, Slot.A, Slot.A]
    status = backend.status()
    assert (status.booted, status.trial, status.trial_boots_left) == (Slot.A, Slot.B, 0)
    backend.mark_bad(Slot.B)
    status = backend.status()
    assert (status.trial, status.slots[Slot.B]) == (None, SlotBootState.BAD)


def test_commit_during_trial(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    assert backend.simulate_boot() is Slot.B
    assert backend.status().is_trial_boot

    backend.mark_good(Slot.B)

    status = backend.status()
    assert (status.default, status.trial, status.is_trial_boot) == (Slot.B, None, False)
    assert [backend.simulate_boot() for _ in range(2)] == [Slot.B, Slot.B]


def test_set_booted(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)

    backend.set_booted(Slot.B)

    assert backend.status().booted is Slot.B
    assert json.loads(backend.path.read_text())["booted"] == "b"


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        (lambda b: b.start_trial(Slot.A), "is the default already"),
        (lambda b: b.mark_bad(Slot.A), "would leave no slot to boot"),
    ],
)
def test_refused_requests_leave_the_file(
    tmp_path: Path, operation: Operation, message: str
) -> None:
    backend = make_backend(tmp_path)
    before = backend.path.read_bytes()

    with pytest.raises(SlotConflict, match=message):
        operation(backend)

    assert backend.path.read_bytes() == before


CASES: list[tuple[str, list[Operation], Operation]] = [
    ("start trial", [], lambda b: b.start_trial(Slot.B)),
    ("boot", [lambda b: b.start_trial(Slot.B)], lambda b: b.simulate_boot()),
    ("commit", [lambda b: b.start_trial(Slot.B)], lambda b: b.mark_good(Slot.B)),
    ("reject", [lambda b: b.start_trial(Slot.B)], lambda b: b.mark_bad(Slot.B)),
]


@pytest.mark.parametrize(
    ("prepare", "operation"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cut_write_leaves_old_or_new_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: list[Operation],
    operation: Operation,
) -> None:
    backend = make_backend(tmp_path)
    for step in prepare:
        step(backend)
    before_status = backend.status()
    before = snapshot(backend.path.parent)
    recorder = WriteRecorder(monkeypatch, file_module, backend.path.parent)
    operation(backend)
    after_status = backend.status()
    write = recorder.writes[0]

    for _, cut, files in torn_states(before, recorder.writes):
        restore(backend.path.parent, files)
        if cut < len(write.new):
            (backend.path.parent / f".{backend.path.name}.tmp").write_bytes(write.new[:cut])
        assert backend.status() in (before_status, after_status)
    # A later write replaces whatever temp file a cut left behind.
    backend.set_booted(Slot.A)
    assert sorted(p.name for p in backend.path.parent.iterdir()) == ["bootloader.json"]


def test_truncated_state_file_raises_only_otad_errors(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    data = backend.path.read_bytes()

    for cut in range(len(data) - 1):  # the last byte is the newline JSON does not need
        backend.path.write_bytes(data[:cut])
        with pytest.raises(BootloaderStateError):
            backend.status()


def test_missing_state_file(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="not initialized"):
        FileBootloader(tmp_path / "none.json").status()
