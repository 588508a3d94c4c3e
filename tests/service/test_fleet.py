"""The daemon managed from a Mender server: the real otad on a private bus over a
loop-device disk, and the schema-checking fake server of tests/fleet/server.py.

A deployment is authenticated, polled, downloaded into slot B, reported in order,
committed after the trial boot (success) or fallen back from (failure); the D-Bus
properties follow it; a 401 makes the device authenticate again; a server error backs
off; an install from D-Bus while a deployment runs is refused; a deployment that a stop of
otad interrupted is installed again, not reported failed; no [server] means no network
at all; a bad [server] stops the daemon at start with the key named. Kills mid-download
and the resume from the slot are in tests/download/test_fleet_restart.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next.errors import DBusError

from otad.bootloader.base import Slot
from otad.dbus.client import PropertiesChanged
from tests.fleet.server import AUTH, NEXT_V2, FakeMender, Offer
from tests.service.conftest import ROOT, Daemon, MakeDaemon, connect, run
from tests.service.test_install import image_in_slot_b, until_completed
from tests.service.test_otactl import otactl

WAIT = 45.0  # seconds any one expected change may take


@pytest.fixture
def server() -> Iterator[FakeMender]:
    mender = FakeMender()
    try:
        yield mender
    finally:
        mender.close()
    assert mender.violations == []


def server_config(server: FakeMender, download: str = "", **settings: Any) -> str:
    """[download] allowing the fake server's plain http (and `download`'s lines), and a
    [server] table for it."""
    values = {
        "url": f'"{server.url}"',
        "tenant_token": '"tenant-token-1"',
        "key_type": '"ed25519"',
        "poll_interval": 1,
        "retry_interval": 1,
        **settings,
    }
    lines = "".join(f"{key} = {value}\n" for key, value in values.items())
    return (
        f"\n[download]\nallow_http = true\nretries = 2\n{download}"
        f'\n[server]\n{lines}\n[server.identity]\nserial = "SN-0042"\n'
    )


def properties(daemon: Daemon) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        client = await connect(daemon.bus)
        try:
            return await client.properties()
        finally:
            await client.close()

    return run(read())


def server_status(daemon: Daemon) -> str:
    return str(properties(daemon)["ServerStatus"])


def wait_until(what: str, check: Callable[[], bool], daemon: Daemon) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"not within {WAIT} s: {what}\n{daemon.log_text()[-4000:]}")


def statuses(server: FakeMender, deployment: str) -> list[str]:
    return [status for seen, status in server.statuses if seen == deployment]


def fleet_daemon(make_daemon: MakeDaemon, server: FakeMender, **settings: Any) -> Daemon:
    daemon = make_daemon(extra_config=server_config(server, **settings))
    daemon.start()
    return daemon


def install_deployment(daemon: Daemon, server: FakeMender, artifact: Path) -> None:
    """Offer release-2 as deployment dep-1 and wait until the device asks to reboot."""
    server.script.offers.append(Offer("dep-1", "release-2", artifact))
    wait_until("the reboot after the install", daemon.reboots.exists, daemon)
    assert statuses(server, "dep-1") == ["downloading", "installing", "rebooting"]
    assert image_in_slot_b(daemon.device, artifact)


def test_deployment_is_installed_reported_and_committed_after_the_trial(
    make_daemon: MakeDaemon, server: FakeMender, artifacts: dict[str, Path]
) -> None:
    daemon = fleet_daemon(make_daemon, server)
    wait_until("a first poll", lambda: bool(server.requests("POST", NEXT_V2)), daemon)
    key = daemon.device.store.path.parent / "fleet" / "device-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert server.identities[0] == {"serial": "SN-0042"}

    install_deployment(daemon, server, artifacts["release-2"])

    values = properties(daemon)
    assert values["State"] == "reboot-required"
    assert values["ServerStatus"] == "authorized"
    assert values["Server"] == server.url
    assert values["Deployment"] == ["dep-1", "release-2"]
    assert values["DeploymentStatus"] == "rebooting"
    assert values["LastPoll"] > 0
    code, out, err = otactl(daemon, "status")
    assert code == 0, err
    assert f"Server: {server.url} (authorized)\n" in out
    assert "Deployment: dep-1 (release-2), rebooting\n" in out
    code, out, _ = otactl(daemon, "status", "--json")
    assert json.loads(out)["server"]["deployment"] == {"id": "dep-1", "artifact": "release-2"}

    assert daemon.reboot_device() is Slot.B
    assert properties(daemon)["Deployment"] == ["dep-1", "release-2"]

    async def commit() -> None:
        client = await connect(daemon.bus)
        await client.commit()
        await client.close()

    run(commit())
    wait_until("success reported", lambda: statuses(server, "dep-1")[-1:] == ["success"], daemon)
    assert statuses(server, "dep-1") == ["downloading", "installing", "rebooting", "success"]
    wait_until(
        "the inventory of release-2",
        lambda: server.inventory.get("artifact_name") == "release-2",
        daemon,
    )
    values = properties(daemon)
    assert (values["State"], values["CurrentArtifact"]) == ("idle", "release-2")
    assert (values["Deployment"], values["DeploymentStatus"]) == (["", ""], "success")
    assert len(server.requests("POST", AUTH)) == 2  # once per start of the daemon
    assert not (daemon.device.store.path.parent / "fleet" / "deployment.json").exists()


def test_a_missing_device_key_is_made_on_the_fleet_thread_after_start(
    make_daemon: MakeDaemon, server: FakeMender
) -> None:
    """Making a key (seconds for RSA on a small board) must not hold up READY and D-Bus."""
    daemon = fleet_daemon(make_daemon, server)
    wait_until("a first poll", lambda: bool(server.requests("POST", NEXT_V2)), daemon)
    log = daemon.log_text()
    key = daemon.device.store.path.parent / "fleet" / "device-key.pem"
    assert f"no device key yet: the fleet client makes one (ed25519) in {key}" in log
    assert log.index("started: ") < log.index("generating the device key (ed25519)")
    assert key.stat().st_mode & 0o777 == 0o600
    assert server.identities[0] == {"serial": "SN-0042"}


def test_a_device_key_path_that_cannot_be_made_stops_the_daemon_at_start(
    make_daemon: MakeDaemon, server: FakeMender, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    daemon = make_daemon(
        extra_config=server_config(server, device_key=f'"{blocker}/keys/device-key.pem"')
    )
    daemon.write_config()

    result = subprocess.run(
        daemon.argv(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"cannot make the directory of the device key {blocker}/keys/device-key.pem: "
            "Not a directory"
        )
    ), result.stderr
    assert server.seen == []


def test_fallback_after_the_trial_reports_failure_with_the_log(
    make_daemon: MakeDaemon, server: FakeMender, artifacts: dict[str, Path]
) -> None:
    daemon = fleet_daemon(make_daemon, server)
    install_deployment(daemon, server, artifacts["release-2"])

    booted = daemon.reboot_device()
    for _ in range(5):  # the trial is never committed: the boots run out
        if booted is Slot.A:
            break
        booted = daemon.reboot_device()
    assert booted is Slot.A

    wait_until("failure reported", lambda: statuses(server, "dep-1")[-1:] == ["failure"], daemon)
    assert statuses(server, "dep-1") == ["downloading", "installing", "rebooting", "failure"]
    messages = server.logs["dep-1"]
    assert [m["message"] for m in messages][:2] == ["downloading release-2", "installing"]
    assert messages[-1]["level"] == "ERROR"
    values = properties(daemon)
    assert (values["BootedSlot"], values["CurrentArtifact"]) == ("a", "release-1")
    assert values["DeploymentStatus"] == "failure"


def test_install_from_dbus_is_refused_while_a_deployment_runs(
    make_daemon: MakeDaemon, server: FakeMender, artifacts: dict[str, Path]
) -> None:
    held = threading.Event()
    server.script.hold_status = held
    server.script.offers.append(Offer("dep-2", "release-2", artifacts["release-2"]))
    daemon = fleet_daemon(make_daemon, server)
    try:
        wait_until(
            "the downloading report",
            lambda: any(s.path.endswith("/dep-2/status") for s in server.seen),
            daemon,
        )

        async def install() -> None:
            client = await connect(daemon.bus)
            with pytest.raises(DBusError) as refused:
                await client.install(str(artifacts["release-3"]), {})
            assert refused.value.type == "org.otad.Error.Busy"
            assert refused.value.text == (
                "deployment dep-2 (release-2) from the Mender server is in progress"
            )
            values = await client.properties()
            assert values["Deployment"] == ["dep-2", "release-2"]
            await client.close()

        run(install())
    finally:
        held.set()
    wait_until("the reboot after the install", daemon.reboots.exists, daemon)
    assert statuses(server, "dep-2") == ["downloading", "installing", "rebooting"]
    assert image_in_slot_b(daemon.device, artifacts["release-2"])


def test_deployment_waits_while_an_install_from_dbus_runs(
    make_daemon: MakeDaemon, server: FakeMender, artifacts: dict[str, Path]
) -> None:
    daemon = fleet_daemon(make_daemon, server)
    wait_until("a first poll", lambda: bool(server.requests("POST", NEXT_V2)), daemon)
    data = artifacts["release-2"].read_bytes()
    read_end, write_end = os.pipe()
    half = threading.Event()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data[: len(data) // 2])
            pipe.flush()
            half.wait(WAIT)
            pipe.write(data[len(data) // 2 :])

    async def body() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        job = await client.install_fd(read_end, {})
        os.close(read_end)
        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            server.script.offers.append(Offer("dep-4", "release-3", artifacts["release-3"]))
            await asyncio.get_running_loop().run_in_executor(
                None,
                wait_until,
                "a poll skipped for the install",
                lambda: "not checking for deployments: an update is installing"
                in daemon.log_text(),
                daemon,
            )
        finally:
            half.set()
        done, _ = await until_completed(events, job)
        await asyncio.get_running_loop().run_in_executor(None, feeder.join)
        assert done.result == 0, done.message
        await client.close()

    run(body())
    wait_until(
        "a poll skipped for the reboot",
        lambda: "not checking for deployments: an update is installed" in daemon.log_text(),
        daemon,
    )
    assert "dep-4" not in server.offered  # never handed out
    assert server.statuses == []
    assert image_in_slot_b(daemon.device, artifacts["release-2"])


def test_sigterm_during_a_deployment_stops_and_the_next_start_installs_it_again(
    make_daemon: MakeDaemon, server: FakeMender, artifacts: dict[str, Path]
) -> None:
    held = threading.Event()
    server.script.hold_status = held
    server.script.offers.append(Offer("dep-3", "release-2", artifacts["release-2"]))
    daemon = fleet_daemon(make_daemon, server)
    record = daemon.device.store.path.parent / "fleet" / "deployment.json"
    slot_b = daemon.device.slot_digest(Slot.B)
    try:
        wait_until(
            "the downloading report",
            lambda: any(s.path.endswith("/dep-3/status") for s in server.seen),
            daemon,
        )
        assert daemon.stop() == 0  # while the poller waits for the server's answer
    finally:
        held.set()
    assert json.loads(record.read_text())["stage"] == "installing"
    assert daemon.device.slot_digest(Slot.B) == slot_b

    daemon.start()
    # Not a failure: the server hands the deployment out again and it is installed again.
    wait_until("the reboot after the install", daemon.reboots.exists, daemon)
    # The answer to the first "downloading" never reached the stopped daemon: sent again.
    assert statuses(server, "dep-3") == ["downloading", "downloading", "installing", "rebooting"]
    assert "dep-3" not in server.logs
    assert [deployment for deployment, _ in server.handed_out] == ["dep-3", "dep-3"]
    assert image_in_slot_b(daemon.device, artifacts["release-2"])
    saved = json.loads(record.read_text())
    assert (saved["stage"], saved["interruptions"]) == ("rebooting", 1)
    log = daemon.log_text()
    assert "installing release-2 was interrupted; it is installed again" in log
    assert properties(daemon)["State"] == "reboot-required"


def test_revoked_token_makes_the_device_authenticate_again(
    make_daemon: MakeDaemon, server: FakeMender
) -> None:
    server.script.refuse_auth = 1000  # not accepted yet
    daemon = fleet_daemon(make_daemon, server)
    wait_until("unauthorized", lambda: server_status(daemon) == "unauthorized", daemon)
    assert "device unauthorized" in properties(daemon)["ServerError"]
    assert server.requests("POST", NEXT_V2) == []

    async def accept() -> dict[str, Any]:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        server.script.refuse_auth = 0  # a person accepts the device on the server
        while True:
            event = await events.get()
            if isinstance(event, PropertiesChanged) and "ServerStatus" in event.changed:
                await client.close()
                return event.changed

    changed = run(accept())
    assert (changed["ServerStatus"], changed["ServerError"]) == ("authorized", "")
    wait_until("inventory", lambda: bool(server.inventory), daemon)
    accepted = len(server.requests("POST", AUTH))

    server.revoke_tokens()
    polls = len(server.requests("POST", NEXT_V2))
    wait_until(
        "a poll after the new token",
        lambda: len(server.requests("POST", NEXT_V2)) >= polls + 2,
        daemon,
    )
    assert len(server.requests("POST", AUTH)) == accepted + 1
    values = properties(daemon)
    assert (values["ServerStatus"], values["ServerError"]) == ("authorized", "")
    assert "authenticating again" in daemon.log_text()


def test_server_error_backs_off_doubling(make_daemon: MakeDaemon, server: FakeMender) -> None:
    server.script.fail_next.extend([500, 500])
    daemon = fleet_daemon(make_daemon, server, poll_interval=60)
    wait_until("three polls", lambda: len(server.requests("POST", NEXT_V2)) >= 3, daemon)

    first, second, third = (seen.at for seen in server.requests("POST", NEXT_V2)[:3])
    assert second - first >= 1.0  # retry_interval
    assert third - second >= 2.0  # doubled
    log = daemon.log_text()
    assert "injected failure" in log
    assert "trying again in 1 s" in log
    assert "trying again in 2 s" in log
    values = properties(daemon)
    assert (values["ServerStatus"], values["ServerError"]) == ("authorized", "")
    assert len(server.requests("POST", NEXT_V2)) == 3  # then poll_interval: 60 s


def _inet_sockets(pid: int) -> set[str]:
    """The inodes of the TCP and UDP sockets (IPv4 and IPv6) that process `pid` holds."""
    held = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        target = str(link.readlink()) if link.is_symlink() else ""
        if target.startswith("socket:["):
            held.add(target[8:-1])
    inet = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            inet.add(line.split()[9])
    return held & inet


def test_without_server_table_nothing_goes_to_the_network(daemon: Daemon) -> None:
    values = properties(daemon)
    assert (values["Server"], values["ServerStatus"], values["LastPoll"]) == ("", "disabled", 0)
    assert values["Deployment"] == ["", ""]
    assert daemon.process is not None
    assert _inet_sockets(daemon.process.pid) == set()
    assert not (daemon.device.store.path.parent / "fleet").exists()
    assert "not managed by a Mender server" in daemon.log_text()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"url": '"http://mender.example.com"'}, "server.url"),
        ({"tenant_token_file": '"/nonexistent/tenant-token"'}, "server.tenant_token_file"),
        ({"ca_bundle": '"/nonexistent/ca.pem"'}, "server.ca_bundle"),
        ({"poll_interval": 0}, "server.poll_interval"),
        ({"identity_script": '"/bin/false"'}, "/bin/false"),
        ({"proxy": '"x"'}, "server.proxy"),
    ],
)
def test_bad_server_table_stops_the_daemon_at_start(
    make_daemon: MakeDaemon, server: FakeMender, settings: dict[str, Any], key: str
) -> None:
    settings = {"tenant_token": '""', **settings} if "tenant_token_file" in settings else settings
    config = server_config(server, **settings)
    if "http://mender" in config:
        config = config.replace("allow_http = true", "allow_http = false")
    daemon = make_daemon(extra_config=config)
    daemon.write_config()

    result = subprocess.run(
        daemon.argv(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 3, result.stderr
    assert key in result.stderr.strip().splitlines()[-1], result.stderr
    assert server.seen == []
    assert not (daemon.device.store.path.parent / "fleet").exists()
    assert daemon.device.bootloader.status().next_boot is Slot.A


@pytest.mark.parametrize("when", ["before the reboot", "during the trial"])
def test_a_kill_after_the_install_reports_each_status_once(
    make_daemon: MakeDaemon, server: FakeMender, artifacts: dict[str, Path], when: str
) -> None:
    """SIGKILL once the install is done (the reboot asked for but not made), or while the
    trial runs: the next start reports nothing again, asks again for a reboot that did not
    happen, and reports success once after the commit."""
    daemon = fleet_daemon(make_daemon, server)
    install_deployment(daemon, server, artifacts["release-2"])
    if when == "during the trial":
        assert daemon.reboot_device() is Slot.B
        wait_until("a poll on trial", lambda: "waits: the update is trial" in daemon.log_text(),
                   daemon)  # fmt: skip
    daemon.kill()

    daemon.start()
    if when == "before the reboot":
        wait_until("a second reboot", lambda: len(daemon.reboots.read_text().split()) == 2,
                   daemon)  # fmt: skip
        assert "the reboot into release-2 did not happen; rebooting" in daemon.log_text()
        assert daemon.reboot_device() is Slot.B
    assert properties(daemon)["DeploymentStatus"] == "rebooting"

    async def commit() -> None:
        client = await connect(daemon.bus)
        await client.commit()
        await client.close()

    run(commit())
    wait_until("success reported", lambda: statuses(server, "dep-1")[-1:] == ["success"], daemon)
    assert statuses(server, "dep-1") == ["downloading", "installing", "rebooting", "success"]
    assert [deployment for deployment, _ in server.handed_out] == ["dep-1"]
    assert "dep-1" not in server.logs
