"""kill -9 of the engine at every durable step, then recovery: the device stays consistent.

A child process (tests/engine/killable.py) runs one operation and stops after each
state record it saves and each bootloader change it makes; the test kills it with
SIGKILL at point k, for every k, then starts the engine again as the daemon would and
checks: the slot that was running is untouched, the state record is valid, the
bootloader's next boot is a verified release, and the device can go on updating.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.state import Phase, SlotStatus
from tests.engine.conftest import Device, Disk

ROOT = Path(__file__).resolve().parents[2]


def _run_child(setup: Path, operation: str, artifact: Path | None, kill_at: int | None) -> int:
    """Run the child, answering each pause, or kill it at point `kill_at`.

    Returns the number of points the child reached.
    """
    argv = [sys.executable, "-m", "tests.engine.killable", str(setup), operation]
    if artifact is not None:
        argv.append(str(artifact))
    with subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        reached = 0
        for line in child.stdout:
            if not line.startswith("point "):
                continue
            reached = int(line.split()[1])
            if reached == kill_at:
                child.send_signal(signal.SIGKILL)
                child.wait()
                return reached
            child.stdin.write("go\n")
            child.stdin.flush()
        _, stderr = child.communicate()
    assert child.returncode == 0, stderr
    return reached


def _setup_file(device: Device, tmp_path: Path) -> Path:
    config = tmp_path / "otad.conf"
    config.write_text(device.config_text)
    setup = tmp_path / "setup.json"
    setup.write_text(
        json.dumps(
            {
                "config": str(config),
                "bootloader": str(device.bootloader.path),
                "proc": str(device.kernel.root),
                "data": str(device.store.directory),
                "key": device.verifier.source,
            }
        )
    )
    return setup


def _digest(disk: Disk, slot: Slot) -> str:
    return hashlib.sha256(disk.partitions[slot.value].read_bytes()).hexdigest()


class Snapshot:
    """Files and slot content to restore the device between two kill points."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.files = {
            path: path.read_bytes() for path in (device.bootloader.path, device.store.path)
        }
        self.slots = {slot: device.disk.partitions[slot.value].read_bytes() for slot in Slot}
        self.cmdline = (device.kernel.root / "cmdline").read_text()

    def restore(self) -> None:
        for path, data in self.files.items():
            path.write_bytes(data)
        for slot, data in self.slots.items():
            with self.device.disk.partitions[slot.value].open("r+b") as out:
                out.write(data)
        (self.device.kernel.root / "cmdline").write_text(self.cmdline)


def _check_consistent(device: Device, running: Slot, running_digest: str) -> None:
    engine = device.engine()
    state = engine.recover()
    boot = device.bootloader.status()

    assert _digest(device.disk, running) == running_digest, "the running slot was written"
    # The next boot starts a verified release: a good one, or the update on trial.
    record = state.slots[boot.next_boot]
    on_trial = state.phase in (Phase.INSTALLED, Phase.TRIAL) and state.target is boot.next_boot
    assert record.status is SlotStatus.GOOD or (on_trial and record.status is SlotStatus.TRIAL)
    assert record.release is not None
    # The device goes on: finish whatever is pending and install again.
    for _ in range(5):
        if state.phase is Phase.IDLE:
            break
        on_target = device.engine().snapshot().booted is state.target
        if state.phase is Phase.TRIAL and on_target and not state.rollback_requested:
            state = device.engine().commit()
            continue
        state = device.reboot().snapshot().state
    assert state.phase is Phase.IDLE


Prelude = Callable[[Device, dict[str, Path]], None]


def _nothing(device: Device, artifacts: dict[str, Path]) -> None:
    pass


def _installed(device: Device, artifacts: dict[str, Path]) -> None:
    device.install(artifacts["release-2"])


def _installed_and_rebooted(device: Device, artifacts: dict[str, Path]) -> None:
    device.install(artifacts["release-2"])
    booted = device.bootloader.simulate_boot()
    device.kernel.boot_slot(device.disk.partuuids[booted.value])
    device.kernel.reboot()


def _on_trial(device: Device, artifacts: dict[str, Path]) -> None:
    device.install(artifacts["release-2"])
    device.reboot()


SCENARIOS: dict[str, tuple[Prelude, str, bool]] = {
    # name: (how to get there, operation, does it take the artifact)
    "install": (_nothing, "install", True),
    "cancel before reboot": (_installed, "rollback", False),
    "recover after reboot": (_installed_and_rebooted, "recover", False),
    "commit": (_on_trial, "commit", False),
    "rollback during trial": (_on_trial, "rollback", False),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_at_every_durable_step(
    device: Device, artifacts: dict[str, Path], tmp_path: Path, scenario: str
) -> None:
    prelude, operation, takes_artifact = SCENARIOS[scenario]
    prelude(device, artifacts)
    running = device.engine().snapshot().booted
    running_digest = _digest(device.disk, running)
    setup = _setup_file(device, tmp_path)
    artifact = artifacts["release-3"] if takes_artifact else None
    before = Snapshot(device)

    points = _run_child(setup, operation, artifact, kill_at=None)
    assert points >= 1, "the operation made no durable step at all"
    for kill_at in range(1, points + 1):
        before.restore()
        reached = _run_child(setup, operation, artifact, kill_at=kill_at)
        assert reached == kill_at
        _check_consistent(device, running, running_digest)
