"""The trial boot through the daemon: installs refused while on trial, Commit, NotInTrial,
Rollback, and the health gate that rolls back and reboots an uncommitted trial."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dbus_next.errors import DBusError

from otad.bootloader.base import Slot
from otad.state import Phase
from tests.service.conftest import (
    Daemon,
    DeviceState,
    MakeDaemon,
    connect,
    gdbus_call,
    run,
    run_peer,
)
from tests.service.test_install import until_completed


def install_and_reboot(daemon: Daemon, artifact: Path) -> None:
    """Install `artifact` through the daemon, then reboot the device into its trial."""

    async def install() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        done, _ = await until_completed(events, await client.install(str(artifact), {}))
        assert done.result == 0, done.message
        await client.close()

    run(install())
    assert daemon.reboot_device() is Slot.B


def properties(daemon: Daemon) -> dict[str, object]:
    async def read() -> dict[str, object]:
        client = await connect(daemon.bus)
        values = await client.properties()
        await client.close()
        return values

    return run(read())


def test_commit_outside_trial_is_not_in_trial(daemon: Daemon) -> None:
    before = DeviceState.of(daemon.device)
    result = run_peer(gdbus_call(daemon.bus, "Commit"))
    assert "GDBus.Error:org.otad.Error.NotInTrial: nothing to commit" in result.stderr
    assert DeviceState.of(daemon.device) == before


def test_install_during_trial_is_refused_then_commit(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    install_and_reboot(daemon, artifacts["release-2"])
    values = properties(daemon)
    assert (values["State"], values["BootedSlot"], values["CurrentArtifact"]) == (
        "trial",
        "b",
        "release-2",
    )
    before = DeviceState.of(daemon.device)
    refused = run_peer(gdbus_call(daemon.bus, "Install", str(artifacts["release-3"]), "{}"))
    assert (
        "GDBus.Error:org.otad.Error.Busy: slot b is on trial: commit or roll back before "
        "installing" in refused.stderr
    )
    assert DeviceState.of(daemon.device) == before

    async def commit() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        await client.commit()
        assert (await client.properties())["State"] == "idle"
        slots = dict(await client.slots())
        assert (slots["b"]["status"], slots["b"]["booted"], slots["b"]["next"]) == (
            "good",
            True,
            True,
        )
        changed = await events.get()
        assert getattr(changed, "changed", {}).get("State") == "idle"
        with pytest.raises(DBusError) as again:
            await client.commit()
        assert again.value.type == "org.otad.Error.NotInTrial"
        await client.close()

    run(commit())
    record = daemon.device.store.load()
    assert record is not None
    assert record.phase is Phase.IDLE
    assert record.last is not None
    assert (record.last.operation, record.last.success) == ("commit", True)


def test_rollback_during_trial_reboots_when_asked(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    install_and_reboot(daemon, artifacts["release-2"])
    result = run_peer(gdbus_call(daemon.bus, "Rollback", "{'reboot': <true>}"))
    assert result.returncode == 0, result.stderr
    assert daemon.reboots.read_text() == "reboot\n"
    assert properties(daemon)["State"] == "reboot-required"
    assert daemon.reboot_device() is Slot.A
    values = properties(daemon)
    assert (values["State"], values["BootedSlot"]) == ("idle", "a")
    assert "rolled back from slot b to slot a on request" in str(values["LastError"])


def test_uncommitted_trial_is_rolled_back_and_rebooted(
    make_daemon: MakeDaemon, artifacts: dict[str, Path]
) -> None:
    daemon = make_daemon(health_timeout=2)
    daemon.start()
    install_and_reboot(daemon, artifacts["release-2"])
    started = time.monotonic()
    deadline = started + 20
    while not daemon.reboots.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.reboots.read_text() == "reboot\n", daemon.log_text()
    assert time.monotonic() - started >= 1.5
    values = properties(daemon)
    assert values["State"] == "reboot-required"
    assert values["LastError"] == (
        "the trial of slot b was not committed within 2 s; otad rolled it back"
    )
    record = daemon.device.store.load()
    assert record is not None
    assert record.rollback_requested
    assert daemon.device.bootloader.status().next_boot is Slot.A
    # After the reboot, the daemon of slot a still says why the update was rolled back.
    assert daemon.reboot_device() is Slot.A
    values = properties(daemon)
    assert (values["State"], values["BootedSlot"]) == ("idle", "a")
    assert values["LastError"] == (
        "rolled back from slot b to slot a: the trial of slot b was not committed within 2 s"
    )


def test_committed_trial_is_not_rolled_back(
    make_daemon: MakeDaemon, artifacts: dict[str, Path]
) -> None:
    daemon = make_daemon(health_timeout=3)
    daemon.start()
    install_and_reboot(daemon, artifacts["release-2"])
    assert run_peer(gdbus_call(daemon.bus, "Commit")).returncode == 0
    time.sleep(4)
    assert not daemon.reboots.exists()
    assert properties(daemon)["State"] == "idle"


def test_health_deadline_counts_from_boot_not_from_a_daemon_restart(
    make_daemon: MakeDaemon, artifacts: dict[str, Path]
) -> None:
    daemon = make_daemon(health_timeout=30)
    daemon.start()
    install_and_reboot(daemon, artifacts["release-2"])
    # The daemon restarts 29.5 s into the trial boot: only half a second is left.
    daemon.stop()
    (daemon.device.kernel.root / "uptime").write_text("29.50 10.00\n")
    daemon.start()
    deadline = time.monotonic() + 15
    while not daemon.reboots.exists() and time.monotonic() < deadline:
        time.sleep(0.1)

    assert daemon.reboots.read_text() == "reboot\n", daemon.log_text()
    assert daemon.device.bootloader.status().next_boot is Slot.A
