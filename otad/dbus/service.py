"""The members of org.otad.Updater1, implemented on otad.updater.Updater.

Every method authorizes its caller where it changes the device, checks its arguments,
calls the Updater and turns any exception into a named error (otad.dbus.errors). The
sender of the call being served is known from `note_caller`, which runs for every
incoming message before dbus-next dispatches it: dbus-next hands a method only its
arguments, and the asyncio task that runs the method copies the context in which the
sender was noted.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from otad.dbus import INTERFACE
from otad.dbus.authorize import ACTION_INSTALL, ACTION_MANAGE, Authorizer
from otad.dbus.errors import translate
from otad.errors import UsageError
from otad.media import MediaUpdates
from otad.removable import MediumArtifact
from otad.sources import is_public, is_url, open_descriptor, open_path, open_source
from otad.updater import ArtifactInfo, InstallOptions, SlotInfo, Status, Updater

if TYPE_CHECKING:
    from otad.fleet.poller import FleetStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

INSTALL_OPTIONS = {"reboot": "b", "allow-downgrade": "b"}
ROLLBACK_OPTIONS = {"reboot": "b"}

_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("otad_dbus_caller", default="")


def note_caller(message: Message) -> None:
    """A dbus-next message handler: remember who calls a method of ours (handles nothing)."""
    if message.message_type is MessageType.METHOD_CALL and message.interface == INTERFACE:
        _CALLER.set(message.sender or "")


def parse_options(options: Mapping[str, Variant], known: Mapping[str, str]) -> dict[str, Any]:
    """The values of an a{sv} of options; UsageError for an unknown key or a wrong type."""
    values = {}
    for key, variant in options.items():
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise UsageError(f"unknown option {key!r} (known options: {names})")
        if variant.signature != known[key]:
            raise UsageError(
                f"option {key!r} must have type {known[key]}, found {variant.signature}"
            )
        values[key] = variant.value
    return values


def status_properties(status: Status) -> dict[str, Any]:
    """The interface's properties, by name, as dbus-next values."""
    return {
        "State": status.state.value,
        "Operation": status.operation.value,
        "Progress": [status.progress, status.progress_message],
        "BootedSlot": status.booted.value,
        "NextSlot": status.next_boot.value,
        "CurrentArtifact": status.current_artifact,
        "Compatible": status.compatible,
        "LastError": status.last_error,
    }


SERVER_DISABLED = "disabled"


def fleet_properties(status: FleetStatus | None) -> dict[str, Any]:
    """The properties of the Mender server side; `status` None: no [server] in otad.conf."""
    if status is None:
        return {
            "Server": "",
            "ServerStatus": SERVER_DISABLED,
            "ServerError": "",
            "LastPoll": 0,
            "Deployment": ["", ""],
            "DeploymentStatus": "",
        }
    return {
        "Server": status.server,
        "ServerStatus": status.state.value,
        "ServerError": status.last_error,
        "LastPoll": int(status.last_poll),
        "Deployment": [status.deployment_id, status.deployment_artifact],
        "DeploymentStatus": status.deployment_status,
    }


def slot_entry(info: SlotInfo) -> list[Any]:
    """One (sa{sv}) of GetSlots."""
    return [
        info.slot.value,
        {
            "device": Variant("s", info.device),
            "booted": Variant("b", info.is_booted),
            "next": Variant("b", info.is_next),
            "status": Variant("s", info.status.value),
            "artifact": Variant("s", info.artifact),
            "version": Variant("s", info.version),
        },
    ]


def artifact_entry(info: ArtifactInfo) -> dict[str, Variant]:
    """The a{sv} of Inspect."""
    return {
        "name": Variant("s", info.name),
        "devices": Variant("as", list(info.devices)),
        "version": Variant("s", info.version),
        "payload-type": Variant("s", info.payload_type),
        "signature": Variant("s", info.signature),
        "signed-by": Variant("s", info.signed_by),
        "size": Variant("t", info.size),
    }


def offer_entry(offer: MediumArtifact) -> dict[str, Variant]:
    """The a{sv} of ArtifactOffered and GetOffers: the verified artifact on a medium."""
    return {
        "name": Variant("s", offer.artifact),
        "version": Variant("s", offer.version or ""),
        "payload-type": Variant("s", offer.payload_type),
        "devices": Variant("as", list(offer.device_types)),
        "signature": Variant("s", "verified"),  # a medium's artifact must be signed
        "size": Variant("t", offer.size),
        "file": Variant("s", offer.file),
    }


