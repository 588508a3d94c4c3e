"""The poller against the fake server: polls, deployments, statuses, errors, inventory.

No test waits: the clock is a FakeClock and each step's returned delay is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otad.errors import BadSignature
from otad.fleet.pending import FILE_NAME
from tests.fleet.conftest import FakeClock, FakeDevice, PollerFactory
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
    assert deployment.uri == f"{server.url}/artifacts/d-1"
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
