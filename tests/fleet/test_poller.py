"""The poller against the fake server: polls, deployments, statuses, errors, inventory.

No test waits: the clock is a FakeClock and each step's returned delay is checked.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from otad.artifact.streams import Readable
from otad.errors import BadSignature
from otad.fleet.deployments import Deployment
from otad.fleet.pending import FILE_NAME
from otad.fleet.poller import DeviceHooks, Installer, Stopped
from otad.state import Outcome, Phase
from tests.fleet.conftest import FakeClock, FakeDevice, PollerFactory, open_over_http
from tests.fleet.server import AUTH, INVENTORY, NEXT_V1, NEXT_V2, FakeMender, Offer


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "release-2.mender"
    path.write_bytes(os.urandom(300_000))
    return path


def _statuses(server: FakeMender, deployment: str) -> list[str]:
    return [status for seen, status in server.statuses if seen == deployment]


def test_not_accepted_device_backs_off_until_accepted(
    server: FakeMender, make_poller: PollerFactory, clock: FakeClock
) -> None:
    server.script.refuse_auth = 4
    poller = make_poller()

    delays = []
    for _ in range(4):
        delays.append(poller.step())
        assert not poller.status.authorized
        clock.advance(delays[-1])
    delay = poller.step()

    assert delays == [60, 120, 240, 480]  # doubling from retry_interval
    assert poller.status.authorized
    assert poller.status.reachable
    assert delay == 1800  # polled (nothing to do): the next poll after poll_interval
    assert len(server.requests("POST", AUTH)) == 5
    assert server.identities[-1] == {"serial": "SN-0042"}


def test_backoff_stops_at_the_poll_interval(
    server: FakeMender, make_poller: PollerFactory, clock: FakeClock
) -> None:
    server.script.refuse_auth = 10
    poller = make_poller(poll_interval=300)

    delays = [poller.step() for _ in range(6)]

    assert delays == [60, 120, 240, 300, 300, 300]


def test_no_deployment_polls_again_after_the_interval(
    server: FakeMender, make_poller: PollerFactory, clock: FakeClock, fake_device: FakeDevice
) -> None:
    poller = make_poller()

    assert poller.step() == 1800
    clock.advance(1800)
    assert poller.step() == 1800

    polls = server.requests("POST", NEXT_V2)
    assert len(polls) == 2
    assert polls[0].body == {
        "device_provides": {
            "device_type": "otad-test",
            "artifact_name": "release-1",
            "rootfs-image.version": "1.0",
        },
        "update_control_map": False,
    }
    assert polls[0].headers["Authorization"].startswith("Bearer ")
    assert len(server.requests("POST", AUTH)) == 1  # the token is kept
    assert len(server.requests("PATCH", INVENTORY)) == 1  # inventory only every 8 h
    assert poller.status.last_poll > 0
    assert fake_device.installed == []


def test_server_without_v2_is_polled_with_v1(
    server: FakeMender, make_poller: PollerFactory, clock: FakeClock
) -> None:
    server.script.has_v2 = False
    poller = make_poller()

    poller.step()
    clock.advance(1800)
    poller.step()

    assert len(server.requests("POST", NEXT_V2)) == 1  # asked once, then v1 only
    assert len(server.requests("GET", NEXT_V1)) == 2


def test_inventory_carries_the_device_attributes(
    server: FakeMender, make_poller: PollerFactory
) -> None:
    make_poller().step()

    inventory = server.inventory
    assert inventory["device_type"] == "otad-test"
    assert inventory["artifact_name"] == "release-1"
    assert inventory["rootfs-image.version"] == "1.0"
    assert inventory["otad_version"]
    assert inventory["kernel"].startswith("Linux ")
    assert inventory["os"]
    assert inventory["update_state"] == "idle"


def test_deployment_installs_reboots_and_reports_success_after_commit(
    server: FakeMender,
    make_poller: PollerFactory,
    fake_device: FakeDevice,
    artifact: Path,
    tmp_path: Path,
) -> None:
    server.script.offers.append(Offer("d-1", "release-2", artifact))
    poller = make_poller()

    poller.step()

    [(data, deployment)] = fake_device.installed
    assert data == artifact.read_bytes()
    assert deployment.id == "d-1"
    assert deployment.artifact_name == "release-2"
    assert deployment.uri == server.handed_out[0][1]
    assert deployment.uri.startswith(f"{server.url}/artifacts/d-1?X-Amz-Expires=")
    assert fake_device.reboots == 1
    assert _statuses(server, "d-1") == ["downloading", "installing", "rebooting"]
    assert (tmp_path / "fleet" / FILE_NAME).exists()

    # After the reboot a new daemon finds the deployment on disk; the trial runs.
    poller = make_poller()
    assert poller.status.deployment_id == "d-1"
    assert poller.step() == 60  # waits for the commit
    assert _statuses(server, "d-1") == ["downloading", "installing", "rebooting"]

    fake_device.finish_trial("commit", True, "slot b committed", "release-2")
    poller.wake()
    poller.step()

    assert _statuses(server, "d-1") == ["downloading", "installing", "rebooting", "success"]
    assert "d-1" not in server.logs
    assert not (tmp_path / "fleet" / FILE_NAME).exists()
    assert poller.status.deployment_id == ""
    assert poller.status.deployment_status == "success"


def test_failed_trial_reports_failure_with_the_log(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-2", "release-2", artifact))
    make_poller().step()
    message = "the trial boot of slot b failed; the bootloader returned to slot a"
    fake_device.finish_trial("install", False, message, "release-2")

    make_poller().step()

    assert _statuses(server, "d-2") == ["downloading", "installing", "rebooting", "failure"]
    log = server.logs["d-2"]
    assert [entry["message"] for entry in log][-1] == message
    assert log[-1]["level"] == "ERROR"
    assert log[0]["timestamp"].endswith("Z")
    # The log is uploaded before the failure status.
    order = [seen.path.rsplit("/", 1)[-1] for seen in server.requests("PUT")]
    assert order[-2:] == ["log", "status"]


def test_install_error_reports_failure_and_does_not_reboot(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    fake_device.install_error = BadSignature("manifest.sig does not verify with any trusted key")
    server.script.offers.append(Offer("d-3", "release-2", artifact))

    make_poller().step()

    assert fake_device.reboots == 0
    assert _statuses(server, "d-3") == ["downloading", "installing", "failure"]
    assert "does not verify" in server.logs["d-3"][-1]["message"]


def test_missing_artifact_reports_failure(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice
) -> None:
    server.script.offers.append(Offer("d-4", "release-2", None))

    make_poller().step()

    # HttpSource connects at the first read, so the 404 surfaces while installing.
    assert fake_device.installed == []
    assert _statuses(server, "d-4") == ["downloading", "installing", "failure"]
    assert "404" in server.logs["d-4"][-1]["message"]


def test_already_installed_artifact_is_reported_so(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-5", "release-1", artifact))

    make_poller().step()

    assert fake_device.installed == []
    assert _statuses(server, "d-5") == ["already-installed"]


def test_aborted_deployment_is_not_installed(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-6", "release-2", artifact))
    server.script.aborted.add("d-6")
    poller = make_poller()

    assert poller.step() == 1800

    assert fake_device.installed == []
    assert poller.status.deployment_id == ""


def test_expired_token_mid_session_authenticates_again(
    server: FakeMender, make_poller: PollerFactory, clock: FakeClock, fake_device: FakeDevice,
    artifact: Path,
) -> None:  # fmt: skip
    poller = make_poller()
    poller.step()
    server.revoke_tokens()
    server.script.offers.append(Offer("d-7", "release-2", artifact))
    clock.advance(1800)

    poller.step()

    assert len(server.requests("POST", AUTH)) == 2
    assert len(fake_device.installed) == 1
    assert _statuses(server, "d-7") == ["downloading", "installing", "rebooting"]


def test_server_errors_back_off_and_the_poll_is_retried(
    server: FakeMender, make_poller: PollerFactory, clock: FakeClock, artifact: Path,
    fake_device: FakeDevice,
) -> None:  # fmt: skip
    server.script.fail_next.extend([500, 503, 502])
    server.script.offers.append(Offer("d-8", "release-2", artifact))
    poller = make_poller()

    delays = []
    for _ in range(3):
        delays.append(poller.step())
        assert poller.status.reachable
        assert "HTTP 5" in poller.status.last_error
        clock.advance(delays[-1])
    poller.step()

    assert delays == [60, 120, 240]
    assert len(server.requests("POST", NEXT_V2)) == 4
    assert len(fake_device.installed) == 1
    assert poller.status.last_error == ""


def test_final_status_survives_server_errors(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    server.script.offers.append(Offer("d-9", "release-2", artifact))
    make_poller().step()
    fake_device.finish_trial("commit", True, "slot b committed", "release-2")
    server.script.fail_status.extend([500, 500])
    poller = make_poller()

    assert poller.step() == 60
    assert poller.step() == 120
    assert (tmp_path / "fleet" / FILE_NAME).exists()
    poller.step()

    assert _statuses(server, "d-9")[-1] == "success"
    assert not (tmp_path / "fleet" / FILE_NAME).exists()


def test_unreachable_server_backs_off(make_poller: PollerFactory, server: FakeMender) -> None:
    poller = make_poller()
    server.close()

    assert poller.step() == 60
    assert not poller.status.reachable
    assert "no answer" in poller.status.last_error


# -- restarts of otad during a deployment ---------------------------------------------


def _stopped_install(fake_device: FakeDevice, *, installed: bool = False) -> Installer:
    """An install hook that otad's stop cuts short, as the engine records it: the install
    failed (or, with `installed`, completed) and the daemon stops before the poller notes it."""

    def install(source: Readable, deployment: Deployment) -> None:
        source.readinto(memoryview(bytearray(1000)))
        if installed:
            fake_device.view = replace(fake_device.view, phase=Phase.INSTALLED)
        else:
            message = "otad is stopping; an install from a URL resumes when it starts"
            outcome = Outcome("install", False, message, deployment.artifact_name, time.time())
            fake_device.view = replace(fake_device.view, last=outcome)
        raise Stopped()

    return install


def _hooks(fake_device: FakeDevice, install: Installer | None = None) -> DeviceHooks:
    return DeviceHooks(
        read_device=lambda: fake_device.view,
        open_artifact=open_over_http,
        install=install or fake_device.install,
        reboot=fake_device.reboot,
        rollback=fake_device.rollback,
    )


def _record(tmp_path: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((tmp_path / "fleet" / FILE_NAME).read_text())
    return value


def test_an_install_cut_short_by_a_restart_is_installed_again_not_failed(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    server.script.offers.append(Offer("d-10", "release-2", artifact))
    with pytest.raises(Stopped):
        make_poller(_hooks(fake_device, _stopped_install(fake_device))).step()
    assert _record(tmp_path)["stage"] == "installing"
    assert _statuses(server, "d-10") == ["downloading", "installing"]

    poller = make_poller(_hooks(fake_device))  # the next start of otad
    assert poller.status.deployment_id == "d-10"
    assert poller.status.deployment_status == "installing"
    poller.step()

    assert _statuses(server, "d-10") == ["downloading", "installing", "rebooting"]
    assert "d-10" not in server.logs  # no failure, no log
    [(_, first), (_, uri)] = server.handed_out
    assert first.split("?")[0] == uri.split("?")[0]
    assert first != uri  # a fresh pre-signed query
    [(data, deployment)] = fake_device.installed
    assert (data, deployment.uri) == (artifact.read_bytes(), uri)
    assert fake_device.reboots == 1
    record = _record(tmp_path)
    assert (record["stage"], record["interruptions"]) == ("rebooting", 1)
    assert record["reported"] == ["downloading", "installing", "rebooting"]
    messages = [entry[2] for entry in record["log"]]
    assert "interrupted: otad is stopping" in " ".join(messages)
    assert "installing release-2 again (attempt 2)" in messages

    fake_device.finish_trial("commit", True, "slot b committed", "release-2")
    make_poller(_hooks(fake_device)).step()
    assert _statuses(server, "d-10") == ["downloading", "installing", "rebooting", "success"]
    assert server.script.offers == deque()  # a final status ends the deployment


def test_an_install_cut_short_more_than_resume_attempts_is_reported_failed(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-11", "release-2", artifact))
    stopped = _hooks(fake_device, _stopped_install(fake_device))
    for _ in range(2):
        with pytest.raises(Stopped):
            make_poller(stopped, resume_attempts=1).step()

    make_poller(_hooks(fake_device), resume_attempts=1).step()

    assert _statuses(server, "d-11") == ["downloading", "installing", "failure"]
    last = server.logs["d-11"][-1]["message"]
    assert "interrupted 2 times in a row, download.resume_attempts allows 1" in last
    assert fake_device.installed == []
    assert len(server.handed_out) == 2


def test_an_interrupted_deployment_the_server_no_longer_hands_out_is_forgotten(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    server.script.offers.append(Offer("d-12", "release-2", artifact))
    with pytest.raises(Stopped):
        make_poller(_hooks(fake_device, _stopped_install(fake_device))).step()
    server.end("d-12")  # aborted on the server meanwhile

    poller = make_poller(_hooks(fake_device))
    assert poller.step() == 1800

    assert not (tmp_path / "fleet" / FILE_NAME).exists()
    assert poller.status.deployment_id == ""
    assert _statuses(server, "d-12") == ["downloading", "installing"]
    assert fake_device.installed == []


def test_a_restart_after_the_install_reports_rebooting_once_and_reboots(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-13", "release-2", artifact))
    with pytest.raises(Stopped):  # the install ended; otad stopped before noting it
        make_poller(_hooks(fake_device, _stopped_install(fake_device, installed=True))).step()
    assert fake_device.reboots == 0

    make_poller(_hooks(fake_device)).step()

    assert _statuses(server, "d-13") == ["downloading", "installing", "rebooting"]
    assert fake_device.reboots == 1
    assert len(server.handed_out) == 1  # not polled, not installed again


def test_a_reboot_that_did_not_happen_is_asked_again_once_per_start(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-14", "release-2", artifact))
    asked: list[str] = []
    hooks = replace(_hooks(fake_device), reboot=lambda: asked.append("reboot"))
    make_poller(hooks).step()
    assert asked == ["reboot"]
    assert fake_device.view.phase is Phase.INSTALLED  # the reboot never came

    poller = make_poller(hooks)  # otad restarted on the same boot
    poller.step()
    poller.wake()
    poller.step()

    assert asked == ["reboot", "reboot"]
    assert _statuses(server, "d-14") == ["downloading", "installing", "rebooting"]


def test_a_power_cut_into_the_trial_before_the_reboot_was_noted_reports_rebooting(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-15", "release-2", artifact))
    with pytest.raises(Stopped):
        make_poller(_hooks(fake_device, _stopped_install(fake_device, installed=True))).step()
    fake_device.view = replace(fake_device.view, phase=Phase.TRIAL)  # booted the trial

    poller = make_poller(_hooks(fake_device))
    assert poller.step() == 60  # waits for the commit
    assert _statuses(server, "d-15") == ["downloading", "installing", "rebooting"]
    assert fake_device.reboots == 0
    fake_device.finish_trial("commit", True, "slot b committed", "release-2")
    poller.step()

    assert _statuses(server, "d-15") == ["downloading", "installing", "rebooting", "success"]


def test_a_power_cut_into_a_trial_that_fell_back_is_reported_failed_not_installed_again(
    server: FakeMender, make_poller: PollerFactory, fake_device: FakeDevice, artifact: Path
) -> None:
    server.script.offers.append(Offer("d-16", "release-2", artifact))
    with pytest.raises(Stopped):
        make_poller(_hooks(fake_device, _stopped_install(fake_device, installed=True))).step()
    message = "the trial boot of slot b failed; the bootloader returned to slot a"
    fake_device.finish_trial("install", False, message, "release-2")
    fake_device.view = replace(fake_device.view, bad_artifact="release-2")

    make_poller(_hooks(fake_device)).step()

    assert _statuses(server, "d-16") == ["downloading", "installing", "failure"]
    assert server.logs["d-16"][-1]["message"] == message
    assert len(server.handed_out) == 1
    assert fake_device.installed == []
