"""Who may change the device: root, polkit's answer where polkit is on the bus, the
admin group where it is not. A refusal is NotAuthorized and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from otad.dbus.bus import close, connect
from tests.service.conftest import (
    Daemon,
    DeviceState,
    MakeDaemon,
    as_nobody,
    gdbus_call,
    run,
    run_peer,
    run_peer_async,
)

CHANGING_CALLS = [
    ("Install", ["{path}", "{{}}"]),
    ("Cancel", []),
    ("Commit", []),
    ("Rollback", ["{{}}"]),
]


@pytest.mark.parametrize(("method", "arguments"), CHANGING_CALLS)
def test_unprivileged_caller_is_refused_and_nothing_changes(
    daemon: Daemon, artifacts: dict[str, Path], method: str, arguments: list[str]
) -> None:
    before = DeviceState.of(daemon.device)
    filled = [argument.format(path=artifacts["release-2"]) for argument in arguments]
    result = run_peer(as_nobody(*gdbus_call(daemon.bus, method, *filled)))
    assert "GDBus.Error:org.otad.Error.NotAuthorized: not authorized to " in result.stderr
    assert "uid 65534 is neither root nor in group otad" in result.stderr
    assert DeviceState.of(daemon.device) == before
    assert not daemon.reboots.exists()


def test_unprivileged_caller_is_refused_install_fd(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    before = DeviceState.of(daemon.device)
    script = (
        "import asyncio, sys\n"
        "from otad.dbus.client import UpdaterClient\n"
        "from dbus_next.errors import DBusError\n"
        "async def main():\n"
        "    client = await UpdaterClient.connect(sys.argv[1])\n"
        "    try:\n"
        "        await client.install_fd(0, {})\n"
        "    except DBusError as error:\n"
        "        print(error.type)\n"
        "    await client.close()\n"
        "asyncio.run(main())\n"
    )
    with artifacts["release-2"].open("rb") as stdin:
        result = run_peer(
            as_nobody("/usr/bin/python3", "-c", script, daemon.bus.address), stdin=stdin
        )
    assert result.stdout.strip() == "org.otad.Error.NotAuthorized", result.stderr
    assert DeviceState.of(daemon.device) == before


def test_reading_is_open_to_everyone(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    slots = run_peer(as_nobody(*gdbus_call(daemon.bus, "GetSlots")))
    assert slots.returncode == 0, slots.stderr
    assert "'status': <'good'>" in slots.stdout
    state = run_peer(
        as_nobody(
            "busctl", f"--address={daemon.bus.address}", "get-property",
            "org.otad.Updater1", "/org/otad/Updater1", "org.otad.Updater1", "State",
        )
    )  # fmt: skip
    assert state.stdout.strip() == 's "idle"', state.stderr
    # Inspect of a file only root may read needs the right to install.
    private = run_peer(as_nobody(*gdbus_call(daemon.bus, "Inspect", str(artifacts["release-2"]))))
    assert "GDBus.Error:org.otad.Error.NotAuthorized: not authorized to inspect" in private.stderr


def test_inspect_of_a_public_file_is_open(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    public = Path("/tmp") / f"otad-test-{artifacts['release-2'].stat().st_ino}.mender"
    public.write_bytes(artifacts["release-2"].read_bytes())
    public.chmod(0o644)
    try:
        result = run_peer(as_nobody(*gdbus_call(daemon.bus, "Inspect", str(public))))
    finally:
        public.unlink()
    assert result.returncode == 0, result.stderr
    assert "'name': <'release-2'>" in result.stdout


def test_members_of_the_admin_group_are_allowed_without_polkit(
    make_daemon: MakeDaemon,
) -> None:
    daemon = make_daemon(group="nogroup")  # nobody's primary group
    daemon.start()
    result = run_peer(as_nobody(*gdbus_call(daemon.bus, "Commit")))
    # Authorized, then refused for what it asks: nothing is on trial.
    assert "GDBus.Error:org.otad.Error.NotInTrial: " in result.stderr


class FakePolkit:
    """org.freedesktop.PolicyKit1 on the test bus: answers CheckAuthorization as told."""

    def __init__(self, allow: bool) -> None:
        self.allow = allow
        self.calls: list[list[Any]] = []

    def handler(self) -> Callable[[Message], Message | None]:
        def handle(message: Message) -> Message | None:
            if (
                message.message_type is MessageType.METHOD_CALL
                and message.interface == "org.freedesktop.PolicyKit1.Authority"
                and message.member == "CheckAuthorization"
            ):
                self.calls.append(message.body)
                return Message.new_method_return(message, "(bba{ss})", [[self.allow, False, {}]])
            return None

        return handle


async def _with_polkit(daemon: Daemon, polkit: FakePolkit, argv: list[str]) -> str:
    bus: MessageBus = await connect(daemon.bus.address)
    try:
        bus.add_message_handler(polkit.handler())
        await bus.request_name("org.freedesktop.PolicyKit1")
        _, _, stderr = await run_peer_async(argv)
        return stderr
    finally:
        await close(bus)


@pytest.mark.parametrize("allow", [False, True])
def test_polkit_decides_where_it_is_on_the_bus(daemon: Daemon, allow: bool) -> None:
    before = DeviceState.of(daemon.device)
    polkit = FakePolkit(allow)
    stderr = run(_with_polkit(daemon, polkit, as_nobody(*gdbus_call(daemon.bus, "Commit"))))
    if allow:
        assert "GDBus.Error:org.otad.Error.NotInTrial: " in stderr
    else:
        assert "GDBus.Error:org.otad.Error.NotAuthorized: " in stderr
        assert "polkit does not allow it (org.otad.manage for uid 65534)" in stderr
    assert len(polkit.calls) == 1
    subject, action, details, flags, cancellation = polkit.calls[0]
    assert subject[0] == "system-bus-name"
    assert subject[1]["name"].value.startswith(":")
    assert (action, details, flags, cancellation) == ("org.otad.manage", {}, 1, "")
    assert DeviceState.of(daemon.device) == before


def test_root_is_allowed_without_asking_polkit(daemon: Daemon) -> None:
    polkit = FakePolkit(False)
    stderr = run(_with_polkit(daemon, polkit, gdbus_call(daemon.bus, "Commit")))
    assert "GDBus.Error:org.otad.Error.NotInTrial: " in stderr
    assert polkit.calls == []
