"""The hardware watchdog armed from the initramfs: the option, what the converter writes,
and otad's initramfs-tools hook run by the real mkinitramfs in a Debian 12 root.

That the armed watchdog resets a hanging boot is shown in QEMU by
tests/boot/test_scenarios.py.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from convert import cli, pipeline, watchdog
from otad.errors import UsageError
from tests.convert import stock
from tests.convert.conftest import require_root_and_tools

ROOT = Path(__file__).resolve().parents[2]
HOOK_SOURCE = ROOT / "initramfs/hooks/otad-watchdog"
SCRIPT_SOURCE = ROOT / "initramfs/scripts/init-top/otad-watchdog"
SCRIPT = Path("usr/share/initramfs-tools/scripts/init-top/otad-watchdog")


def _options(*argv: str) -> pipeline.Options:
    return cli.options_from(cli.build_parser().parse_args(["in.img", "-o", "out.img", *argv]))


def test_the_watchdog_is_on_by_default_and_the_option_or_config_sets_it(tmp_path: Path) -> None:
    config = tmp_path / "convert.toml"
    config.write_text("watchdog = 0\n")

    assert _options().watchdog == watchdog.DEFAULT_TIMEOUT
    assert _options("--watchdog", "45").watchdog == 45
    assert _options("--config", str(config)).watchdog == 0
    assert _options("--config", str(config), "--watchdog", "300").watchdog == 300


@pytest.mark.parametrize("value", ["true", '"120"', "1.5"])
def test_a_watchdog_in_the_config_must_be_a_number_of_seconds(value: str, tmp_path: Path) -> None:
    config = tmp_path / "convert.toml"
    config.write_text(f"watchdog = {value}\n")

    with pytest.raises(UsageError, match="watchdog must be a int"):
        _options("--config", str(config))


@pytest.mark.parametrize("seconds", [-1, 1, 29, 3601])
def test_a_timeout_that_could_reset_healthy_boots_is_refused_before_anything_happens(
    seconds: int, tmp_path: Path
) -> None:
    image = tmp_path / "in.img"
    image.write_bytes(bytes(4096))
    options = cli.options_from(
        cli.build_parser().parse_args(
            [str(image), "-o", str(tmp_path / "out.img"), "--watchdog", str(seconds)]
        )
    )

    with pytest.raises(UsageError, match=f"--watchdog {seconds}: expected 0 \\(off\\) or 30"):
        pipeline.convert(options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.img"]
    assert image.read_bytes() == bytes(4096)


def test_the_settings_are_written_and_systemd_takes_the_watchdog_over(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)

    change = watchdog.install(root, 90, None)

    setting = (root / watchdog.SETTING).read_text()
    assert "\nOTAD_WATCHDOG_SEC=90\n" in setting
    assert all(len(line) <= 100 for line in setting.splitlines())
    drop_in = (root / watchdog.DROP_IN).read_text().splitlines()
    assert drop_in[drop_in.index("[Manager]") + 1 :] == [
        "RuntimeWatchdogSec=90s",
        "RebootWatchdogSec=10min",
    ]
    assert change.startswith("watchdog: 90 s; systemd pings it")


@pytest.mark.parametrize(
    ("present", "initrd", "reason"),
    [
        ((), None, "the image boots without an initramfs"),
        ((), "/initrd.img", "no initramfs-tools"),
        ((watchdog.UPDATE_INITRAMFS,), "/initrd.img", f"no /{watchdog.HOOK}"),
    ],
)
def test_without_initramfs_tools_or_otads_hook_only_systemd_arms_it(
    present: tuple[Path, ...],
    initrd: str | None,
    reason: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "root"
    for relative in present:
        (root / relative).parent.mkdir(parents=True)
        (root / relative).write_text("#!/bin/sh\nexit 1\n")

    with caplog.at_level(logging.WARNING):
        change = watchdog.install(root, watchdog.DEFAULT_TIMEOUT, initrd)

    assert reason in change
    assert "not armed earlier" in change
    assert reason in caplog.text
    assert "armed only once systemd starts" in caplog.text
    assert (root / watchdog.DROP_IN).is_file()


# -- otad's hook in the real mkinitramfs ---------------------------------------------------


@contextlib.contextmanager
def _debian_root(work: Path) -> Iterator[Path]:
    """The cached Debian 12 tree (kernel, initramfs-tools) as a writable overlay, with
    otad's hook and init-top script installed where the package puts them."""
    lower = stock.stock_tree()
    upper, scratch, merged = work / "upper", work / "work", work / "root"
    for directory in (upper, scratch, merged):
        directory.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={scratch}", merged],
        check=True,
    )  # fmt: skip
    try:
        for source, target in ((HOOK_SOURCE, watchdog.HOOK), (SCRIPT_SOURCE, SCRIPT)):
            (merged / target).write_bytes(source.read_bytes())
            (merged / target).chmod(0o755)
        yield merged
    finally:
        subprocess.run(["umount", merged], check=False)


