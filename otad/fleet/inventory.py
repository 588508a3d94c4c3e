"""The inventory: the attributes the server shows for the device.

PATCH /api/devices/v1/inventory/device/attributes (inventory, devices API v1) with a
JSON list of {name, value}: upsert, so attributes otad does not send (set by other
tools) stay; 200 on success. (PUT would replace the whole set.) A value is a string, or
a list of strings where a script printed a key more than once.

Besides what otad knows of the device, the attributes are [server.inventory]'s and what
the executables in inventory_dir print as key=value lines (Mender's inventory scripts,
such as mender-inventory-network, run unchanged); a script that fails is logged and
left out, so one broken script does not stop the inventory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from otad import __version__
from otad.errors import OtadError
from otad.fleet.auth import run_script
from otad.fleet.client import Client
from otad.fleet.device import DeviceView

log = logging.getLogger(__name__)

ATTRIBUTES_PATH = "/api/devices/v1/inventory/device/attributes"


Value = str | tuple[str, ...]


@dataclass(frozen=True)
class Attribute:
    name: str
    value: Value

    def to_json(self) -> dict[str, str | list[str]]:
        value: str | list[str] = self.value if isinstance(self.value, str) else list(self.value)
        return {"name": self.name, "value": value}


def run_inventory_scripts(directory: Path) -> dict[str, Value]:
    """What the executables in `directory` print, in name order; a later script's key
    replaces an earlier one's. Scripts that fail are logged and skipped."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        log.warning("cannot list the inventory scripts in %s (%s): sending the rest",
                    directory, error.strerror)  # fmt: skip
        return {}
    found: dict[str, Value] = {}
    for path in entries:
        if path.name.startswith(".") or not path.is_file() or not os.access(path, os.X_OK):
            continue
        try:
            values = run_script(path)
        except OtadError as error:
            log.warning("inventory script left out: %s", error)
            continue
        for key, items in values.items():
            found[key] = items[0] if len(items) == 1 else tuple(items)
    return found


def _os_name(os_release: Path) -> str:
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"') or "unknown"
    return "unknown"


def collect_attributes(
    view: DeviceView,
    identity: Mapping[str, str],
    *,
    extra: Mapping[str, Value | Sequence[str]] | None = None,
    os_release: Path = Path("/etc/os-release"),
) -> list[Attribute]:
    """The attributes otad reports: the device, its software, and the running release's
    provides (rootfs-image.version, rootfs-image.checksum...); `extra` (the configured
    attributes and the scripts' output) cannot override what otad itself reports."""
    system = os.uname()
    found: dict[str, Value] = {
        "device_type": view.device_type,
        "artifact_name": view.artifact_name,
        "kernel": f"{system.sysname} {system.release}",
        "cpu_model": system.machine,
        "os": _os_name(os_release),
        "hostname": socket.gethostname(),
        "otad_version": __version__,
        "update_state": view.phase.value,
    }
    if "mac" in identity:
        found["mac"] = identity["mac"]
    for name, value in view.provides.items():
        found.setdefault(name, value)
    for name, extra_value in (extra or {}).items():
        found.setdefault(name, extra_value if isinstance(extra_value, str) else tuple(extra_value))
    return [Attribute(name, value) for name, value in sorted(found.items())]


def send_inventory(client: Client, attributes: list[Attribute]) -> None:
    """Upsert the attributes on the server."""
    body = json.dumps([attribute.to_json() for attribute in attributes]).encode()
    client.send("PATCH", ATTRIBUTES_PATH, expect=(200, 204), body=body)
