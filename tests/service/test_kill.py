"""kill -9 of the daemon in the middle of an install, then a restart: the state is
consistent and reported (LastError, the record's last outcome), the slot not activated."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from otad.bootloader.base import Slot
from otad.dbus.client import PropertiesChanged
from otad.state import Phase, SlotStatus
from tests.service.conftest import TEST_TIMEOUT, Daemon, connect, run


def test_kill_during_install_and_restart(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    data = artifacts["release-2"].read_bytes()
    cut = len(data) - (128 << 10)
    read_end, write_end = os.pipe()
    killed = threading.Event()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            try:
                pipe.write(data[:cut])
                pipe.flush()
                killed.wait(TEST_TIMEOUT)
            except BrokenPipeError:
                pass

    async def start_install() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        await client.install_fd(read_end, {})
        os.close(read_end)
        while True:  # the slot is being written
            event = await events.get()
            if isinstance(event, PropertiesChanged) and event.changed.get("Progress", [0])[0]:
                break
        record = daemon.device.store.load()
        assert record is not None
        assert record.phase is Phase.INSTALLING
        daemon.kill()
        await client.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        run(start_install())
    finally:
        killed.set()
        feeder.join(TEST_TIMEOUT)

    daemon.start()  # the same boot: the daemon is restarted, the device is not

    async def read_back() -> None:
        client = await connect(daemon.bus)
        values = await client.properties()
        assert values["State"] == "idle"
        assert values["Operation"] == "none"
        assert (values["BootedSlot"], values["NextSlot"]) == ("a", "a")
        assert values["LastError"] == "interrupted while writing slot b; the slot was cleared"
        slots = dict(await client.slots())
        assert (slots["b"]["status"], slots["b"]["next"], slots["b"]["artifact"]) == (
            "empty",
            False,
            "",
        )
        assert slots["a"]["status"] == "good"
        await client.close()

    run(read_back())
    record = daemon.device.store.load()
    assert record is not None
    assert record.phase is Phase.IDLE
    assert record.slots[Slot.B].status is SlotStatus.EMPTY
    assert record.last is not None
    assert (record.last.operation, record.last.success) == ("install", False)
    status = daemon.device.bootloader.status()
    assert status.next_boot is Slot.A
    assert status.trial is None
