"""Raspberry Pi tryboot backend: autoboot.txt, the device tree, and cut writes.

No Raspberry Pi firmware runs here, so the firmware's choice is `firmware_partition`, a
small model of how the bootloader applies [all] and [tryboot]; the device tree is a
directory of big-endian u32 files as /proc/device-tree shows them.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest

from otad.bootloader import rpi
from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.rpi import RpiTrybootBootloader, firmware_partition, trial_reboot_argv
from otad.errors import BootloaderError, FirmwareTooOld, SlotConflict
from tests.bootloader.tearing import WriteRecorder, restore, snapshot, torn_states

PARTITIONS = {Slot.A: 2, Slot.B: 3}
Operation = Callable[[RpiTrybootBootloader], None]


def timestamp(year: int, month: int, day: int) -> int:
    return int(datetime.datetime(year, month, day, tzinfo=datetime.UTC).timestamp())


def set_device_tree(root: Path, partition: int, tryboot: int, built: int | None) -> None:
    node = root / "chosen" / "bootloader"
    node.mkdir(parents=True, exist_ok=True)
    (node / "partition").write_bytes(partition.to_bytes(4, "big"))
    (node / "tryboot").write_bytes(tryboot.to_bytes(4, "big"))
    if built is not None:
        (node / "build-timestamp").write_bytes(built.to_bytes(4, "big"))


def make_backend(tmp_path: Path) -> RpiTrybootBootloader:
    (tmp_path / "boot").mkdir()
    set_device_tree(tmp_path / "dt", 2, 0, timestamp(2024, 4, 17))
    backend = RpiTrybootBootloader(tmp_path / "boot", PARTITIONS, device_tree=tmp_path / "dt")
    backend.initialize(Slot.A)
    return backend


def firmware_boot(backend: RpiTrybootBootloader, tryboot: bool) -> Slot:
    """The model firmware boots: its partition lands in the device tree, as on a Pi."""
    partition = firmware_partition(backend.path.read_text(), tryboot)
    set_device_tree(backend.device_tree, partition or 0, int(tryboot), timestamp(2024, 4, 17))
    return {number: slot for slot, number in PARTITIONS.items()}[partition or 0]


def test_autoboot_txt_names_the_partitions(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)

    backend.start_trial(Slot.B)

    assert backend.path.read_text() == (
        "# otad: a=good b=trial\n[all]\ntryboot_a_b=1\nboot_partition=2\n"
        "[tryboot]\nboot_partition=3\n"
    )
    assert trial_reboot_argv() == ["reboot", "0 tryboot"]


def test_trial_boots_once_then_falls_back(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    assert backend.status().trial_boots_left == 1

    assert firmware_boot(backend, tryboot=True) is Slot.B
    status = backend.status()
    assert (status.booted, status.is_trial_boot, status.trial_boots_left) == (Slot.B, True, 0)
    assert firmware_boot(backend, tryboot=False) is Slot.A

    backend.mark_bad(Slot.B)
    assert backend.status().slots == {Slot.A: SlotBootState.GOOD, Slot.B: SlotBootState.BAD}
    assert firmware_boot(backend, tryboot=True) is Slot.A


def test_commit_makes_the_trial_slot_boot(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    firmware_boot(backend, tryboot=True)

    backend.mark_good(Slot.B)

    status = backend.status()
    assert (status.booted, status.default, status.trial) == (Slot.B, Slot.B, None)
    assert [firmware_boot(backend, tryboot=flag) for flag in (False, True)] == [Slot.B, Slot.B]


@pytest.mark.parametrize(
    ("built", "found"),
    [(timestamp(2022, 11, 25), "2022-11-25"), (None, "no build-timestamp")],
)
def test_old_firmware_is_refused_before_any_write(
    tmp_path: Path, built: int | None, found: str
) -> None:
    backend = make_backend(tmp_path)
    (tmp_path / "dt" / "chosen" / "bootloader" / "build-timestamp").unlink()
    set_device_tree(tmp_path / "dt", 2, 0, built)
    before = backend.path.read_bytes()

    with pytest.raises(FirmwareTooOld, match=found) as caught:
        backend.start_trial(Slot.B)

    assert caught.value.required == "2023-01-01"
    assert backend.path.read_bytes() == before


def test_refused_request_leaves_autoboot_txt(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    before = backend.path.read_bytes()

    with pytest.raises(SlotConflict):
        backend.start_trial(Slot.A)

    assert backend.path.read_bytes() == before


CASES: list[tuple[str, list[Operation], Operation]] = [
    ("start trial", [], lambda b: b.start_trial(Slot.B)),
    ("commit", [lambda b: b.start_trial(Slot.B)], lambda b: b.mark_good(Slot.B)),
    ("reject", [lambda b: b.start_trial(Slot.B)], lambda b: b.mark_bad(Slot.B)),
]


@pytest.mark.parametrize(
    ("prepare", "operation"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cut_write_boots_a_good_slot(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: list[Operation],
    operation: Operation,
) -> None:
    backend = make_backend(tmp_path)
    for step in prepare:
        step(backend)
    old_text = backend.path.read_text()
    before = snapshot(backend.boot_dir)
    recorder = WriteRecorder(monkeypatch, rpi, backend.boot_dir)
    operation(backend)
    new_text = backend.path.read_text()
    assert [write.in_place for write in recorder.writes] == [False]

    for _, cut, files in torn_states(before, recorder.writes):
        restore(backend.boot_dir, files)
        if cut < len(recorder.writes[0].new):
            # Cut before the rename: a partial temp file, autoboot.txt untouched.
            (backend.boot_dir / ".autoboot.txt.tmp").write_bytes(recorder.writes[0].new[:cut])
        text = backend.path.read_text()
        assert text in (old_text, new_text)
        for tryboot in (False, True):
            chosen = firmware_partition(text, tryboot)
            assert chosen in {firmware_partition(t, tryboot) for t in (old_text, new_text)}
        assert backend.status().default in (Slot.A, Slot.B)
    backend.mark_good(Slot.A)
    assert not (backend.boot_dir / ".autoboot.txt.tmp").exists()


@pytest.mark.parametrize("cut", range(0, 90, 7))
def test_status_on_truncated_autoboot_raises_only_otad_errors(tmp_path: Path, cut: int) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    backend.path.write_bytes(backend.path.read_bytes()[:cut])

    try:
        status = backend.status()
    except BootloaderError:
        return
    assert status.default is Slot.A


@pytest.mark.parametrize("content", [b"\x00\x01", b"12345", b""])
def test_bad_device_tree_raises_only_otad_errors(tmp_path: Path, content: bytes) -> None:
    backend = make_backend(tmp_path)
    (tmp_path / "dt" / "chosen" / "bootloader" / "partition").write_bytes(content)

    with pytest.raises(BootloaderError):
        backend.status()
