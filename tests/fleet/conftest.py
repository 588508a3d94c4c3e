"""Fixtures for the fleet tests: the fake Mender server, a device stand-in, a poller.

The engine fixtures (a loop-device disk with two slots, signed artifacts) come from
tests/engine/conftest.py for the end-to-end test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from otad.artifact.streams import Readable
from otad.download import DownloadSettings, HttpSource
from otad.errors import OtadError
from otad.fleet.auth import load_device_key
from otad.fleet.client import Client
from otad.fleet.config import KEY_FILE, KeyType, ServerConfig
from otad.fleet.deployments import Deployment
from otad.fleet.device import DeviceView
from otad.fleet.poller import DeviceHooks, Poller
from otad.state import Outcome, Phase
from tests.engine.conftest import artifacts, device, disk, kernel  # noqa: F401
from tests.fleet.server import FakeMender


@pytest.fixture
def server() -> Iterator[FakeMender]:
    mender = FakeMender()
    try:
        yield mender
    finally:
        mender.close()
    assert mender.violations == []


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeDevice:
    """The daemon's side as the poller sees it, without an engine."""

    view: DeviceView = field(
        default_factory=lambda: DeviceView(
            "otad-test", "release-1", Phase.IDLE, {"rootfs-image.version": "1.0"}
        )
    )
    installed: list[tuple[bytes, Deployment]] = field(default_factory=list)
    install_error: OtadError | None = None
    reboots: int = 0
    rollbacks: int = 0

    def install(self, source: Readable, deployment: Deployment) -> None:
        data = bytearray()
        buffer = bytearray(1 << 16)
        while count := source.readinto(memoryview(buffer)):
            data += buffer[:count]
        self.installed.append((bytes(data), deployment))
        if self.install_error is not None:
            raise self.install_error
        self.view = replace(self.view, phase=Phase.INSTALLED)

    def reboot(self) -> None:
        self.reboots += 1
        self.view = replace(self.view, phase=Phase.TRIAL)

    def rollback(self) -> None:
        self.rollbacks += 1
        self.view = replace(self.view, phase=Phase.IDLE)

    def finish_trial(self, operation: str, success: bool, message: str, artifact: str) -> None:
        """End the trial as the engine would record it (commit, or a fallback)."""
        name = artifact if success else self.view.artifact_name
        self.view = replace(
            self.view,
            phase=Phase.IDLE,
            artifact_name=name,
            last=Outcome(operation, success, message, artifact, time.time()),
        )


def open_over_http(url: str) -> Readable:
    return HttpSource(url, DownloadSettings(allow_http=True), sleep=lambda seconds: None)


PollerFactory = Callable[..., Poller]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def make_poller(
    server: FakeMender, tmp_path: Path, clock: FakeClock, fake_device: FakeDevice
) -> Iterator[PollerFactory]:
    """A poller for the fake server over `fake_device`; keywords change the ServerConfig
    (`resume_attempts` goes to the Poller, as the daemon passes download.resume_attempts)."""
    made: list[Poller] = []

    def make(
        hooks: DeviceHooks | None = None, *, resume_attempts: int = 3, **settings: object
    ) -> Poller:
        config = ServerConfig(
            url=server.url,
            tenant_token="tenant-token-1",
            poll_interval=1800,
            inventory_interval=28800,
            retry_interval=60,
            key_type=KeyType.ED25519,
            identity={"serial": "SN-0042"},
            tls=DownloadSettings(allow_http=True),
        )
        config = replace(config, **settings)
        directory = tmp_path / "fleet"
        key = load_device_key(directory / KEY_FILE, config.key_type)
        hooks = hooks or DeviceHooks(
            read_device=lambda: fake_device.view,
            open_artifact=open_over_http,
            install=fake_device.install,
            reboot=fake_device.reboot,
            rollback=fake_device.rollback,
        )
        poller = Poller(
            config,
            Client(config.url),
            key,
            dict(config.identity),
            hooks,
            directory,
            clock=clock,
            resume_attempts=resume_attempts,
        )
        made.append(poller)
        return poller

    yield make
    for poller in made:
        poller.close()
