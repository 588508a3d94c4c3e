"""The daemon's sd_notify: READY=1 and STATUS at start, WATCHDOG=1 at half the interval."""

from __future__ import annotations

import os
import time

from tests.service.conftest import MakeDaemon


def test_ready_status_and_watchdog(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    daemon.environment = {"WATCHDOG_USEC": "400000"}
    daemon.start()
    assert "READY=1\nSTATUS=idle, booted slot a (release-1)" in daemon.notifications
    deadline = time.monotonic() + 5
    while daemon.notifications.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Every 0.2 s: three pings well within 5 s.
    assert daemon.notifications.count("WATCHDOG=1") >= 3, daemon.notifications
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications


def test_watchdog_for_another_process_is_ignored(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    daemon.environment = {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    daemon.start()
    daemon.stop()
    assert "WATCHDOG=1" not in daemon.notifications
