"""Connecting, calling a method and unpacking what comes back, for both sides.

The typed wrappers here are the only callers of dbus-next's unannotated functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.signature import Variant

log = logging.getLogger(__name__)

BUS_DAEMON = "org.freedesktop.DBus"
BUS_DAEMON_PATH = "/org/freedesktop/DBus"


async def connect(address: str | None) -> MessageBus:
    """Connect to the bus at `address`, or to the system bus; able to pass descriptors."""
    if address is None:
        bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    else:
        bus = MessageBus(bus_address=address, negotiate_unix_fd=True)
    return await bus.connect()


async def close(bus: MessageBus) -> None:
    """Disconnect from the bus and release the socket.

    dbus-next 0.2.3 shuts the socket down but leaves closing it (and the stream over
    it) to the garbage collector, which then warns; close both here.
    """
    bus.disconnect()
    with contextlib.suppress(Exception):  # a broken connection is as good as closed
        await bus.wait_for_disconnect()
    for part in (getattr(bus, "_stream", None), getattr(bus, "_sock", None)):
        if part is not None:
            part.close()


async def wait_for_disconnect(bus: MessageBus) -> None:
    """Return when the connection to the bus is gone.

    Shielded: cancelling the wait must not cancel dbus-next's own disconnect future.
    """
    await asyncio.shield(bus.wait_for_disconnect())


def quiet_answered_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Keep method errors that were already answered out of the daemon's log.

    When an async method raises DBusError, dbus-next 0.2.3 sends the error reply and then
    lets the exception escape its done-callback (SendReply.__exit__ drops what _exit
    returned), so asyncio logs "Exception in callback" with a traceback for every refused
    call, although the caller got its named error. otad raises DBusError only from
    methods, so one reaching the loop is such an answered error: logged at debug.
    Anything else goes to the handler that was there before.
    """
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, DBusError):
            log.debug("answered with %s: %s", error.type, error.text)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def make_error(name: str, text: str) -> DBusError:
    """A named D-Bus error with its message."""
    return DBusError(name, text)


async def call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    unix_fds: Sequence[int] = (),
) -> list[Any]:
    """Call a method and return the reply's body; DBusError carries an error reply."""
    message = Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
        unix_fds=list(unix_fds),
    )
    reply = await bus.call(message)
    assert reply is not None, "a method call without NO_REPLY_EXPECTED gets a reply"
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise make_error(reply.error_name or "org.freedesktop.DBus.Error.Failed", text)
    return list(reply.body)


async def call_bus_daemon(
    bus: MessageBus, member: str, signature: str = "", body: Sequence[Any] = ()
) -> list[Any]:
    """Call a method of the bus daemon itself (org.freedesktop.DBus)."""
    return await call(bus, BUS_DAEMON, BUS_DAEMON_PATH, BUS_DAEMON, member, signature, body)


def unwrap(value: Any) -> Any:
    """`value` with every Variant replaced by what it holds, recursively."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {key: unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap(item) for item in value]
    return value
