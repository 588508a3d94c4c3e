"""otactl: ask the otad daemon for the device's update status, install, commit, roll back."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from io import BufferedReader
from pathlib import Path
from typing import Any, TextIO

from dbus_next.errors import DBusError
from dbus_next.signature import Variant

from otad.cli.common import (
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_STATE,
    EXIT_USAGE,
    run_command,
    setup_logging,
)
from otad.dbus import errors
from otad.dbus.client import Completed, Event, PropertiesChanged, ServiceLost, UpdaterClient
from otad.errors import EnvironmentProblem

PROGRAM = "otactl"
BAR_WIDTH = 30

_EXIT_FOR_ERROR = {
    errors.INVALID_ARTIFACT: EXIT_INVALID,
    errors.BAD_SIGNATURE: EXIT_INVALID,
    errors.INCOMPATIBLE: EXIT_INVALID,
    errors.DOWNGRADE: EXIT_INVALID,
    errors.NO_SPACE: EXIT_INVALID,
    errors.INVALID_ARGS: EXIT_USAGE,
    errors.NOT_AUTHORIZED: EXIT_ENVIRONMENT,
    errors.BUSY: EXIT_STATE,
    errors.NOT_IN_TRIAL: EXIT_STATE,
    errors.FAILED: EXIT_ENVIRONMENT,
    "org.freedesktop.DBus.Error.ServiceUnknown": EXIT_ENVIRONMENT,
    "org.freedesktop.DBus.Error.NameHasNoOwner": EXIT_ENVIRONMENT,
    "org.freedesktop.DBus.Error.AccessDenied": EXIT_ENVIRONMENT,
}

_NOT_RUNNING = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)

Command = Callable[[UpdaterClient, argparse.Namespace], Coroutine[Any, Any, int]]


# -- output ---------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


class ProgressView:
    """A bar redrawn in place on a terminal; a plain line every 10 % otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.is_terminal = stream.isatty()
        self._shown: tuple[int, str] | None = None
        self._drawn = False

    def update(self, percent: int, message: str) -> None:
        if self.is_terminal:
            filled = BAR_WIDTH * percent // 100
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {percent:3d}% {message}\x1b[K")
            self._drawn = True
        elif percent < 100:  # the end is the Completed message's line
            step = percent // 10 * 10
            if self._shown is not None and self._shown == (step, message):
                return
            self._shown = (step, message)
            self.stream.write(f"{percent:3d}% {message}\n")
        self.stream.flush()

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# -- commands -------------------------------------------------------------------------


def _status_json(values: dict[str, Any]) -> dict[str, Any]:
    percent, message = values["Progress"]
    return {
        "state": values["State"],
        "operation": values["Operation"],
        "progress": {"percent": percent, "message": message},
        "booted_slot": values["BootedSlot"],
        "next_slot": values["NextSlot"],
        "current_artifact": values["CurrentArtifact"],
        "compatible": values["Compatible"],
        "last_error": values["LastError"],
        "server": _server_json(values),
    }


def _server_json(values: dict[str, Any]) -> dict[str, Any]:
    """The Mender server side; a daemon older than these properties shows as disabled."""
    deployment_id, artifact = values.get("Deployment", ["", ""])
    return {
        "url": values.get("Server", ""),
        "status": values.get("ServerStatus", "disabled"),
        "error": values.get("ServerError", ""),
        "last_poll": values.get("LastPoll", 0),
        "deployment": {"id": deployment_id, "artifact": artifact},
        "deployment_status": values.get("DeploymentStatus", ""),
    }


def _server_lines(server: dict[str, Any]) -> list[str]:
    if server["status"] == "disabled":
        return ["Server: none"]
    lines = [f"Server: {server['url']} ({server['status']})"]
    if server["error"]:
        lines.append(f"Server error: {server['error']}")
    if server["last_poll"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(server["last_poll"]))
        lines.append(f"Last poll: {stamp}")
    else:
        lines.append("Last poll: never")
    deployment = server["deployment"]
    if deployment["id"]:
        lines.append(f"Deployment: {deployment['id']} ({deployment['artifact']}), "
                     f"{server['deployment_status'] or 'starting'}")  # fmt: skip
    elif server["deployment_status"]:
        lines.append(f"Last deployment: {server['deployment_status']}")
    return lines


async def _status(client: UpdaterClient, args: argparse.Namespace) -> int:
    status = _status_json(await client.properties())
    if args.json:
        _print_json(status)
        return EXIT_OK
    artifact = f" ({status['current_artifact']})" if status["current_artifact"] else ""
    lines = [
        f"State: {status['state']}",
        f"Operation: {status['operation']}",
        f"Booted slot: {status['booted_slot']}{artifact}",
        f"Next boot: slot {status['next_slot']}",
        f"Device type: {status['compatible']}",
        f"Last error: {status['last_error'] or 'none'}",
        *_server_lines(status["server"]),
    ]
    if status["operation"] != "none":
        progress = status["progress"]
        lines.insert(2, f"Progress: {progress['percent']}% {progress['message']}")
    print("\n".join(lines))
    return EXIT_OK


def _open_local(source: str) -> BufferedReader:
    if source == "-":
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    return Path(source).open("rb")


async def _start_install(client: UpdaterClient, source: str, options: dict[str, Variant]) -> str:
    """Pass a regular file by its path, anything else (or what the daemon cannot open) open."""
    with _open_local(source) as local:
        if source != "-" and stat.S_ISREG(os.fstat(local.fileno()).st_mode):
            try:
                return await client.install(str(Path(source).absolute()), options)
            except DBusError as error:
                if error.type != errors.INVALID_ARGS:
                    raise
                # The daemon cannot open what we can (permissions, a private /tmp): pass it.
        return await client.install_fd(local.fileno(), options)


def _install_options(args: argparse.Namespace) -> dict[str, Variant]:
    options = {"reboot": Variant("b", args.reboot)}
    if args.allow_downgrade:
        options["allow-downgrade"] = Variant("b", True)
    return options


async def _install(client: UpdaterClient, args: argparse.Namespace) -> int:
    events = await client.subscribe()
    job = await _start_install(client, args.source, _install_options(args))
    return await _follow(events, job)


async def _install_offered(client: UpdaterClient, args: argparse.Namespace) -> int:
    events = await client.subscribe()
    job = await client.install_offered(args.medium, _install_options(args))
    return await _follow(events, job)


async def _follow(events: asyncio.Queue[Event], job: str) -> int:
    """Show the install's progress until it completes; its result is the exit code."""
    view = ProgressView(sys.stdout)
    while True:
        event = await events.get()
        if isinstance(event, ServiceLost):
            view.end()
            raise EnvironmentProblem("the otad daemon stopped before the install completed")
        if isinstance(event, PropertiesChanged) and "Progress" in event.changed:
            percent, message = event.changed["Progress"]
            view.update(percent, message)
        if isinstance(event, Completed) and event.job == job:
            view.end()
            stream = sys.stdout if event.result == 0 else sys.stderr
            prefix = "" if event.result == 0 else f"{PROGRAM}: error: "
            print(f"{prefix}{event.message}", file=stream)
            return event.result


async def _inspect(client: UpdaterClient, args: argparse.Namespace) -> int:
    info = await client.inspect(str(Path(args.source).absolute()))
    if args.json:
        _print_json({key.replace("-", "_"): value for key, value in info.items()})
        return EXIT_OK
    signature = info["signature"]
    if info.get("signed-by"):
        signature += f" with {info['signed-by']}"
    print(
        "\n".join(
            [
                f"Artifact: {info['name']}",
                f"  Version: {info['version'] or 'none'}",
                f"  Compatible devices: {', '.join(info['devices'])}",
                f"  Payload type: {info['payload-type'] or 'none (bootstrap)'}",
                f"  Signature: {signature}",
                f"  Size: {info['size']} bytes",
            ]
        )
    )
    return EXIT_OK


async def _commit(client: UpdaterClient, args: argparse.Namespace) -> int:
    await client.commit()
    values = await client.properties()
    print(f"committed slot {values['BootedSlot']} ({values['CurrentArtifact']})")
    return EXIT_OK


async def _rollback(client: UpdaterClient, args: argparse.Namespace) -> int:
    await client.rollback({"reboot": Variant("b", args.reboot)})
    values = await client.properties()
    if values["State"] == "reboot-required" and not args.reboot:
        print(f"rolled back: slot {values['NextSlot']} boots next; reboot to finish")
    else:
        print("rolled back")
    return EXIT_OK


async def _offers(client: UpdaterClient, args: argparse.Namespace) -> int:
    offers = await client.offers()
    if args.json:
        _print_json(
            [
                {"medium": medium, **{key.replace("-", "_"): value for key, value in info.items()}}
                for medium, info in offers
            ]
        )
        return EXIT_OK
    if not offers:
        print("no artifact is on offer from removable media")
    for medium, info in offers:
        version = f" {info['version']}" if info["version"] else ""
        print(f"{medium}: {info['name']}{version} ({info['file']}, {info['size']} bytes)")
    return EXIT_OK


async def _slots(client: UpdaterClient, args: argparse.Namespace) -> int:
    slots = await client.slots()
    if args.json:
        _print_json([{"slot": name, **values} for name, values in slots])
        return EXIT_OK
    rows = [("slot", "booted", "next", "status", "artifact", "version", "device")]
    for name, values in slots:
        rows.append(
            (
                name,
                "yes" if values["booted"] else "no",
                "yes" if values["next"] else "no",
                values["status"],
                values["artifact"] or "-",
                values["version"] or "-",
                values["device"],
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return EXIT_OK


# -- the command line -----------------------------------------------------------------


def _add_install_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reboot", action="store_true", help="reboot once it is installed")
    parser.add_argument(
        "--allow-downgrade", action="store_true", help="install even an older release"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bus-address", metavar="ADDRESS", help="D-Bus address of the daemon (the system bus)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="the update state of the device")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_status)

    install = commands.add_parser("install", help="install an artifact into the inactive slot")
    install.add_argument("source", metavar="SOURCE", help="an artifact file, or - for stdin")
    _add_install_options(install)
    install.set_defaults(run=_install)

    offers = commands.add_parser("offers", help="the artifacts removable media offer")
    offers.add_argument("--json", action="store_true", help="print JSON")
    offers.set_defaults(run=_offers)

    offered = commands.add_parser(
        "install-offered", help="install the artifact a removable medium offers"
    )
    offered.add_argument("medium", metavar="MEDIUM", help="the medium's disk, as offers names it")
    _add_install_options(offered)
    offered.set_defaults(run=_install_offered)

    inspect = commands.add_parser("inspect", help="verify and describe an artifact")
    inspect.add_argument("source", metavar="SOURCE", help="an artifact file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_inspect)

    commit = commands.add_parser("commit", help="keep the slot on trial")
    commit.set_defaults(run=_commit)

    rollback = commands.add_parser("rollback", help="return to the previous release")
    rollback.add_argument("--reboot", action="store_true", help="reboot to finish it")
    rollback.set_defaults(run=_rollback)

    slots = commands.add_parser("slots", help="both slots and what they hold")
    slots.add_argument("--json", action="store_true", help="print JSON")
    slots.set_defaults(run=_slots)
    return parser


def _daemon_error(error: DBusError) -> int:
    if error.type in _NOT_RUNNING:
        print(f"{PROGRAM}: error: the otad daemon is not running", file=sys.stderr)
    else:
        print(f"{PROGRAM}: error: {error.text}", file=sys.stderr)
    return _EXIT_FOR_ERROR.get(error.type, EXIT_INTERNAL)


async def _run(args: argparse.Namespace) -> int:
    client = await UpdaterClient.connect(args.bus_address)
    try:
        command: Command = args.run
        return await command(client, args)
    except DBusError as error:
        return _daemon_error(error)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(PROGRAM, lambda: asyncio.run(_run(args)), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
