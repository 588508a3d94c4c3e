"""The exported interface org.otad.Updater1, in dbus-next's declarative form.

Only this module uses dbus-next's decorators and its signature strings as annotations
(mypy cannot read those: see pyproject.toml). Each member hands its work to
otad.dbus.service.Updater1Service; the interface itself only holds the property values
and emits the signals. The members must match systemd/dbus/org.otad.Updater1.xml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from otad.dbus import INTERFACE
from otad.dbus.errors import completion_result
from otad.dbus.service import Updater1Service, fleet_properties, offer_entry, status_properties
from otad.removable import MediumArtifact
from otad.updater import Status

if TYPE_CHECKING:
    from otad.fleet.poller import FleetStatus


class Updater1Interface(ServiceInterface):
    """org.otad.Updater1; also the Updater's listener, turning its news into signals."""

    def __init__(self, service: Updater1Service, status: Status) -> None:
        super().__init__(INTERFACE)
        self._service = service
        self._values: dict[str, Any] = status_properties(status)
        self._fleet: dict[str, Any] = fleet_properties(None)

    # -- otad.updater.Listener ------------------------------------------------------

    def status_changed(self, status: Status) -> None:
        values = status_properties(status)
        changed = {name: value for name, value in values.items() if self._values[name] != value}
        self._values = values
        if changed:
            self.emit_properties_changed(changed)

    # -- otad.fleet.service.FleetService's on_status (on the loop's thread) -------------

    def fleet_changed(self, status: FleetStatus) -> None:
        values = fleet_properties(status)
        changed = {name: value for name, value in values.items() if self._fleet[name] != value}
        self._fleet = values
        if changed:
            self.emit_properties_changed(changed)

    def completed(self, job: str, error: Exception | None, message: str) -> None:
        self.Completed(job, completion_result(error), message)

    # -- otad.media.MediaUpdates.offered ----------------------------------------------

    def offered(self, offer: MediumArtifact) -> None:
        self.ArtifactOffered(offer.medium.name, offer_entry(offer))

    # -- methods --------------------------------------------------------------------

    @method()
    async def Install(self, source: "s", options: "a{sv}") -> "s":
        return await self._service.install(source, options)

    @method()
    async def InstallFd(self, fd: "h", options: "a{sv}") -> "s":
        return await self._service.install_fd(fd, options)

    @method()
    async def InstallOffered(self, medium: "s", options: "a{sv}") -> "s":
        return await self._service.install_offered(medium, options)

    @method()
    async def GetOffers(self) -> "a(sa{sv})":
        return await self._service.get_offers()

    @method()
    async def Cancel(self) -> "":
        await self._service.cancel()

    @method()
    async def Commit(self) -> "":
        await self._service.commit()

    @method()
    async def Rollback(self, options: "a{sv}") -> "":
        await self._service.rollback(options)

    @method()
    async def Inspect(self, source: "s") -> "a{sv}":
        return await self._service.inspect(source)

    @method()
    async def GetSlots(self) -> "a(sa{sv})":
        return await self._service.get_slots()

    # -- signals --------------------------------------------------------------------

    @signal()
    def Completed(self, job: str, result: int, message: str) -> "sis":
        return [job, result, message]

    @signal()
    def ArtifactOffered(self, medium: str, info: dict[str, Any]) -> "sa{sv}":
        return [medium, info]

    # -- properties (read-only; PropertiesChanged comes from status_changed) ----------

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._values["State"]

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> "s":
        return self._values["Operation"]

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "(us)":
        return self._values["Progress"]

    @dbus_property(access=PropertyAccess.READ)
    def BootedSlot(self) -> "s":
        return self._values["BootedSlot"]

    @dbus_property(access=PropertyAccess.READ)
    def NextSlot(self) -> "s":
        return self._values["NextSlot"]

    @dbus_property(access=PropertyAccess.READ)
    def CurrentArtifact(self) -> "s":
        return self._values["CurrentArtifact"]

    @dbus_property(access=PropertyAccess.READ)
    def Compatible(self) -> "s":
        return self._values["Compatible"]

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> "s":
        return self._values["LastError"]

    @dbus_property(access=PropertyAccess.READ)
    def Server(self) -> "s":
        return self._fleet["Server"]

    @dbus_property(access=PropertyAccess.READ)
    def ServerStatus(self) -> "s":
        return self._fleet["ServerStatus"]

    @dbus_property(access=PropertyAccess.READ)
    def ServerError(self) -> "s":
        return self._fleet["ServerError"]

    @dbus_property(access=PropertyAccess.READ)
    def LastPoll(self) -> "t":
        return self._fleet["LastPoll"]

    @dbus_property(access=PropertyAccess.READ)
    def Deployment(self) -> "(ss)":
        return self._fleet["Deployment"]

    @dbus_property(access=PropertyAccess.READ)
    def DeploymentStatus(self) -> "s":
        return self._fleet["DeploymentStatus"]
