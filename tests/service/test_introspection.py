"""The hand-written systemd/dbus/org.otad.Updater1.xml says exactly what the daemon
exports: the same methods, arguments, signals and properties with the same types."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import require_tool
from tests.service.conftest import ROOT, Daemon, run_peer

INTERFACE = "org.otad.Updater1"

Members = dict[str, object]


def members(xml: str) -> Members:
    """Every member of org.otad.Updater1 with its argument types, directions, access."""
    node = ET.fromstring(xml)
    found = [i for i in node.iter("interface") if i.get("name") == INTERFACE]
    assert len(found) == 1, f"{INTERFACE} not in {xml[:200]}"
    interface = found[0]
    result: Members = {}
    for method in interface.iter("method"):
        result[f"method {method.get('name')}"] = [
            (arg.get("direction", "in"), arg.get("type"))
            + ((arg.get("name"),) if arg.get("direction", "in") == "in" else ())
            for arg in method.iter("arg")
        ]
    for signal in interface.iter("signal"):
        result[f"signal {signal.get('name')}"] = [arg.get("type") for arg in signal.iter("arg")]
    for prop in interface.iter("property"):
        result[f"property {prop.get('name')}"] = (prop.get("type"), prop.get("access"))
    return result


def test_shipped_xml_matches_the_exported_interface(daemon: Daemon) -> None:
    require_tool("busctl")
    exported = run_peer(
        ["busctl", f"--address={daemon.bus.address}", "introspect", "--xml-interface",
         "org.otad.Updater1", "/org/otad/Updater1"]
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    shipped = (ROOT / "systemd/dbus/org.otad.Updater1.xml").read_text()
    assert members(shipped) == members(exported.stdout)
    assert len(members(shipped)) == 25


def test_bus_policy_is_well_formed() -> None:
    policy = ET.parse(Path(ROOT / "systemd/dbus/org.otad.Updater1.conf")).getroot()
    owners = [(p.get("user"), a.get("own")) for p in policy for a in p if a.get("own")]
    assert owners == [("root", "org.otad.Updater1")]
