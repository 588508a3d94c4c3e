"""Removable media in the running daemon: a loop-device "stick" is attached, the daemon
hears the kernel's event, and installs or offers the artifact on it; a tampered one is
refused and changes nothing.

The daemon runs with its test-only --removable-backing-dir, so that the loop devices
attached from this test's images count as media and no other disk does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_next.errors import DBusError

from otad.bootloader.base import Slot
from otad.dbus.client import ArtifactOffered, Completed, Event, UpdaterClient
from tests.conftest import require_tool
from tests.removable.conftest import Bench, mounts_under
from tests.service.conftest import (
    Daemon,
    DeviceState,
    MakeDaemon,
    as_nobody,
    connect,
    gdbus_call,
    run,
    run_peer_async,
)
from tests.service.test_install import image_in_slot_b
from tests.service.test_otactl import otactl

EVENT_DEADLINE = 20.0  # seconds from attaching a stick to the daemon's signal
RELEASE_DEADLINE = 10.0  # seconds for the daemon to unmount the medium


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    """Sticks made from images under their own directory, detached whatever happens."""
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "blkid"):
        require_tool(tool)
    root = tmp_path / "sticks"
    root.mkdir()
    made = Bench(root, tmp_path / "media")
    try:
        yield made
    finally:
        made.cleanup()


def start(make_daemon: MakeDaemon, bench: Bench, action: str) -> Daemon:
    daemon = make_daemon(
        extra_config=f'[removable]\nenabled = true\naction = "{action}"\n',
        extra_args=[
            "--removable-backing-dir", str(bench.root), "--media-dir", str(bench.media_dir)
        ],
    )  # fmt: skip
    daemon.start()
    return daemon


def stick(bench: Bench, artifact: Path, name: str = "update.mender") -> Path:
    tree = bench.root / "tree"
    tree.mkdir()
    shutil.copy(artifact, tree / name)
    image = bench.image(tree)
    shutil.rmtree(tree)
    return image


async def next_event(events: asyncio.Queue[Event], kind: type[Event], deadline: float) -> Event:
    """The next event of `kind` before `deadline` (time.monotonic())."""
    while True:
        event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        if isinstance(event, kind):
            return event


def wait_until_released(bench: Bench) -> None:
    deadline = time.monotonic() + RELEASE_DEADLINE
    while mounts_under(bench.media_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mounts_under(bench.media_dir) == []


def wait_for_log(daemon: Daemon, text: str) -> None:
    deadline = time.monotonic() + EVENT_DEADLINE
    while text not in daemon.log_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{daemon.log_text()}"
        time.sleep(0.1)


def test_install_mode_installs_an_inserted_medium(
    make_daemon: MakeDaemon, bench: Bench, artifacts: dict[str, Path]
) -> None:
    daemon = start(make_daemon, bench, "install")
    image = stick(bench, artifacts["release-2"])

    async def body() -> Completed:
        client = await connect(daemon.bus)
        try:
            events = await client.subscribe()
            bench.attach(image)
            done = await next_event(events, Completed, time.monotonic() + EVENT_DEADLINE)
            assert isinstance(done, Completed)
            assert (await client.properties())["State"] == "reboot-required"
            return done
        finally:
            await client.close()

    done = run(body())
    assert (done.result, done.message) == (0, "installed release-2 into slot b; reboot to try it")
    assert daemon.device.bootloader.status().next_boot is Slot.B
    assert image_in_slot_b(daemon.device, artifacts["release-2"])
    wait_until_released(bench)


async def _offered(client: UpdaterClient, bench: Bench, image: Path) -> ArtifactOffered:
    events = await client.subscribe()
    loop = bench.attach(image)
    offer = await next_event(events, ArtifactOffered, time.monotonic() + EVENT_DEADLINE)
    assert isinstance(offer, ArtifactOffered)
    assert offer.medium == loop.name
    return offer


def test_announce_mode_offers_and_installs_only_for_an_authorized_caller(
    make_daemon: MakeDaemon, bench: Bench, artifacts: dict[str, Path]
) -> None:
    daemon = start(make_daemon, bench, "announce")
    image = stick(bench, artifacts["release-2"], "release-2.mender")
    before = DeviceState.of(daemon.device)

    async def body() -> tuple[str, Completed]:
        client = await connect(daemon.bus)
        try:
            offer = await _offered(client, bench, image)
            assert offer.info == {
                "name": "release-2",
                "version": "2.0",
                "payload-type": "rootfs-image",
                "devices": ["otad-test"],
                "signature": "verified",
                "size": artifacts["release-2"].stat().st_size,
                "file": "release-2.mender",
            }
            assert await client.offers() == [(offer.medium, offer.info)]
            wait_until_released(bench)  # nothing stays mounted while a person decides
            assert DeviceState.of(daemon.device) == before

            refused = gdbus_call(daemon.bus, "InstallOffered", offer.medium, "{}")
            _, _, stderr = await run_peer_async(as_nobody(*refused))
            assert "org.otad.Error.NotAuthorized: not authorized to install" in stderr
            assert DeviceState.of(daemon.device) == before

            with pytest.raises(DBusError) as unknown:
                await client.install_offered("sdz", {})
            assert unknown.value.type == "org.otad.Error.InvalidArgs"

            events = await client.subscribe()
            job = await client.install_offered(offer.medium, {})
            while True:
                done = await next_event(events, Completed, time.monotonic() + EVENT_DEADLINE)
                assert isinstance(done, Completed)
                if done.job == job:
                    break
            assert await client.offers() == []  # installed: the offer is used up
            return offer.medium, done
        finally:
            await client.close()

    medium, done = run(body())
    assert (done.result, done.message) == (0, "installed release-2 into slot b; reboot to try it")
    assert daemon.device.bootloader.status().next_boot is Slot.B
    assert image_in_slot_b(daemon.device, artifacts["release-2"])
    wait_until_released(bench)
    assert f"medium {medium}: installed release-2" in daemon.log_text()


def test_a_tampered_artifact_on_a_medium_is_refused_and_nothing_changes(
    make_daemon: MakeDaemon, bench: Bench, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered.mender"
    data = bytearray(artifacts["release-2"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the payload: its checksum no longer matches
    tampered.write_bytes(data)
    daemon = start(make_daemon, bench, "install")
    image = stick(bench, tampered)
    before = DeviceState.of(daemon.device)

    loop = bench.attach(image)
    wait_for_log(daemon, f"medium {loop.name}: ")
    wait_for_log(daemon, "nothing from this medium was installed")

    wait_until_released(bench)
    assert DeviceState.of(daemon.device) == before
    assert daemon.device.bootloader.status().next_boot is Slot.A
    assert "checksum" in daemon.log_text()

    async def status() -> dict[str, object]:
        client = await connect(daemon.bus)
        try:
            return await client.properties()
        finally:
            await client.close()

    values = run(status())
    assert (values["State"], values["LastError"]) == ("idle", "")


def test_otactl_lists_and_installs_an_offer(
    make_daemon: MakeDaemon, bench: Bench, artifacts: dict[str, Path]
) -> None:
    daemon = start(make_daemon, bench, "announce")
    loop = bench.attach(stick(bench, artifacts["release-2"]))
    wait_for_log(daemon, f"medium {loop.name}: announced release-2")

    code, out, err = otactl(daemon, "offers")
    assert code == 0, err
    size = artifacts["release-2"].stat().st_size
    assert out == f"{loop.name}: release-2 2.0 (update.mender, {size} bytes)\n"
    code, _, err = otactl(daemon, "install-offered", "sdz")
    assert code == 2
    assert "no artifact is on offer from medium 'sdz'" in err
    code, out, err = otactl(daemon, "install-offered", loop.name)
    assert code == 0, err
    assert out.endswith("installed release-2 into slot b; reboot to try it\n")
    assert daemon.device.bootloader.status().next_boot is Slot.B
    code, out, _ = otactl(daemon, "offers", "--json")
    assert (code, json.loads(out)) == (0, [])
    wait_until_released(bench)
