"""The demo's parts that need no QEMU: tools/demo's command line and artifact act, and
what tests/boot/demo.py prints. The full demo boots a guest three times; the boot tests
(tests/boot/test_boot.py) cover the same ground, so it is not run here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.boot import demo
from tests.conftest import require_tool


def run_demo(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(repo_root / "tools/demo"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_help_describes_both_forms(repo_root: Path) -> None:
    result = run_demo(repo_root, "--help")

    assert result.returncode == 0, result.stderr
    assert "Usage: ./tools/demo [--artifact-only] [WORK_DIR]" in result.stdout
    assert "otactl install --reboot" in result.stdout
    assert "set -eu" not in result.stdout  # the help stops at the end of the header


@pytest.mark.parametrize("args", [("--bogus",), ("one", "two")])
def test_a_wrong_command_line_is_refused_before_anything_runs(
    repo_root: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = run_demo(repo_root, *(str(tmp_path / a) if a[0] != "-" else a for a in args))

    assert result.returncode == 2
    assert "usage: ./tools/demo" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_artifact_act_verifies_and_refuses(repo_root: Path, tmp_path: Path) -> None:
    require_tool("mender-artifact")
    require_tool("mkfs.ext4")

    result = run_demo(repo_root, "--artifact-only", str(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("refused as it should be") == 3, result.stdout
    assert "tampered, unsigned and foreign-signed ones refused" in result.stdout
    assert (tmp_path / "sample-1.0.mender").is_file()


def test_the_boot_demo_refuses_a_work_directory_in_use(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the boot demo checks for root before its work directory")
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "debugfs"):
        require_tool(tool)  # it also checks for its tools first
    (tmp_path / "earlier.txt").write_text("kept\n")

    assert demo.main(["--work", str(tmp_path)]) == 2

    assert [p.name for p in tmp_path.iterdir()] == ["earlier.txt"]


def test_the_console_shows_only_its_telling_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(
        b"\x1b[0m\x1b[37m\x1b[40m\x1b[2J\x1b[01;01H  Booting `otad slot B'\r\n"
        b"[    0.000000] Linux version 6.1.0-50-amd64\r\n"
        b"otad demo: release v3 is broken, its init cannot run\r\n"
        b"[    7.026147] Kernel panic - not syncing: Attempted to kill init!\r\n"
        b"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39motad.service\x1b[0m - otad daemon.\r\n"
        b"[  OK  ] Started systemd-logind.service - User Login Management.\r\n"
        b"[otactl] installing: 40%\r\n"
        b"a line still being writ"
    )
    progress = demo.Progress()

    progress.follow(console)
    progress.close()

    shown = [line.removeprefix("    console | ") for line in capsys.readouterr().out.splitlines()]
    assert shown == [
        "Booting `otad slot B'   (GRUB)",
        "otad demo: release v3 is broken, its init cannot run",
        "[    7.026147] Kernel panic - not syncing: Attempted to kill init!",
        "[  OK  ] Started otad.service - otad daemon.",
        "[otactl] installing: 40%",
    ]


def test_the_summary_lists_every_step_and_the_total() -> None:
    progress = demo.Progress()
    progress.close()
    steps = demo.Steps(progress, total=2)
    steps.results = [
        demo.StepResult("build the otad .deb", "built", 41.4),
        demo.StepResult("boot slot A", "FAILED", 250.0),
    ]

    lines = steps.summary().splitlines()

    assert lines[0].split() == ["#", "step", "result", "seconds"]
    assert lines[2].split() == ["1", "build", "the", "otad", ".deb", "built", "41"]
    assert lines[3].split() == ["2", "boot", "slot", "A", "FAILED", "250"]
    assert lines[-1].split()[0] == "total"
    assert len(lines) == 6  # header, rule, two steps, rule, total


def make_chatter_then_fail(log: Path) -> None:
    with demo._stderr_to(log):
        subprocess.run(["sh", "-c", "echo chatter >&2"], check=True)
        subprocess.run(["sh", "-c", "echo broken >&2; exit 3"], check=True)


def test_release_chatter_goes_to_a_log_and_a_failure_names_it(tmp_path: Path) -> None:
    log = tmp_path / "releases.log"

    with pytest.raises(demo.DemoError, match=str(log)):
        make_chatter_then_fail(log)

    assert log.read_text() == "chatter\nbroken\n"
    assert os.readlink("/proc/self/fd/2") != str(log)  # stderr is the process's own again


def test_a_failed_step_ends_in_the_summary_and_keeps_the_work_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = demo.Progress()
    steps = demo.Steps(progress, total=3)
    titles = ["first", "second", "third"]

    def fail() -> str:
        raise demo.DemoError("slot b should run: GRUB booted 'a'")

    steps.run("first", lambda: "fine")
    with pytest.raises(demo.DemoError) as raised:
        steps.run("second", fail)
    code = demo._failed(progress, steps, titles, tmp_path, raised.value)
    progress.close()

    out = capsys.readouterr().out
    assert code == 1
    assert "otad demo: slot b should run: GRUB booted 'a'" in out
    assert [r.result for r in steps.results] == ["fine", "FAILED", demo.NOT_RUN]
    assert "otad demo: FAILED at 'second'" in out
    assert f"the work directory is kept for inspection: {tmp_path}" in out
