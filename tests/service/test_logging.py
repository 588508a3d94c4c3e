"""The level the daemon and the commands log at: the journal gets the daemon's info lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

_PROBE = (
    "import logging, sys\n"
    "from otad.cli.common import setup_logging\n"
    "setup_logging(int(sys.argv[1]), int(sys.argv[2]))\n"
    "logging.getLogger('otad.probe').debug('debug line')\n"
    "logging.getLogger('otad.probe').info('info line')\n"
    "logging.getLogger('otad.probe').warning('warning line')\n"
)


def _lines(verbosity: int, default: int, systemd_level: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_LOG_LEVEL"}
    if systemd_level is not None:
        env["SYSTEMD_LOG_LEVEL"] = systemd_level
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(verbosity), str(default)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.removeprefix("otad.probe: ") for line in result.stderr.splitlines()]


@pytest.mark.parametrize(
    ("verbosity", "default", "systemd_level", "expected"),
    [
        (0, logging.INFO, None, ["info line", "warning line"]),  # the daemon
        (0, logging.WARNING, None, ["warning line"]),  # otactl, otad-artifact
        (1, logging.WARNING, None, ["info line", "warning line"]),
        (1, logging.INFO, None, ["debug line", "info line", "warning line"]),
        (2, logging.WARNING, None, ["debug line", "info line", "warning line"]),
        (0, logging.INFO, "warning", ["warning line"]),
        (0, logging.WARNING, "debug", ["debug line", "info line", "warning line"]),
        (0, logging.INFO, "NOTICE", ["info line", "warning line"]),
        (0, logging.INFO, "nonsense", ["info line", "warning line"]),
    ],
)
def test_levels(
    verbosity: int, default: int, systemd_level: str | None, expected: list[str]
) -> None:
    assert _lines(verbosity, default, systemd_level) == expected
