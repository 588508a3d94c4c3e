"""The sources of the Debian package: what debian/ installs exists, the man pages cover the
commands as they are now, and the example configuration is one otad accepts.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import re
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.config import parse_config
from tests.conftest import require_tool


def install_sources(repo_root: Path) -> list[str]:
    """The source patterns of debian/otad.install (every word but each line's last)."""
    sources = []
    for line in (repo_root / "debian/otad.install").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            sources.extend(line.split()[:-1])
    return sources


def test_every_installed_file_exists(repo_root: Path) -> None:
    missing = [
        pattern for pattern in install_sources(repo_root) if not glob.glob(str(repo_root / pattern))
    ]

    assert missing == []


def test_every_update_module_is_installed(repo_root: Path) -> None:
    modules = repo_root / "otad/modules/bin"

    assert sorted(path.name for path in modules.iterdir()) == [
        "deb",
        "directory",
        "script",
        "single-file",
    ]
    assert "otad/modules/bin/* usr/share/otad/modules/v3/" in (
        (repo_root / "debian/otad.install").read_text().splitlines()
    )


def test_every_command_has_a_man_page(repo_root: Path) -> None:
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    pages = (repo_root / "debian/otad.manpages").read_text().split()

    assert sorted(Path(page).stem for page in pages) == sorted(scripts)
    for page in pages:
        assert (repo_root / page).is_file(), page


@pytest.mark.parametrize("page", ["otad.8", "otactl.1", "otad-artifact.1", "otad-convert.1"])
def test_man_page_renders_without_warnings(page: str, repo_root: Path) -> None:
    man = require_tool("man")

    result = subprocess.run(
        [man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", repo_root / "man" / page],
        capture_output=True,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        check=False,
    )

    assert (result.returncode, result.stderr.decode()) == (0, "")


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every documented long option and subcommand name of `parser` and its subcommands."""
    names: set[str] = set()
    for action in parser._actions:  # argparse has no public way to walk subparsers
        if action.help != argparse.SUPPRESS:
            names.update(option for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                names.add(name)
                names |= long_options(subparser)
    return names


def command_parser(module: str) -> argparse.ArgumentParser:
    """The parser of a command's module; dbus_next's import warns about gi's importer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    return parser


@pytest.mark.parametrize(
    ("page", "module"),
    [
        ("otad-artifact.1", "otad.cli.artifact"),
        ("otactl.1", "otad.cli.ctl"),
        ("otad.8", "otad.cli.daemon"),
        ("otad-convert.1", "convert.cli"),
    ],
)
def test_man_page_covers_every_option(page: str, module: str, repo_root: Path) -> None:
    text = (repo_root / "man" / page).read_text().replace("\\-", "-")
    documented = set(re.findall(r"--[a-z][a-z-]*|\b[a-z][a-z-]+\b", text))

    assert long_options(command_parser(module)) - documented == set()


def test_man_pages_name_the_entry_points_they_describe(repo_root: Path) -> None:
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]

    # A page is written for the command as it is: when one of these changes, so must it.
    assert scripts == {
        "otad": "otad.cli.daemon:main",
        "otactl": "otad.cli.ctl:main",
        "otad-artifact": "otad.cli.artifact:main",
        "otad-convert": "convert.cli:main",
    }


def uncomment_settings(text: str) -> str:
    """The example with every commented-out setting and table header turned on."""
    setting = re.compile(r"^#(\[[a-z.]+\]|[a-z_]+ = .*)$")
    return "\n".join(setting.sub(r"\1", line) for line in text.splitlines())


def test_example_configuration_refuses_to_start_as_shipped(repo_root: Path) -> None:
    text = (repo_root / "systemd/etc/otad/otad.conf").read_text()

    assert tomllib.loads(text) == {}


def test_example_configuration_is_valid_once_uncommented(repo_root: Path) -> None:
    text = (repo_root / "systemd/etc/otad/otad.conf").read_text()

    config = parse_config(uncomment_settings(text), "otad.conf (example)")

    assert config.device_type == "qemux86-64"
    assert config.bootloader.options == {"env_dir": "/boot/efi/EFI/otad", "trial_boots": 3}
    assert str(config.slots[Slot.A].root) == "PARTUUID=5b1c9e63-02"
    assert str(config.slots[Slot.B].root) == "PARTUUID=5b1c9e63-03"


def test_example_health_settings_name_what_the_script_reads(repo_root: Path) -> None:
    defaults = (repo_root / "systemd/etc/default/otad-health-example").read_text()
    script = (repo_root / "systemd/health-example").read_text()

    named = set(re.findall(r"^#(OTAD_HEALTH_[A-Z_]+)=", defaults, re.MULTILINE))
    read = set(re.findall(r"\$\{(OTAD_HEALTH_[A-Z_]+):-", script))

    assert (
        named
        == read
        == {
            "OTAD_HEALTH_UNITS",
            "OTAD_HEALTH_WAIT",
            "OTAD_HEALTH_ROOT",
            "OTAD_HEALTH_NONE_FAILED",
        }
    )


def test_example_configuration_names_every_setting(repo_root: Path) -> None:
    from otad.config import _TOP_KEYS  # the parser's own list, so a new key shows here

    text = uncomment_settings((repo_root / "systemd/etc/otad/otad.conf").read_text())

    assert set(tomllib.loads(text)) == _TOP_KEYS
