"""The engine's whole update cycle on a real loop-device disk with the file bootloader
(the `device` fixture: see tests/engine/conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from otad.bootloader.base import Slot, SlotBootState
from otad.errors import (
    BadSignature,
    ChunkMismatch,
    Downgrade,
    Incompatible,
    MissingSignature,
    NoSpace,
    NotInTrial,
    OtadError,
    StateConflict,
)
from otad.state import Phase, Release, SlotStatus
from tests.engine.conftest import Device


def _image_digest(artifact: Path) -> str:
    image = artifact.with_suffix(".img")
    return hashlib.sha256(image.read_bytes()).hexdigest()


def _slot_prefix_digest(device: Device, slot: Slot, artifact: Path) -> str:
    size = artifact.with_suffix(".img").stat().st_size
    with device.disk.partitions[slot.value].open("rb") as stream:
        return hashlib.sha256(stream.read(size)).hexdigest()


def test_good_update_commits_and_survives_reboots(
    device: Device, artifacts: dict[str, Path]
) -> None:
    slot_a_before = device.slot_digest(Slot.A)

    device.install(artifacts["release-2"])

    state = device.store.load()
    assert state is not None
    assert state.phase is Phase.INSTALLED
    assert state.target is Slot.B
    assert device.slot_digest(Slot.A) == slot_a_before
    assert _slot_prefix_digest(device, Slot.B, artifacts["release-2"]) == _image_digest(
        artifacts["release-2"]
    )
    assert device.bootloader.status().next_boot is Slot.B

    engine = device.reboot()
    assert engine.snapshot().state.phase is Phase.TRIAL
    committed = engine.commit()

    assert committed.phase is Phase.IDLE
    assert committed.last is not None
    assert committed.last.success
    assert committed.slots[Slot.B].status is SlotStatus.GOOD
    assert committed.slots[Slot.B].release == Release(
        "release-2",
        "2.0",
        {
            "artifact_name": "release-2",
            "rootfs-image.version": "2.0",
            "rootfs-image.checksum": _image_digest(artifacts["release-2"]),
        },
    )
    assert device.reboot().snapshot().booted is Slot.B
    assert device.bootloader.status().default is Slot.B


def test_failed_trial_falls_back_and_next_install_works(
    device: Device, artifacts: dict[str, Path]
) -> None:
    device.install(artifacts["release-2"])
    booted = [device.reboot().snapshot().booted for _ in range(4)]

    state = device.store.load()
    assert booted == [Slot.B, Slot.B, Slot.B, Slot.A]
    assert state is not None
    assert state.phase is Phase.IDLE
    assert state.last is not None
    assert not state.last.success
    assert "trial boot of slot b failed" in state.last.message
    assert state.slots[Slot.B].status is SlotStatus.BAD
    assert device.bootloader.status().slots[Slot.B] is SlotBootState.BAD

    device.install(artifacts["release-3"])

    assert device.bootloader.status().next_boot is Slot.B


def test_rollback_before_reboot_cancels(device: Device, artifacts: dict[str, Path]) -> None:
    device.install(artifacts["release-2"])

    needs_reboot = device.engine().rollback()

    state = device.store.load()
    assert needs_reboot is False
    assert state is not None
    assert state.phase is Phase.IDLE
    assert device.bootloader.status().next_boot is Slot.A
    assert device.reboot().snapshot().booted is Slot.A


def test_rollback_during_trial(device: Device, artifacts: dict[str, Path]) -> None:
    device.install(artifacts["release-2"])
    engine = device.reboot()

    assert engine.rollback() is True
    with pytest.raises(StateConflict, match="rollback was requested"):
        engine.commit()
    after = device.reboot()

    state = after.snapshot().state
    assert after.snapshot().booted is Slot.A
    assert state.phase is Phase.IDLE
    assert state.last is not None
    assert "rolled back from slot b to slot a on request" in state.last.message


def test_rollback_after_commit_returns_to_previous_release(
    device: Device, artifacts: dict[str, Path]
) -> None:
    device.install(artifacts["release-2"])
    device.reboot().commit()

    assert device.engine().rollback() is True
    engine = device.reboot()
    assert engine.snapshot().booted is Slot.A
    committed = engine.commit()

    release = committed.slots[Slot.A].release
    assert release is not None
    assert release.artifact == "release-1"
    assert device.bootloader.status().default is Slot.A


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        ("tampered", ChunkMismatch, "signed chunk index"),
        ("other-device", Incompatible, "is for rpi4; this device is otad-test"),
        ("release-0", Downgrade, "older than the running 1.0"),
        ("unsigned", MissingSignature, "not signed"),
        ("foreign", BadSignature, "does not verify"),
        ("too-big", NoSpace, "holds 25165824"),
    ],
)
def test_refused_artifacts_change_nothing_that_runs(
    device: Device,
    artifacts: dict[str, Path],
    name: str,
    error: type[OtadError],
    fragment: str,
) -> None:
    slot_a_before = device.slot_digest(Slot.A)
    slot_b_before = device.slot_digest(Slot.B)
    bootloader_before = device.bootloader.status()

    with pytest.raises(error, match=fragment):
        device.install(artifacts[name])

    state = device.store.load()
    assert state is not None
    assert state.phase is Phase.IDLE
    assert device.slot_digest(Slot.A) == slot_a_before
    assert device.bootloader.status() == bootloader_before
    if name == "tampered":
        # Writing had begun: the slot is recorded empty and the failure kept.
        assert state.slots[Slot.B].status is SlotStatus.EMPTY
        assert state.last is not None
        assert "chunk" in state.last.message
    else:
        # Refused before the first byte was written.
        assert device.slot_digest(Slot.B) == slot_b_before


def test_downgrade_when_explicitly_allowed(device: Device, artifacts: dict[str, Path]) -> None:
    device.install(artifacts["release-0"], allow_downgrade=True)

    assert device.bootloader.status().next_boot is Slot.B


def test_no_install_during_trial_and_no_commit_outside_it(
    device: Device, artifacts: dict[str, Path]
) -> None:
    with pytest.raises(NotInTrial):
        device.engine().commit()
    device.install(artifacts["release-2"])
    with pytest.raises(StateConflict, match="installed"):
        device.install(artifacts["release-3"])
    device.reboot()

    with pytest.raises(StateConflict, match="trial"):
        device.install(artifacts["release-3"])


def test_mounted_inactive_slot_is_never_written(device: Device, artifacts: dict[str, Path]) -> None:
    from otad.errors import DeviceError

    device.kernel.mount(device.disk.partitions["b"])
    before = device.slot_digest(Slot.B)

    with pytest.raises(DeviceError, match="is mounted"):
        device.install(artifacts["release-2"])

    assert device.slot_digest(Slot.B) == before