def _install_options(options: Mapping[str, Variant]) -> InstallOptions:
    values = parse_options(options, INSTALL_OPTIONS)
    return InstallOptions(
        reboot=bool(values.get("reboot", False)),
        allow_downgrade=values.get("allow-downgrade"),
    )


class Updater1Service:
    """The typed implementation behind otad.dbus.interface.Updater1Interface."""

    def __init__(self, updater: Updater, authorizer: Authorizer, media: MediaUpdates) -> None:
        self.updater = updater
        self.authorizer = authorizer
        self.media = media

    @staticmethod
    async def _guard(work: Awaitable[T]) -> T:
        try:
            return await work
        except Exception as error:
            raise translate(error) from None

    async def _authorize(self, action: str, what: str) -> None:
        caller = _CALLER.get()
        if not caller:
            raise UsageError("the caller of this method is unknown")
        await self.authorizer.check(caller, action, what)

    async def install(self, source: str, options: Mapping[str, Variant]) -> str:
        return await self._guard(self._install(source, options))

    async def _install(self, source: str, options: Mapping[str, Variant]) -> str:
        await self._authorize(ACTION_INSTALL, "install an update")
        request = _install_options(options)
        log.info("install of %s requested", source)
        download = self.updater.engine.config.download
        return await self.updater.install(open_source(source, download), request)

    async def install_fd(self, descriptor: int, options: Mapping[str, Variant]) -> str:
        return await self._guard(self._install_fd(descriptor, options))

    async def _install_fd(self, descriptor: int, options: Mapping[str, Variant]) -> str:
        try:
            await self._authorize(ACTION_INSTALL, "install an update")
            request = _install_options(options)
        except BaseException:
            os.close(descriptor)
            raise
        log.info("install from a passed file descriptor requested")
        return await self.updater.install(open_descriptor(descriptor), request)

    async def install_offered(self, medium: str, options: Mapping[str, Variant]) -> str:
        return await self._guard(self._install_offered(medium, options))

    async def _install_offered(self, medium: str, options: Mapping[str, Variant]) -> str:
        await self._authorize(ACTION_INSTALL, "install an update")
        request = _install_options(options)
        log.info("install of the artifact offered from medium %s requested", medium)
        return await self.media.install_offered(medium, request)

    async def get_offers(self) -> list[list[Any]]:
        return await self._guard(self._get_offers())

    async def _get_offers(self) -> list[list[Any]]:
        return [[offer.medium.name, offer_entry(offer)] for offer in self.media.offers()]

    async def cancel(self) -> None:
        await self._guard(self._cancel())

    async def _cancel(self) -> None:
        await self._authorize(ACTION_INSTALL, "cancel an install")
        self.updater.cancel()

    async def commit(self) -> None:
        await self._guard(self._commit())

    async def _commit(self) -> None:
        await self._authorize(ACTION_MANAGE, "commit the slot on trial")
        await self.updater.commit()

    async def rollback(self, options: Mapping[str, Variant]) -> None:
        await self._guard(self._rollback(options))

    async def _rollback(self, options: Mapping[str, Variant]) -> None:
        await self._authorize(ACTION_MANAGE, "roll back")
        values = parse_options(options, ROLLBACK_OPTIONS)
        await self.updater.rollback(reboot=bool(values.get("reboot", False)))

    async def inspect(self, source: str) -> dict[str, Variant]:
        return await self._guard(self._inspect(source))

    async def _inspect(self, source: str) -> dict[str, Variant]:
        if is_url(source):
            download = self.updater.engine.config.download
            return artifact_entry(await self.updater.inspect(open_source(source, download)))
        artifact = open_path(source)
        try:
            if not is_public(artifact):
                # The daemon reads as root: it must not disclose a file its caller could
                # not read, so a private file needs the right to install.
                await self._authorize(ACTION_INSTALL, f"inspect {Path(source).name}")
        except BaseException:
            artifact.close()
            raise
        return artifact_entry(await self.updater.inspect(artifact))

    async def get_slots(self) -> list[list[Any]]:
        return await self._guard(self._get_slots())

    async def _get_slots(self) -> list[list[Any]]:
        return [slot_entry(info) for info in await self.updater.slots()]
