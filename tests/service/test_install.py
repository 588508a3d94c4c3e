"""Installing through the daemon: by path and by descriptor, with Progress, State and
Completed; Inspect and GetSlots; refused artifacts and bad arguments change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from pathlib import Path

import pytest
from dbus_next.errors import DBusError
from dbus_next.signature import Variant

from otad.dbus.client import Completed, Event, PropertiesChanged
from tests.engine.conftest import Device
from tests.service.conftest import (
    TEST_TIMEOUT,
    Daemon,
    DeviceState,
    connect,
    gdbus_call,
    run,
    run_peer,
)


async def until_completed(events: asyncio.Queue[Event], job: str) -> tuple[Completed, list[Event]]:
    """Collect events up to the Completed of `job`."""
    seen: list[Event] = []
    while True:
        event = await events.get()
        seen.append(event)
        if isinstance(event, Completed) and event.job == job:
            return event, seen


def changes(seen: list[Event], name: str) -> list[object]:
    return [e.changed[name] for e in seen if isinstance(e, PropertiesChanged) and name in e.changed]


def image_in_slot_b(device: Device, artifact: Path) -> bool:
    image = artifact.with_suffix(".img").read_bytes()
    with device.disk.partitions["b"].open("rb") as slot:
        return hashlib.sha256(slot.read(len(image))).digest() == hashlib.sha256(image).digest()


def test_install_by_path_reports_progress_and_completes(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    async def body() -> None:
        client = await connect(daemon.bus)
        before = await client.properties()
        assert before == {
            "State": "idle",
            "Operation": "none",
            "Progress": [0, ""],
            "BootedSlot": "a",
            "NextSlot": "a",
            "CurrentArtifact": "release-1",
            "Compatible": "otad-test",
            "LastError": "",
            "Server": "",
            "ServerStatus": "disabled",
            "ServerError": "",
            "LastPoll": 0,
            "Deployment": ["", ""],
            "DeploymentStatus": "",
        }
        events = await client.subscribe()
        job = await client.install(str(artifacts["release-2"]), {})
        done, seen = await until_completed(events, job)
        assert done == Completed(job, 0, "installed release-2 into slot b; reboot to try it")
        assert changes(seen, "State") == ["installing", "reboot-required"]
        assert changes(seen, "Operation") == ["install", "none"]
        percents = [value[0] for value in changes(seen, "Progress")]  # type: ignore[index]
        assert any(0 < percent < 100 for percent in percents)
        assert percents == sorted(percents)
        assert percents[-1] == 100
        after = await client.properties()
        assert after["State"] == "reboot-required"
        assert after["NextSlot"] == "b"
        assert after["LastError"] == ""
        slots = dict(await client.slots())
        assert slots["a"] == {
            "device": str(daemon.device.disk.partitions["a"]),
            "booted": True,
            "next": False,
            "status": "good",
            "artifact": "release-1",
            "version": "1.0",
        }
        assert slots["b"]["status"] == "trial"
        assert (slots["b"]["artifact"], slots["b"]["version"]) == ("release-2", "2.0")
        assert slots["b"]["next"] is True
        await client.close()

    run(body())
    assert image_in_slot_b(daemon.device, artifacts["release-2"])
    assert not daemon.reboots.exists()


def test_install_from_a_pipe_by_descriptor_and_reboot_option(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    data = artifacts["release-2"].read_bytes()
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)

    async def body() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        job = await client.install_fd(read_end, {"reboot": Variant("b", True)})
        os.close(read_end)  # the daemon holds its own copy now
        feeder = threading.Thread(target=feed)
        feeder.start()
        done, seen = await until_completed(events, job)
        await asyncio.get_running_loop().run_in_executor(None, feeder.join)
        assert done.result == 0, done.message
        assert changes(seen, "State")[-1] == "reboot-required"
        await client.close()

    run(body())
    assert image_in_slot_b(daemon.device, artifacts["release-2"])
    # Reboot was asked for: the daemon ran its reboot command once.
    assert daemon.reboots.read_text() == "reboot\n"


def test_inspect_describes_without_installing(daemon: Daemon, artifacts: dict[str, Path]) -> None:
    before = DeviceState.of(daemon.device)

    async def body() -> dict[str, object]:
        client = await connect(daemon.bus)
        info = await client.inspect(str(artifacts["release-2"]))
        await client.close()
        return info

    info = run(body())
    assert info == {
        "name": "release-2",
        "devices": ["otad-test"],
        "version": "2.0",
        "payload-type": "rootfs-image",
        "signature": "verified",
        "signed-by": str(daemon.device.verifier.source),
        "size": artifacts["release-2"].stat().st_size,
    }
    unsigned = run_peer(gdbus_call(daemon.bus, "Inspect", str(artifacts["unsigned"])))
    assert unsigned.returncode == 0, unsigned.stderr
    assert "'signature': <'unsigned'>" in unsigned.stdout
    assert DeviceState.of(daemon.device) == before


@pytest.mark.parametrize(
    ("artifact", "error"),
    [
        ("garbage", "org.otad.Error.InvalidArtifact"),
        ("truncated", "org.otad.Error.InvalidArtifact"),
        ("unsigned", "org.otad.Error.BadSignature"),
        ("foreign", "org.otad.Error.BadSignature"),
        ("other-device", "org.otad.Error.Incompatible"),
        ("release-0", "org.otad.Error.Downgrade"),
        ("too-big", "org.otad.Error.NoSpace"),
    ],
)
def test_refused_artifact_is_a_named_error_and_changes_nothing(
    daemon: Daemon, artifacts: dict[str, Path], artifact: str, error: str, tmp_path: Path
) -> None:
    """Refused before Install returns: the header, signature and compatibility are checked
    first (a flipped payload byte is found while installing: see the pipe test below)."""
    made = {
        "garbage": b"this is not an artifact\n" * 100,
        "truncated": artifacts["release-2"].read_bytes()[:3000],
    }
    path = artifacts.get(artifact) or tmp_path / f"{artifact}.mender"
    if artifact in made:
        path.write_bytes(made[artifact])
    before = DeviceState.of(daemon.device)
    result = run_peer(gdbus_call(daemon.bus, "Install", str(path), "{}"))
    assert result.returncode != 0
    assert f"GDBus.Error:{error}: " in result.stderr
    assert "Traceback" not in result.stderr
    assert DeviceState.of(daemon.device) == before

    async def properties() -> dict[str, object]:
        client = await connect(daemon.bus)
        values = await client.properties()
        await client.close()
        return values

    values = run(properties())
    assert (values["State"], values["Operation"], values["NextSlot"]) == ("idle", "none", "a")


def test_tampered_payload_from_a_pipe_fails_in_completed(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    """A pipe cannot be checked before it is installed: the error comes with Completed."""
    data = artifacts["tampered"].read_bytes()
    read_end, write_end = os.pipe()

    def feed() -> None:
        # The daemon may stop reading at the bad checksum: a broken pipe is expected.
        with os.fdopen(write_end, "wb") as pipe, contextlib.suppress(BrokenPipeError):
            pipe.write(data)

    async def body() -> Completed:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        job = await client.install_fd(read_end, {})
        os.close(read_end)
        feeder = threading.Thread(target=feed)
        feeder.start()
        done, _ = await until_completed(events, job)
        await asyncio.get_running_loop().run_in_executor(None, feeder.join)
        values = await client.properties()
        assert values["State"] == "idle"
        assert values["LastError"] == done.message
        assert values["Progress"] == [0, ""]  # no "writing slot b" left from the failed install
        slots = dict(await client.slots())
        assert slots["b"]["status"] == "empty"
        assert slots["b"]["next"] is False
        await client.close()
        return done

    done = run(body())
    assert done.result == 1
    assert "checksum" in done.message


@pytest.mark.parametrize(
    ("arguments", "text"),
    [
        (["{'bogus': <true>}"], "unknown option 'bogus'"),
        (["{'reboot': <'yes'>}"], "option 'reboot' must have type b, found s"),
        (["{'allow-downgrade': <1>}"], "option 'allow-downgrade' must have type b"),
    ],
)
def test_bad_options_are_invalid_args(
    daemon: Daemon, artifacts: dict[str, Path], arguments: list[str], text: str
) -> None:
    before = DeviceState.of(daemon.device)
    result = run_peer(gdbus_call(daemon.bus, "Install", str(artifacts["release-2"]), *arguments))
    assert "GDBus.Error:org.otad.Error.InvalidArgs: " in result.stderr
    assert text in result.stderr
    rollback = run_peer(gdbus_call(daemon.bus, "Rollback", *arguments))
    assert "GDBus.Error:org.otad.Error.InvalidArgs: " in rollback.stderr
    assert DeviceState.of(daemon.device) == before


@pytest.mark.parametrize(
    ("source", "text"),
    [
        ("ftp://updates.example.com/release-2.mender", "is not an absolute path"),
        ("relative/release-2.mender", "is not an absolute path"),
        ("/nonexistent/release-2.mender", "No such file or directory"),
        ("/dev/null", "is not a regular file"),
    ],
)
def test_unusable_sources_are_invalid_args(daemon: Daemon, source: str, text: str) -> None:
    async def body() -> None:
        client = await connect(daemon.bus)
        with pytest.raises(DBusError) as raised:
            await client.install(source, {})
        assert raised.value.type == "org.otad.Error.InvalidArgs"
        assert text in raised.value.text
        await client.close()

    run(body())


def test_second_install_while_one_runs_is_busy_and_cancel_stops_it(
    daemon: Daemon, artifacts: dict[str, Path]
) -> None:
    data = artifacts["release-2"].read_bytes()
    cut = len(data) - (128 << 10)  # the reader reads ahead in blocks of up to 1 MiB
    read_end, write_end = os.pipe()
    go_on = threading.Event()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            try:
                pipe.write(data[:cut])
                pipe.flush()
                go_on.wait(TEST_TIMEOUT)
                pipe.write(data[cut:])
            except BrokenPipeError:
                pass  # the daemon stopped reading: cancelled

    async def body() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        job = await client.install_fd(read_end, {})
        os.close(read_end)
        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            while True:  # writing has begun
                event = await events.get()
                if isinstance(event, PropertiesChanged) and event.changed.get("Progress", [0])[0]:
                    break
            with pytest.raises(DBusError) as raised:
                await client.install(str(artifacts["release-3"]), {})
            assert raised.value.type == "org.otad.Error.Busy"
            assert "another operation is in progress" in raised.value.text
            with pytest.raises(DBusError) as commit:
                await client.commit()
            assert commit.value.type == "org.otad.Error.Busy"
            await client.cancel()
        finally:
            go_on.set()
        done, _ = await until_completed(events, job)
        await asyncio.get_running_loop().run_in_executor(None, feeder.join)
        assert done == Completed(job, 130, "the install was cancelled")
        values = await client.properties()
        assert (values["State"], values["NextSlot"]) == ("idle", "a")
        assert values["LastError"] == "the install was cancelled"
        assert dict(await client.slots())["b"]["status"] == "empty"
        await client.close()

    run(body())
