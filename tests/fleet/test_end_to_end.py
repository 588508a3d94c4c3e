"""A deployment from the fake server into a real slot: the real engine on a loop-device
disk (tests/engine/conftest.py), the artifact streamed by HttpSource and verified."""

from __future__ import annotations

from pathlib import Path

from otad.artifact.streams import Readable
from otad.bootloader.base import Slot
from otad.engine import Engine
from otad.fleet.deployments import Deployment
from otad.fleet.device import DeviceView, engine_view
from otad.fleet.poller import DeviceHooks
from otad.state import Phase
from tests.engine.conftest import Device
from tests.fleet.conftest import PollerFactory, open_over_http
from tests.fleet.server import FakeMender, Offer


class Daemon:
    """Stands in for the daemon: holds the engine, and restarts it on reboot."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.engine: Engine = device.engine()

    def view(self) -> DeviceView:
        return engine_view(self.engine)

    def install(self, source: Readable, deployment: Deployment) -> None:
        self.engine.install(source)

    def reboot(self) -> None:
        self.engine = self.device.reboot()


def test_deployment_is_verified_written_tried_and_committed(
    server: FakeMender,
    make_poller: PollerFactory,
    device: Device,
    artifacts: dict[str, Path],
) -> None:
    daemon = Daemon(device)
    hooks = DeviceHooks(daemon.view, open_over_http, daemon.install, daemon.reboot)
    server.script.offers.append(Offer("e2e-1", "release-2", artifacts["release-2"]))

    make_poller(hooks).step()

    assert daemon.engine.snapshot().booted is Slot.B
    assert daemon.view().phase is Phase.TRIAL
    statuses = [status for _, status in server.statuses]
    assert statuses == ["downloading", "installing", "rebooting"]

    poller = make_poller(hooks)  # the daemon after the reboot
    poller.step()
    assert [status for _, status in server.statuses][-1] == "rebooting"
    daemon.engine.commit()  # the health check passed
    poller.wake()
    poller.step()

    assert [status for _, status in server.statuses] == [*statuses, "success"]
    assert server.inventory["artifact_name"] == "release-2"
    assert server.inventory["rootfs-image.version"] == "2.0"


def test_tampered_artifact_is_refused_and_reported(
    server: FakeMender,
    make_poller: PollerFactory,
    device: Device,
    artifacts: dict[str, Path],
) -> None:
    daemon = Daemon(device)
    hooks = DeviceHooks(daemon.view, open_over_http, daemon.install, daemon.reboot)
    slot_a = device.slot_digest(Slot.A)
    server.script.offers.append(Offer("e2e-2", "release-2", artifacts["tampered"]))

    make_poller(hooks).step()

    assert [status for _, status in server.statuses] == ["downloading", "installing", "failure"]
    assert server.logs["e2e-2"][-1]["level"] == "ERROR"
    assert daemon.view().phase is Phase.IDLE
    assert daemon.engine.snapshot().booted is Slot.A
    assert device.slot_digest(Slot.A) == slot_a
