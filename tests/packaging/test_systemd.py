"""The files under systemd/: units verified by systemd-analyze, and what otad relies on in them.

systemd-analyze verify runs against a scratch root holding a copy of the host's unit
directory, the units under test, and stand-ins for the commands they start, so it
checks syntax, dependencies and executables without otad being installed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from otad.cli.common import exit_code_for
from otad.errors import NotInTrial
from tests.conftest import require_tool
from tests.packaging.units import Unit, parse_unit, value, words

UNITS = ("otad.service", "otad-commit.service", "otad-health-example.service")
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")
POLKIT_DTD = Path("/usr/share/polkit-1/policyconfig-1.dtd")


@pytest.fixture
def systemd_dir(repo_root: Path) -> Path:
    return repo_root / "systemd"


def import_authorize() -> ModuleType:
    """otad.dbus.authorize, whose dbus_next import warns about gi's importer on bookworm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        return importlib.import_module("otad.dbus.authorize")


def load(systemd_dir: Path, name: str) -> Unit:
    return parse_unit(systemd_dir / name)


def make_verify_root(root: Path, systemd_dir: Path) -> None:
    """A root in which every unit under test and every command it starts exist."""
    unit_dir = root / "usr/lib/systemd/system"
    shutil.copytree(HOST_UNIT_DIR, unit_dir, symlinks=True)
    for name in UNITS:
        shutil.copy(systemd_dir / name, unit_dir / name)
        for command in parse_unit(systemd_dir / name)["Service"]["ExecStart"]:
            stand_in = root / command.split()[0].lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path, systemd_dir: Path) -> None:
    analyze = require_tool("systemd-analyze")
    if not HOST_UNIT_DIR.is_dir():
        pytest.skip(f"{HOST_UNIT_DIR} is missing: the systemd package is not installed")
    make_verify_root(tmp_path, systemd_dir)

    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={tmp_path}", *UNITS],
        capture_output=True,
        text=True,
        check=False,
    )

    # Unknown keys and bad values are only warnings with exit status 0: any output fails.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_daemon_unit_is_a_notify_service_with_watchdog(systemd_dir: Path) -> None:
    from otad.dbus import BUS_NAME

    unit = load(systemd_dir, "otad.service")

    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert value(unit, "Service", "ExecStart") == "/usr/bin/otad"
    assert value(unit, "Service", "BusName") == BUS_NAME
    assert value(unit, "Service", "Restart") == "on-failure"
    assert value(unit, "Service", "WatchdogSec").removesuffix("s").isdigit()
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


def test_daemon_sandbox_keeps_what_updates_need_writable(systemd_dir: Path) -> None:
    unit = load(systemd_dir, "otad.service")

    assert value(unit, "Service", "ProtectSystem") in ("full", "strict")
    writable = {path.lstrip("-") for path in words(unit, "Service", "ReadWritePaths")}
    assert {"/data", "/boot", "/boot/efi", "/efi"} <= writable
    assert "block-* rw" in unit["Service"]["DeviceAllow"]
    assert "PrivateDevices" not in unit["Service"]
    capabilities = set(words(unit, "Service", "CapabilityBoundingSet"))
    assert {"CAP_SYS_ADMIN", "CAP_SYS_BOOT"} <= capabilities
    assert "CAP_SYS_MODULE" not in capabilities
    assert "AF_UNIX" in words(unit, "Service", "RestrictAddressFamilies")
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert value(unit, "Service", key) == "yes", key


def test_commit_runs_only_after_boot_complete(systemd_dir: Path) -> None:
    unit = load(systemd_dir, "otad-commit.service")

    assert "boot-complete.target" in words(unit, "Unit", "Requires")
    assert "boot-complete.target" in words(unit, "Unit", "After")
    assert value(unit, "Service", "ExecStart") == "/usr/bin/otactl commit"
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


def test_commit_counts_nothing_to_commit_as_success(systemd_dir: Path) -> None:
    unit = load(systemd_dir, "otad-commit.service")

    nothing_to_commit = exit_code_for(NotInTrial("the running slot is not on trial"))

    assert nothing_to_commit != 0
    assert words(unit, "Service", "SuccessExitStatus") == [str(nothing_to_commit)]


def test_example_check_gates_boot_complete(systemd_dir: Path) -> None:
    unit = load(systemd_dir, "otad-health-example.service")

    assert "boot-complete.target" in words(unit, "Unit", "Before")
    assert value(unit, "Install", "RequiredBy") == "boot-complete.target"
    assert value(unit, "Service", "ExecStart") == "/usr/libexec/otad/health-example"
    assert os.access(systemd_dir / "health-example", os.X_OK)


def test_dbus_activation_starts_the_daemon_unit(systemd_dir: Path) -> None:
    from otad.dbus import BUS_NAME

    activation = parse_unit(systemd_dir / f"{BUS_NAME}.service")

    assert value(activation, "D-BUS Service", "Name") == BUS_NAME
    assert value(activation, "D-BUS Service", "SystemdService") == "otad.service"
    assert value(activation, "D-BUS Service", "User") == "root"


def test_sysusers_creates_the_otad_group(systemd_dir: Path) -> None:
    group = import_authorize().DEFAULT_GROUP
    lines = [
        line.split()
        for line in (systemd_dir / "otad.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert lines == [["g", group, "-"]] == [["g", "otad", "-"]]


def test_polkit_policy_is_valid_xml(systemd_dir: Path) -> None:
    xmllint = require_tool("xmllint")
    policy = systemd_dir / "org.otad.policy"

    subprocess.run([xmllint, "--noout", policy], check=True)
    if not POLKIT_DTD.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POLKIT_DTD} is missing (package polkitd), but CI must provide it")
        pytest.skip(f"{POLKIT_DTD} is missing (package polkitd): validity not checked")
    subprocess.run([xmllint, "--noout", "--dtdvalid", POLKIT_DTD, policy], check=True)


def test_polkit_actions_are_the_ones_the_daemon_checks(systemd_dir: Path) -> None:
    authorize = import_authorize()
    root = ET.parse(systemd_dir / "org.otad.policy").getroot()
    defaults = {
        action.attrib["id"]: {child.tag: child.text for child in action.findall("defaults/*")}
        for action in root.findall("action")
    }

    expected = {"org.otad.install", "org.otad.manage"}
    assert set(defaults) == {authorize.ACTION_INSTALL, authorize.ACTION_MANAGE} == expected
    for action_defaults in defaults.values():
        assert action_defaults == {
            "allow_any": "no",
            "allow_inactive": "no",
            "allow_active": "auth_admin_keep",
        }
