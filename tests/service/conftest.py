"""The otad daemon on a private, system-bus-like dbus-daemon, over a real loop-device disk.

`bus` starts `dbus-daemon --nofork` with a configuration like the system bus's that
includes systemd/dbus/org.otad.Updater1.conf, listening on a socket every user can
reach (the unprivileged-caller tests connect as nobody). `daemon` runs `otad` as a
subprocess against that bus and the engine tests' `device` (file bootloader, fake
/proc), waits for its READY=1 on a notify socket, and can stop, kill -9, restart it and
"reboot" the device in between. Every process and the bus are torn down even when a
test fails; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from otad.bootloader.base import Slot
from otad.dbus.client import UpdaterClient
from tests.conftest import require_tool
from tests.engine import conftest as engine_fixtures
from tests.engine.conftest import Device

# The engine tests' fixtures, shared: a loop-device disk, the fake kernel, the device.
disk = engine_fixtures.disk
kernel = engine_fixtures.kernel
device = engine_fixtures.device
artifacts = engine_fixtures.artifacts

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
STARTUP_TIMEOUT = 20.0
TEST_TIMEOUT = 60.0

T = TypeVar("T")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


def run(work: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run a test's coroutine with a deadline."""
    return asyncio.run(asyncio.wait_for(work, timeout))


