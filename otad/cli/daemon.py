"""otad: the update daemon, serving org.otad.Updater1 on the system bus.

At start it reads otad.conf, finishes or undoes what an interrupted run left (the
engine's recovery), owns the bus name and tells systemd it is ready. While the booted
slot runs on trial it rolls back and reboots unless the trial is committed within the
configured health_timeout. With [removable] enabled it watches for USB sticks and SD
cards and installs or announces the artifact it finds on them (otad.media). With
[server] it is managed from a Mender server: a thread polls it for deployments and
installs them like any install (otad.fleet.service); without [server] it sends nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply

from otad.bootloader import make_bootloader
from otad.cli.common import EXIT_OK, run_command, setup_logging
from otad.config import DEFAULT_PATH, Config, load_config
from otad.dbus import BUS_NAME, OBJECT_PATH
from otad.dbus.authorize import DEFAULT_GROUP, Authorizer
from otad.dbus.bus import close, connect, quiet_answered_errors, wait_for_disconnect
from otad.dbus.interface import Updater1Interface
from otad.dbus.service import Updater1Service, note_caller
from otad.devices import SystemPaths
from otad.engine import Engine
from otad.errors import EnvironmentProblem, UsageError
from otad.media import MediaUpdates
from otad.process import run
from otad.removable import MEDIA_DIR, MediumPredicate, is_loop_backed_under, is_removable
from otad.sdnotify import notify, watchdog_interval
from otad.updater import Status, Updater

if TYPE_CHECKING:
    from otad.fleet.service import FleetService, Prepared

PROGRAM = "otad"
DEFAULT_REBOOT_COMMAND = "systemctl reboot"
STOP_TIMEOUT = 30.0  # seconds a running install has to notice a cancel at shutdown
FLEET_STOP_TIMEOUT = 5.0  # seconds the fleet client's thread has to end at shutdown

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="otad.conf to use")
    parser.add_argument(
        "--bus-address", metavar="ADDRESS", help="D-Bus address to serve on (the system bus)"
    )
    parser.add_argument(
        "--reboot-command",
        default=DEFAULT_REBOOT_COMMAND,
        metavar="COMMAND",
        help=f"how to reboot the device (default: {DEFAULT_REBOOT_COMMAND})",
    )
    parser.add_argument(
        "--group",
        default=DEFAULT_GROUP,
        help=f"group whose members may update where polkit is absent (default: {DEFAULT_GROUP})",
    )
    parser.add_argument(
        "--proc", type=Path, default=Path("/proc"), help=argparse.SUPPRESS
    )  # the kernel's /proc; tests point it at a prepared directory
    parser.add_argument(
        "--removable-backing-dir", type=Path, metavar="DIR", help=argparse.SUPPRESS
    )  # tests only: loop devices backed by files under DIR count as removable media
    parser.add_argument(
        "--media-dir", type=Path, default=MEDIA_DIR, help=argparse.SUPPRESS
    )  # tests only: where media are mounted instead of /run/otad/media
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def _status_line(status: Status) -> str:
    line = f"{status.state.value}, booted slot {status.booted.value}"
    if status.current_artifact:
        line += f" ({status.current_artifact})"
    if status.operation.value != "none":
        line += f", {status.operation.value} {status.progress}%"
    return line


class _Announcer:
    """The Updater's listener in the daemon: the D-Bus interface, systemd's STATUS, and
    the fleet client (a commit or rollback moves its deployment on)."""

    def __init__(self, interface: Updater1Interface, fleet: FleetService | None) -> None:
        self.interface = interface
        self.fleet = fleet
        self._line = ""

    def status_changed(self, status: Status) -> None:
        self.interface.status_changed(status)
        if self.fleet is not None:
            self.fleet.status_changed(status)
        line = _status_line(status)
        if line != self._line:
            self._line = line
            notify(f"STATUS={line}")

    def completed(self, job: str, error: Exception | None, message: str) -> None:
        self.interface.completed(job, error, message)


def _media(updater: Updater, args: argparse.Namespace) -> MediaUpdates:
    predicate: MediumPredicate = is_removable
    if args.removable_backing_dir is not None:
        log.warning(
            "test mode: loop devices backed by files under %s count as removable media",
            args.removable_backing_dir,
        )
        predicate = is_loop_backed_under(args.removable_backing_dir.resolve())
    config = updater.engine.config.removable
    return MediaUpdates(updater, config, predicate=predicate, media_dir=args.media_dir)


def _reboot(argv: list[str]) -> None:
    run(argv, timeout=120)


async def _ping_watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _wait_for_stop(bus: MessageBus) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    disconnected = asyncio.ensure_future(wait_for_disconnect(bus))
    await asyncio.wait({stopped, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if disconnected.done():
        raise EnvironmentProblem("lost the connection to the D-Bus bus")
    disconnected.cancel()
    log.info("stopping")


async def _own_name(bus: MessageBus) -> None:
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise EnvironmentProblem(f"{BUS_NAME} is already owned: is another otad running?")


def _prepare_fleet(config: Config) -> Prepared | None:
    if config.server is None:
        return None
    # Imported only here: a device no server manages need not load requests.
    from otad.fleet.service import prepare

    return prepare(config)


def _fleet(
    prepared: Prepared | None,
    updater: Updater,
    interface: Updater1Interface,
    reboot: functools.partial[None],
) -> FleetService | None:
    if prepared is None:
        log.info("no [server] in otad.conf: not managed by a Mender server")
        return None
    from otad.fleet.service import FleetService

    fleet = FleetService(
        prepared,
        updater,
        download=updater.engine.config.download,
        reboot=reboot,
        on_status=interface.fleet_changed,
    )
    interface.fleet_changed(fleet.status)
    return fleet


async def serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    reboot_argv = shlex.split(args.reboot_command)
    if not reboot_argv:
        raise UsageError("--reboot-command must not be empty")
    config = load_config(args.config)
    prepared = await asyncio.get_running_loop().run_in_executor(None, _prepare_fleet, config)
    engine = Engine(config, make_bootloader(config.bootloader), paths=SystemPaths(proc=args.proc))
    reboot = functools.partial(_reboot, reboot_argv)
    updater = Updater(engine, reboot=reboot)
    status = await updater.start()
    log.info("started: %s", _status_line(status))

    media = _media(updater, args)
    quiet_answered_errors(asyncio.get_running_loop())
    bus = await connect(args.bus_address)
    watchdog: asyncio.Task[None] | None = None
    fleet: FleetService | None = None
    try:
        service = Updater1Service(updater, Authorizer(bus, args.group), media)
        interface = Updater1Interface(service, status)
        fleet = _fleet(prepared, updater, interface, reboot)
        updater.listener = _Announcer(interface, fleet)
        media.offered = interface.offered
        bus.add_message_handler(note_caller)
        bus.export(OBJECT_PATH, interface)
        await _own_name(bus)
        media.start()
        if fleet is not None:
            fleet.start()
        notify("READY=1", f"STATUS={_status_line(updater.status)}")
        interval = watchdog_interval()
        if interval is not None:
            watchdog = asyncio.ensure_future(_ping_watchdog(interval))
        await _wait_for_stop(bus)
        notify("STOPPING=1")
        media.stop()
        if fleet is not None:
            fleet.stop()
        await updater.stop(STOP_TIMEOUT)
        await media.join(STOP_TIMEOUT)
    finally:
        media.stop()
        if fleet is not None:
            fleet.stop()
            await fleet.join(FLEET_STOP_TIMEOUT)
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await close(bus)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, logging.INFO)
    return run_command(PROGRAM, lambda: asyncio.run(serve(args)), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
