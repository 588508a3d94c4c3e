"""Telling systemd how the daemon is doing: the sd_notify protocol, without libsystemd.

A service of Type=notify gets $NOTIFY_SOCKET, an AF_UNIX datagram socket (a path, or an
abstract name written with a leading '@'); each datagram is newline-separated
KEY=VALUE fields such as READY=1, STATUS=..., WATCHDOG=1. With WatchdogSec= set, systemd
also passes $WATCHDOG_USEC (and $WATCHDOG_PID, the process it expects the pings from).
Outside systemd the variables are absent and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class _Failures:
    seen = False  # warn once, not at every progress update


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=idle") to systemd; False outside systemd."""
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    message = "\n".join(fields).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            # Never block the daemon's loop on a receiver that does not read.
            sock.sendto(message, socket.MSG_DONTWAIT, _address(name))
        except OSError as error:
            level = logging.DEBUG if _Failures.seen else logging.WARNING
            _Failures.seen = True
            log.log(
                level, "cannot notify systemd at %s (%s); it will not see our state", name, error
            )
            return False
    log.debug("notified systemd: %s", ", ".join(fields))
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000
