"""The inventory: the attributes the server shows for the device.

PATCH /api/devices/v1/inventory/device/attributes (inventory, devices API v1) with a
JSON list of {name, value}: upsert, so attributes otad does not send (set by other
tools) stay; 200 on success. (PUT would replace the whole set.)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from otad import __version__
from otad.fleet.client import Client
from otad.fleet.device import DeviceView

ATTRIBUTES_PATH = "/api/devices/v1/inventory/device/attributes"


@dataclass(frozen=True)
class Attribute:
    name: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "value": self.value}


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
    os_release: Path = Path("/etc/os-release"),
) -> list[Attribute]:
    """The attributes otad reports: the device, its software, and the running release's
    provides (rootfs-image.version, rootfs-image.checksum...)."""
    system = os.uname()
    found = {
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
    return [Attribute(name, value) for name, value in sorted(found.items())]


def send_inventory(client: Client, attributes: list[Attribute]) -> None:
    """Upsert the attributes on the server."""
    body = json.dumps([attribute.to_json() for attribute in attributes]).encode()
    client.send("PATCH", ATTRIBUTES_PATH, expect=(200, 204), body=body)
