"""systemd/health-example, the example health check, run against stand-ins for systemctl,
findmnt and sleep, so that every unit state and mount can be staged without a booted system.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# systemctl is-active prints the next staged state of a unit (the last one repeats) and
# succeeds only for "active"; list-units prints the staged failed units.
FAKE_SYSTEMCTL = """#!/bin/sh
case $1 in
    is-active)
        states="$FAKE_DIR/states-$2"
        [ -f "$states" ] || { echo inactive; exit 3; }
        state=$(head -n 1 "$states")
        if [ "$(wc -l < "$states")" -gt 1 ]; then sed -i 1d "$states"; fi
        echo "$state"
        [ "$state" = active ]
        ;;
    list-units)
        cat "$FAKE_DIR/failed"
        ;;
    *)
        echo "fake systemctl: unexpected $*" >&2
        exit 1
        ;;
esac
"""
FAKE_FINDMNT = '#!/bin/sh\necho "$FAKE_ROOT_OPTIONS"\n'
FAKE_SLEEP = "#!/bin/sh\nexit 0\n"


@dataclass(frozen=True)
class Case:
    name: str
    settings: dict[str, str]
    states: dict[str, list[str]] = field(default_factory=dict)
    failed: str = ""
    root_options: str = "rw,relatime"
    healthy: bool = True
    reason: str = ""


CASES = [
    Case("defaults, nothing failed", {}),
    Case(
        "required units active",
        {"OTAD_HEALTH_UNITS": "ssh.service app.service"},
        {"ssh.service": ["active"], "app.service": ["active"]},
    ),
    Case(
        "a unit still starting becomes active",
        {"OTAD_HEALTH_UNITS": "app.service", "OTAD_HEALTH_WAIT": "5"},
        {"app.service": ["inactive", "activating", "active"]},
    ),
    Case(
        "a required unit failed",
        {"OTAD_HEALTH_UNITS": "app.service"},
        {"app.service": ["activating", "failed"]},
        healthy=False,
        reason="app.service has failed",
    ),
    Case(
        "a required unit never starts",
        {"OTAD_HEALTH_UNITS": "app.service", "OTAD_HEALTH_WAIT": "3"},
        {"app.service": ["inactive"]},
        healthy=False,
        reason="app.service is inactive after 3s, expected active",
    ),
    Case(
        "some unit failed",
        {},
        failed="foo.service loaded failed failed Foo\nbar.mount loaded failed failed Bar\n",
        healthy=False,
        reason="units have failed: foo.service bar.mount",
    ),
    Case(
        "failed units ignored when asked",
        {"OTAD_HEALTH_NONE_FAILED": "no"},
        failed="foo.service loaded failed failed Foo\n",
    ),
    Case("root read-write as required", {"OTAD_HEALTH_ROOT": "rw"}),
    Case(
        "root read-only but read-write required",
        {"OTAD_HEALTH_ROOT": "rw"},
        root_options="ro,relatime",
        healthy=False,
        reason="/ is mounted with options ro,relatime, expected rw",
    ),
    Case("root read-only as required", {"OTAD_HEALTH_ROOT": "ro"}, root_options="ro,noatime"),
    Case(
        "a wrong root setting",
        {"OTAD_HEALTH_ROOT": "readonly"},
        healthy=False,
        reason="OTAD_HEALTH_ROOT is 'readonly', expected rw, ro or nothing",
    ),
]


def install_fakes(directory: Path) -> None:
    for name, text in (
        ("systemctl", FAKE_SYSTEMCTL),
        ("findmnt", FAKE_FINDMNT),
        ("sleep", FAKE_SLEEP),
    ):
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_health_example(case: Case, tmp_path: Path, repo_root: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install_fakes(bin_dir)
    for unit, states in case.states.items():
        (tmp_path / f"states-{unit}").write_text("".join(f"{state}\n" for state in states))
    (tmp_path / "failed").write_text(case.failed)
    environment = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "FAKE_DIR": str(tmp_path),
        "FAKE_ROOT_OPTIONS": case.root_options,
        **case.settings,
    }

    result = subprocess.run(
        [repo_root / "systemd" / "health-example"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )

    if case.healthy:
        assert (result.returncode, result.stdout, result.stderr) == (
            0,
            "health-example: healthy\n",
            "",
        )
    else:
        assert result.returncode == 1
        assert result.stderr == f"health-example: unhealthy: {case.reason}\n"
