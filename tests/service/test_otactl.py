"""otactl end to end against the daemon: status, install with plain progress lines,
slots --json, inspect --json, commit, and its exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from otad.bootloader.base import Slot
from tests.service.conftest import Daemon, run_peer


def otactl(daemon: Daemon, *argv: str, stdin: Path | None = None) -> tuple[int, str, str]:
    command = [sys.executable, "-m", "otad.cli.ctl", "--bus-address", daemon.bus.address, *argv]
    if stdin is None:
        result = run_peer(command, timeout=60)
    else:
        with stdin.open("rb") as source:
            result = run_peer(command, timeout=60, stdin=source)
    return result.returncode, result.stdout, result.stderr


def test_status(daemon: Daemon) -> None:
    code, out, err = otactl(daemon, "status")
    assert code == 0, err
    assert out == (
        "State: idle\n"
        "Operation: none\n"
        "Booted slot: a (release-1)\n"
        "Next boot: slot a\n"
        "Device type: otad-test\n"
        "Last error: none\n"
        "Server: none\n"
    )
    code, out, _ = otactl(daemon, "status", "--json")
    assert json.loads(out) == {
        "state": "idle",
        "operation": "none",
        "progress": {"percent": 0, "message": ""},
        "booted_slot": "a",
        "next_slot": "a",
        "current_artifact": "release-1",
        "compatible": "otad-test",
        "last_error": "",
        "server": {
            "url": "",
            "status": "disabled",
            "error": "",
            "last_poll": 0,
            "deployment": {"id": "", "artifact": ""},
            "deployment_status": "",
        },
    }


def test_install_slots_reboot_and_commit(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    code, out, err = otactl(daemon, "install", str(artifacts["release-2"]))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == "installed release-2 into slot b; reboot to try it"
    progress = lines[:-1]
    assert progress, out
    assert progress[0] == "  0% verifying the artifact"
    assert all(line.endswith("% writing slot b") for line in progress[1:]), out
    assert len(progress) <= 12  # a line per 10 %, not one per block

    code, out, _ = otactl(daemon, "slots", "--json")
    assert code == 0
    slots = {entry["slot"]: entry for entry in json.loads(out)}
    assert slots["b"] == {
        "slot": "b",
        "device": str(daemon.device.disk.partitions["b"]),
        "booted": False,
        "next": True,
        "status": "trial",
        "artifact": "release-2",
        "version": "2.0",
    }
    code, out, _ = otactl(daemon, "slots")
    assert out.splitlines()[0].split() == [
        "slot", "booted", "next", "status", "artifact", "version", "device"
    ]  # fmt: skip

    assert daemon.reboot_device() is Slot.B
    code, out, err = otactl(daemon, "commit")
    assert (code, out) == (0, "committed slot b (release-2)\n"), err
    code, out, err = otactl(daemon, "commit")
    assert code == 5
    assert err == "otactl: error: nothing to commit: the update state is idle\n"
    # The refusal was answered; dbus-next must not also log it as an escaped exception.
    assert "Exception in callback" not in daemon.log_text()
    assert "Traceback" not in daemon.log_text()


def test_install_from_stdin(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    code, out, err = otactl(daemon, "install", "-", stdin=artifacts["release-2"])
    assert code == 0, err
    assert out.splitlines()[-1] == "installed release-2 into slot b; reboot to try it"


def test_inspect_json_and_refusals(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    code, out, err = otactl(daemon, "inspect", str(artifacts["release-2"]), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["name"], info["version"], info["signature"]) == ("release-2", "2.0", "verified")
    code, out, err = otactl(daemon, "install", str(artifacts["other-device"]))
    assert code == 1
    assert err.startswith("otactl: error: artifact other-device is for rpi4")
    assert len(err.splitlines()) == 1
    code, _, err = otactl(daemon, "install", str(artifacts["release-0"]))
    assert code == 1
    assert "older" in err or "downgrade" in err
    code, _, err = otactl(daemon, "install", "/nonexistent.mender")
    assert code == 3
    assert len(err.splitlines()) == 1


def test_daemon_not_running(daemon: Daemon) -> None:
    daemon.stop()
    code, _, err = otactl(daemon, "status")
    assert (code, err) == (3, "otactl: error: the otad daemon is not running\n")