@dataclass
class Bus:
    address: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A private system-like bus that includes otad's bus policy."""
    require_tool("dbus-daemon")
    directory = Path(tempfile.mkdtemp(prefix="otad-bus-"))
    directory.chmod(0o755)  # so that nobody can reach the socket
    config = directory / "bus.conf"
    config.write_text(
        BUS_CONFIG.format(
            socket=directory / "socket", policy=ROOT / "systemd/dbus/org.otad.Updater1.conf"
        )
    )
    process = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--print-address", "--nofork"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT)
        line = process.stdout.readline().decode().strip() if ready else ""
        if not line:
            process.kill()
            _, stderr = process.communicate(timeout=5)
            pytest.fail(f"dbus-daemon did not start: {stderr.decode()}")
        yield Bus(line, process)
    finally:
        process.kill()
        process.communicate(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Daemon:
    """The otad daemon under test, as a subprocess; restartable."""

    device: Device
    bus: Bus
    directory: Path
    health_timeout: int = 300
    group: str = "otad"
    extra_config: str = ""  # appended to otad.conf (tables such as [removable])
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    notifications: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    notify_socket: socket.socket | None = None

    @property
    def config(self) -> Path:
        return self.directory / "otad.conf"

    @property
    def log(self) -> Path:
        return self.directory / "otad.log"

    @property
    def reboots(self) -> Path:
        """Each reboot the daemon asks for appends a line here."""
        return self.directory / "reboots"

    def write_config(self) -> None:
        text = self.device.config_text.replace(
            'backend = "file"\n', f'backend = "file"\npath = "{self.device.bootloader.path}"\n'
        )
        self.config.write_text(f"health_timeout = {self.health_timeout}\n{text}{self.extra_config}")

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "otad.cli.daemon",
            "--config",
            str(self.config),
            "--bus-address",
            self.bus.address,
            "--proc",
            str(self.device.kernel.root),
            "--reboot-command",
            f"sh -c 'echo reboot >> {self.reboots}'",
            "--group",
            self.group,
            "-vv",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the daemon and wait until it told systemd (our socket) READY=1."""
        assert self.process is None or self.process.poll() is not None
        self.write_config()
        notify_path = self.directory / "notify"
        notify_path.unlink(missing_ok=True)
        self.close_notify_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_socket = listener
        listener.bind(str(notify_path))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "NOTIFY_SOCKET": str(notify_path),
                    **self.environment,
                },
            )
        self._wait_ready(listener)

    def close_notify_socket(self) -> None:
        if self.notify_socket is not None:
            with contextlib.suppress(OSError):
                self.notify_socket.shutdown(socket.SHUT_RDWR)  # ends the reading thread
            self.notify_socket.close()
            self.notify_socket = None

    def _drain_notifications(self, listener: socket.socket) -> None:
        """Keep reading what the daemon tells "systemd", as systemd would."""
        with contextlib.suppress(OSError):  # closed when the daemon stops
            while True:
                self.notifications.append(listener.recv(4096).decode())

    def wait_for_notification(self, field: str, timeout: float) -> None:
        """Wait until the daemon sent a datagram with `field` (such as WATCHDOG=1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(field in message.split("\n") for message in self.notifications):
                return
            time.sleep(0.05)
        pytest.fail(f"otad sent no {field} in {timeout} s: {self.notifications}")

    def _wait_ready(self, listener: socket.socket) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"otad exited with {self.process.returncode}:\n{self.log_text()}")
            ready, _, _ = select.select([listener], [], [], 0.2)
            if not ready:
                continue
            message = listener.recv(4096).decode()
            self.notifications.append(message)
            if "READY=1" in message.split("\n"):
                threading.Thread(
                    target=self._drain_notifications, args=(listener,), daemon=True
                ).start()
                return
        pytest.fail(f"otad did not become ready in {STARTUP_TIMEOUT} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after a deadline); return the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"otad did not stop on SIGTERM:\n{self.log_text()}")
        finally:
            self.close_notify_socket()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.close_notify_socket()

    def reboot_device(self) -> Slot:
        """Stop the daemon, let the bootloader pick a slot as firmware would, start again."""
        self.stop()
        booted = self.device.bootloader.simulate_boot()
        self.device.kernel.boot_slot(self.device.disk.partuuids[booted.value])
        self.device.kernel.reboot()
        self.start()
        return booted


@pytest.fixture
def daemon(device: Device, bus: Bus, tmp_path: Path) -> Iterator[Daemon]:
    """A running otad on the private bus (not yet started when a test changes settings:
    use `make_daemon` for that)."""
    instance = Daemon(device, bus, tmp_path / "daemon")
    instance.directory.mkdir()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def make_daemon(device: Device, bus: Bus, tmp_path: Path) -> Iterator[MakeDaemon]:
    """For tests that configure the daemon (Daemon's settings) before starting it."""
    made: list[Daemon] = []

    def make(**settings: Any) -> Daemon:
        instance = Daemon(device, bus, tmp_path / f"daemon-{len(made)}", **settings)
        instance.directory.mkdir()
        made.append(instance)
        return instance

    try:
        yield make
    finally:
        for instance in made:
            instance.stop()


async def connect(bus: Bus) -> UpdaterClient:
    return await UpdaterClient.connect(bus.address)


def as_nobody(*argv: str) -> list[str]:
    """argv run as the unprivileged user nobody, without supplementary groups."""
    require_tool("setpriv")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def gdbus_call(bus: Bus, method: str, *arguments: str) -> list[str]:
    """argv of a gdbus call of an org.otad.Updater1 method (the peer client)."""
    require_tool("gdbus")
    return [
        "gdbus",
        "call",
        "--address",
        bus.address,
        "--dest",
        "org.otad.Updater1",
        "--object-path",
        "/org/otad/Updater1",
        "--method",
        f"org.otad.Updater1.{method}",
        *arguments,
    ]


def run_peer(
    argv: list[str], timeout: float = 30, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a peer client to the end (outside any event loop), with a deadline."""
    return subprocess.run(
        argv,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def run_peer_async(argv: list[str], timeout: float = 30) -> tuple[int, str, str]:
    """Run a peer client while this process's event loop keeps serving (fake polkit)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/"
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@dataclass(frozen=True)
class DeviceState:
    """What a refused request must leave exactly as it was."""

    record: bytes
    bootloader: bytes
    slot_b: str

    @classmethod
    def of(cls, device: Device) -> DeviceState:
        return cls(
            device.store.path.read_bytes(),
            device.bootloader.path.read_bytes(),
            device.slot_digest(Slot.B),
        )
