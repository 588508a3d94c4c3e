"""The caller's side of org.otad.Updater1: typed calls and the signals that follow them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from otad.dbus import BUS_NAME, INTERFACE, OBJECT_PATH
from otad.dbus.bus import BUS_DAEMON, call, call_bus_daemon, close, connect, unwrap

PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass(frozen=True)
class Completed:
    job: str
    result: int
    message: str


@dataclass(frozen=True)
class ArtifactOffered:
    medium: str
    info: dict[str, Any]


@dataclass(frozen=True)
class PropertiesChanged:
    changed: dict[str, Any]


@dataclass(frozen=True)
class ServiceLost:
    """The daemon left the bus."""


Event = Completed | ArtifactOffered | PropertiesChanged | ServiceLost


def _event(message: Message) -> Event | None:
    if message.message_type is not MessageType.SIGNAL:
        return None
    if message.path == OBJECT_PATH and message.interface == INTERFACE:
        if message.member == "Completed":
            job, result, text = message.body
            return Completed(job, result, text)
        if message.member == "ArtifactOffered":
            medium, info = message.body
            return ArtifactOffered(medium, dict(unwrap(info)))
    elif message.path == OBJECT_PATH and message.member == "PropertiesChanged":
        interface, changed, _invalidated = message.body
        if interface == INTERFACE:
            return PropertiesChanged(unwrap(changed))
    elif message.interface == BUS_DAEMON and message.member == "NameOwnerChanged":
        name, _old, new = message.body
        if name == BUS_NAME and not new:
            return ServiceLost()
    return None


class UpdaterClient:
    """A connection to the otad daemon."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, address: str | None = None) -> UpdaterClient:
        """Connect to the system bus (or `address`), able to pass file descriptors."""
        return cls(await connect(address))

    async def close(self) -> None:
        await close(self.bus)

    async def _call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        fds: list[int] | None = None,
    ) -> list[Any]:
        return await call(
            self.bus, BUS_NAME, OBJECT_PATH, INTERFACE, member, signature, body or [], fds or []
        )

    async def properties(self) -> dict[str, Any]:
        (values,) = await call(
            self.bus, BUS_NAME, OBJECT_PATH, PROPERTIES, "GetAll", "s", [INTERFACE]
        )
        return dict(unwrap(values))

    async def install(self, source: str, options: Mapping[str, Variant]) -> str:
        (job,) = await self._call("Install", "sa{sv}", [source, dict(options)])
        return str(job)

    async def install_fd(self, descriptor: int, options: Mapping[str, Variant]) -> str:
        (job,) = await self._call("InstallFd", "ha{sv}", [0, dict(options)], [descriptor])
        return str(job)

    async def install_offered(self, medium: str, options: Mapping[str, Variant]) -> str:
        (job,) = await self._call("InstallOffered", "sa{sv}", [medium, dict(options)])
        return str(job)

    async def offers(self) -> list[tuple[str, dict[str, Any]]]:
        (entries,) = await self._call("GetOffers")
        return [(medium, dict(unwrap(info))) for medium, info in entries]

    async def cancel(self) -> None:
        await self._call("Cancel")

    async def commit(self) -> None:
        await self._call("Commit")

    async def rollback(self, options: Mapping[str, Variant]) -> None:
        await self._call("Rollback", "a{sv}", [dict(options)])

    async def inspect(self, source: str) -> dict[str, Any]:
        (info,) = await self._call("Inspect", "s", [source])
        return dict(unwrap(info))

    async def slots(self) -> list[tuple[str, dict[str, Any]]]:
        (entries,) = await self._call("GetSlots")
        return [(name, dict(unwrap(values))) for name, values in entries]

    async def subscribe(self) -> asyncio.Queue[Event]:
        """Start receiving Completed, ArtifactOffered, PropertiesChanged, the daemon's leaving.

        The match rules are in place when this returns, so nothing an operation
        started afterwards sends is missed.
        """
        events: asyncio.Queue[Event] = asyncio.Queue()

        def handle(message: Message) -> None:
            event = _event(message)
            if event is not None:
                events.put_nowait(event)

        self.bus.add_message_handler(handle)
        rules = (
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',interface='{INTERFACE}',"
            "member='Completed'",
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',interface='{INTERFACE}',"
            "member='ArtifactOffered'",
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',interface='{PROPERTIES}',"
            "member='PropertiesChanged'",
            f"type='signal',sender='{BUS_DAEMON}',interface='{BUS_DAEMON}',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
        )
        for rule in rules:
            await call_bus_daemon(self.bus, "AddMatch", "s", [rule])
        return events