def _mkinitramfs(root: Path) -> tuple[set[str], str]:
    """Build an initramfs in `root` with mkinitramfs; the names in it, and the hooks' stderr."""
    (version,) = [p.name for p in (root / "lib/modules").iterdir()]
    built = subprocess.run(
        ["chroot", root, "mkinitramfs", "-o", "/tmp/initrd.img", version],
        capture_output=True, text=True, check=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )  # fmt: skip
    listing = subprocess.run(
        ["chroot", root, "lsinitramfs", "/tmp/initrd.img"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.strip() for line in listing.splitlines()}, built.stderr


def _unpacked(root: Path, name: str) -> str:
    target = root / "tmp/unpacked"
    subprocess.run(
        ["chroot", root, "unmkinitramfs", "/tmp/initrd.img", "/tmp/unpacked"], check=True
    )
    return (target / name).read_text()


@pytest.mark.slow
def test_the_hook_adds_the_drivers_their_timeout_and_the_setting(tmp_path: Path) -> None:
    require_root_and_tools()
    with _debian_root(tmp_path) as root:
        (root / watchdog.SETTING).parent.mkdir(parents=True, exist_ok=True)
        (root / watchdog.SETTING).write_text(watchdog.render_setting(150))

        names, _ = _mkinitramfs(root)

        assert watchdog.IN_INITRAMFS in names
        modules = {Path(n).name for n in names if "/kernel/drivers/watchdog/" in n}
        assert {"i6300esb.ko", "iTCO_wdt.ko", "watchdog.ko"} <= modules
        assert any(n.endswith("/kernel/drivers/mfd/lpc_ich.ko") for n in names)
        assert _unpacked(root, watchdog.IN_INITRAMFS) == "OTAD_WATCHDOG_SEC=150\n"
        options = _unpacked(root, "etc/modprobe.d/otad-watchdog.conf").splitlines()
        assert "options i6300esb heartbeat=150" in options
        assert "options iTCO_wdt heartbeat=150" in options
        assert not any(line.startswith("options softdog") for line in options)  # soft_margin
        order = _unpacked(root, "scripts/init-top/ORDER")
        assert order.index("/scripts/init-top/udev ") < order.index(
            "/scripts/init-top/otad-watchdog "
        )


@pytest.mark.slow
@pytest.mark.parametrize("setting", [None, "OTAD_WATCHDOG_SEC=2m\n"])  # absent, or no number
def test_without_an_enabling_setting_the_hook_adds_nothing(
    setting: str | None, tmp_path: Path
) -> None:
    require_root_and_tools()
    with _debian_root(tmp_path) as root:
        if setting is not None:
            (root / watchdog.SETTING).parent.mkdir(parents=True, exist_ok=True)
            (root / watchdog.SETTING).write_text(setting)

        names, errors = _mkinitramfs(root)

        assert watchdog.IN_INITRAMFS not in names
        assert not [n for n in names if "/kernel/drivers/watchdog/" in n]
        assert ("not a number of seconds" in errors) == (setting == "OTAD_WATCHDOG_SEC=2m\n")
        assert str(SCRIPT).removeprefix("usr/share/initramfs-tools/") in names  # inert
