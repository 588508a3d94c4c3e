"""Who may change the device: the daemon's own authorization of D-Bus callers.

The bus policy lets everyone call the interface; the daemon decides. Reading (the
properties, GetSlots, GetOffers, Inspect of a file every user may read) is open to all.
Changing the device (Install, InstallFd, InstallOffered, Cancel: action org.otad.install;
Commit, Rollback: org.otad.manage) is allowed

  - always to root (uid 0);
  - where polkit is on the bus (running or activatable), to whom polkit's
    CheckAuthorization allows the action for the caller's bus name, with interaction
    allowed so that an agent may ask for a password;
  - where it is not, to the members of the group `otad` (primary or supplementary,
    as /etc/group and the passwd entry say).

The caller is identified by its unique bus name, and its uid comes from the bus daemon
(GetConnectionUnixUser), never from the caller.
"""

from __future__ import annotations

import grp
import logging
import pwd

from dbus_next.aio.message_bus import MessageBus
from dbus_next.errors import DBusError
from dbus_next.signature import Variant

from otad.dbus.bus import call, call_bus_daemon
from otad.errors import NotAuthorized

log = logging.getLogger(__name__)

ACTION_INSTALL = "org.otad.install"
ACTION_MANAGE = "org.otad.manage"
DEFAULT_GROUP = "otad"

POLKIT = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 0x1


def is_in_group(uid: int, group: str) -> bool:
    """True when the user `uid` belongs to `group` by its passwd entry or /etc/group."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == entry.gr_gid or user.pw_name in entry.gr_mem


class Authorizer:
    """Checks a caller against an action; raises NotAuthorized to refuse."""

    def __init__(self, bus: MessageBus, group: str = DEFAULT_GROUP) -> None:
        self.bus = bus
        self.group = group

    async def check(self, caller: str, action: str, what: str) -> None:
        """Allow `caller` (a unique bus name) to do `what`, or raise NotAuthorized."""
        uid = await self._unix_user(caller, what)
        if uid == 0:
            return
        if await self._has_polkit():
            await self._check_polkit(caller, uid, action, what)
            return
        if is_in_group(uid, self.group):
            log.debug("uid %d may %s: member of group %s", uid, what, self.group)
            return
        raise NotAuthorized(what, f"uid {uid} is neither root nor in group {self.group}")

    async def _unix_user(self, caller: str, what: str) -> int:
        try:
            (uid,) = await call_bus_daemon(self.bus, "GetConnectionUnixUser", "s", [caller])
        except DBusError as error:
            raise NotAuthorized(
                what, f"the bus cannot tell who {caller} is ({error.text})"
            ) from None
        return int(uid)

    async def _has_polkit(self) -> bool:
        (running,) = await call_bus_daemon(self.bus, "NameHasOwner", "s", [POLKIT])
        if running:
            return True
        (activatable,) = await call_bus_daemon(self.bus, "ListActivatableNames")
        return POLKIT in activatable

    async def _check_polkit(self, caller: str, uid: int, action: str, what: str) -> None:
        subject = ["system-bus-name", {"name": Variant("s", caller)}]
        try:
            (result,) = await call(
                self.bus,
                POLKIT,
                POLKIT_PATH,
                POLKIT_INTERFACE,
                "CheckAuthorization",
                "(sa{sv})sa{ss}us",
                [subject, action, {}, ALLOW_USER_INTERACTION, ""],
            )
        except DBusError as error:
            log.warning("polkit could not check %s for uid %d, refusing: %s", action, uid, error)
            raise NotAuthorized(what, f"polkit could not check {action}: {error.text}") from None
        authorized, challenge, _details = result
        if authorized:
            log.debug("polkit allows %s for uid %d", action, uid)
            return
        reason = "authentication is required" if challenge else "polkit does not allow it"
        raise NotAuthorized(what, f"{reason} ({action} for uid {uid})")
