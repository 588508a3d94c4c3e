"""The convert-boot-update demo that `./tools/demo` runs: otad's whole story in one go.

It builds the otad .deb, takes a stock Debian 12 image (built by debootstrap and cached),
converts it with otad-convert, boots it in QEMU (UEFI, TCG), updates it to a release v2
with `otactl install --reboot` and shows the trial boot committed, then installs a v3
whose init cannot run and shows GRUB giving up on it and returning to v2, and otad
reporting the failure. Every step has a header with the time since the start, waits on
the guest print what they wait for every 10 s and the console's telling lines, and a
table at the end says what each step did and how long it took.

It is built on the boot tests' harness (tests/boot/harness.py): the same cached .deb,
stock image, releases and guests, so it proves nothing the boot tests do not; it shows
it. It lives beside the harness because files outside tests/ and bench/ key the .deb
(harness.tree_hash), and a demo is not part of the package. Run as root:

    python3 -m tests.boot.demo [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.boot import harness
from tests.convert import stock

PROGRAM = "otad demo"
MEDIA = "/run/otad-demo"  # where the guest mounts the disk that carries the releases
# Generous deadlines: on 2 cores shared with four other QEMU guests one reboot took 9 min.
SETTLE = 180.0  # seconds for otad.service and otad-commit.service after the shell is up
INSTALL = 1200.0  # seconds for `otactl install --reboot` and the reboot, under TCG
FALLBACK = 1800.0  # seconds for three failed trial boots and the boot of the previous slot
NOT_RUN = "not run"  # the result of the steps after a failed one
QUIET = 10.0  # seconds without output before a line says what the demo waits for
RELEASE_FILE = "/etc/otad-demo-release"
V2_FILES = {
    RELEASE_FILE: b"otad demo release v2\n",
    "/etc/motd": b"\nThis device runs otad demo release v2, installed over the air.\n\n",
}
BROKEN_INIT = b"#!/bin/sh\necho 'otad demo: release v3 is broken, its init cannot run'\nexit 1\n"
# The console lines worth showing while the guest boots, after colours are stripped.
TELLING = re.compile(
    r"Booting `|Welcome to Debian|(Started|Finished|Failed).*otad|Reached target .*multi-user"
    r"|v3 is broken|Kernel panic|Rebooting in|reboot: Restarting|^\[otactl\]"
)
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class DemoError(Exception):
    """A step did not end as the demo expected; the message says what was seen."""


# -- output ------------------------------------------------------------------------------


class Progress:
    """Everything the demo prints, from the main thread and from a watcher thread.

    The watcher prints the telling lines of the guest's console log as they arrive and,
    after QUIET seconds without output, a line naming what the demo waits for.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_output = time.monotonic()
        self._waiting: tuple[str, float] | None = None
        self._console: Path | None = None
        self._offset = 0
        self._partial = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="demo-progress", daemon=True)
        self._thread.start()

    def say(self, text: str = "") -> None:
        with self._lock:
            print(text, flush=True)
            self._last_output = time.monotonic()

    def show(self, output: str, prefix: str = "    ") -> None:
        """Print a command's output, indented."""
        for line in output.rstrip("\n").splitlines():
            self.say(f"{prefix}{line}")

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        previous = self._waiting
        self._waiting = (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = previous

    def follow(self, console: Path | None) -> None:
        """Show the telling lines of `console` from its start on (None: stop)."""
        with self._lock:
            self._console = console
            self._offset = 0
            self._partial = b""

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read_console()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self._read_console()
            waiting = self._waiting
            if waiting is not None and time.monotonic() - self._last_output >= QUIET:
                what, since = waiting
                self.say(f"      ... waiting for {what} ({time.monotonic() - since:.0f} s)")

    def _read_console(self) -> None:
        with self._lock:
            console = self._console
            if console is None or not console.exists():
                return
            with console.open("rb") as stream:
                stream.seek(self._offset)
                data = stream.read()
            self._offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = ESCAPES.sub("", raw.decode(errors="replace")).replace("\r", "").strip()
            if TELLING.search(line):
                source = "   (GRUB)" if line.startswith("Booting `") else ""
                self.say(f"    console | {line[:100]}{source}")


class _SayHandler(logging.Handler):
    """The harness's log lines (the commands it runs), printed through Progress."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        for prefix in ("boot harness: ", "stock image: "):
            message = message.removeprefix(prefix)
        self.progress.say(f"    $ {message[:150]}{'...' if len(message) > 150 else ''}")


@dataclass
class StepResult:
    title: str
    result: str
    seconds: float


class Steps:
    """Runs the demo's steps in order with a header each, and keeps their results."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.started = time.monotonic()
        self.results: list[StepResult] = []

    def run(self, title: str, step: Callable[[], str]) -> None:
        """Run `step`, which returns a short result; an exception marks the step FAILED."""
        number = len(self.results) + 1
        elapsed = time.monotonic() - self.started
        self.progress.say()
        self.progress.say(f"==> [{number}/{self.total}] {title}   (at {_clock(elapsed)})")
        begun = time.monotonic()
        try:
            with self.progress.waiting(title):
                result = step()
        except BaseException:
            self.results.append(StepResult(title, "FAILED", time.monotonic() - begun))
            raise
        seconds = time.monotonic() - begun
        self.results.append(StepResult(title, result, seconds))
        self.progress.say(f"    -> {result} ({seconds:.0f} s)")

    def summary(self) -> str:
        rows = [("#", "step", "result", "seconds")]
        rows += [
            (str(n), r.title, r.result, "" if r.result == NOT_RUN else f"{r.seconds:.0f}")
            for n, r in enumerate(self.results, start=1)
        ]
        rows.append(("", "total", "", f"{time.monotonic() - self.started:.0f}"))
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        lines = []
        for index, row in enumerate(rows):
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            cells[3] = row[3].rjust(widths[3])
            lines.append("  ".join(cells))
            if index in (0, len(rows) - 2):
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def is_cache_busy() -> bool:
    """Whether another process (a test run, another demo) holds the cache's build lock."""
    lock = stock.cache_dir() / ".lock"
    if not lock.exists():
        return False
    with lock.open("a") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(stream, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def _stderr_to(log: Path) -> Iterator[None]:
    """Send this process's stderr, and so its children's, to `log` for the block.

    A failure inside names the log, where the failed command's own message is.
    """
    saved = os.dup(2)
    try:
        with log.open("ab") as stream:
            os.dup2(stream.fileno(), 2)
            try:
                yield
            except subprocess.CalledProcessError as error:
                raise DemoError(f"{error} (its messages are in {log})") from error
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _is_fresh(path: Path, since: float) -> bool:
    """Whether `path` was written after `since` (wall clock): built now, not cached."""
    return path.stat().st_mtime >= since


# -- the host's steps --------------------------------------------------------------------


@dataclass
class Inputs:
    """What the host steps produce for the guest steps."""

    deb: Path | None = None
    debs: tuple[Path, ...] = ()
    stock_image: Path | None = None
    converted: harness.Converted | None = None
    v2: Path | None = None
    v3: Path | None = None
    media: Path | None = None


class Demo:
    """The demo's steps, each a method that returns its one-line result."""

    def __init__(self, work: Path, progress: Progress) -> None:
        self.work = work
        self.progress = progress
        self.inputs = Inputs()
        self.guest: harness.Guest | None = None

    def say_if_cache_busy(self) -> None:
        if is_cache_busy():
            self.progress.say(f"    another build holds {stock.cache_dir()}/.lock: waiting for it")

    def build_deb(self) -> str:
        since = time.time()
        self.say_if_cache_busy()
        with self.progress.waiting("tools/build-deb (dpkg-buildpackage)"):
            deb = harness.otad_deb()
        self.inputs.deb = deb
        self.progress.say(f"    {deb} ({deb.stat().st_size // 1024} KiB)")
        return "built" if _is_fresh(deb, since) else "unchanged tree: cached .deb reused"

    def stock_image(self) -> str:
        assert self.inputs.deb is not None
        since = time.time()
        self.say_if_cache_busy()
        with self.progress.waiting("debootstrap of Debian 12 and the stock image (first run)"):
            image = stock.stock_image()
        with self.progress.waiting("otad's dependencies (apt-get download)"):
            debs = harness.dependency_debs(self.inputs.deb, stock.stock_tree())
        self.inputs.stock_image = image
        self.inputs.debs = (*debs, self.inputs.deb)
        self.progress.say(f"    stock image: {image} ({image.stat().st_size >> 20} MiB, GPT)")
        names = ", ".join(d.name.split("_")[0] for d in debs) or "none"
        intro = f"the {len(debs)} packages otad needs beyond the stock image: "
        for line in textwrap.wrap(intro + names, 92):
            self.progress.say(f"    {line}")
        fresh = _is_fresh(image, since) or bool(debs and _is_fresh(debs[0].parent, since))
        return "built" if fresh else "cached image reused"

    def convert(self) -> str:
        assert self.inputs.stock_image is not None
        key = harness.signing_key()
        public = key.with_name(key.name + ".pub")
        overlay = self.work / "overlay"
        harness.write_overlay(overlay)
        output = self.work / f"{harness.FIRST_RELEASE}.img"
        argv = [
            "otad-convert", str(self.inputs.stock_image), "-o", str(output),
            "--storage-size", harness.STORAGE_SIZE, "--device-type", harness.DEVICE_TYPE,
            "--artifact-name", harness.FIRST_RELEASE, "--key", str(key),
            "--verify-key", str(public), "--overlay", str(overlay),
            *[a for d in self.inputs.debs for a in ("--deb", str(d))],
        ]  # fmt: skip
        shown = [a if a.startswith("-") else Path(a).name for a in argv if a != "--deb"]
        shown = [a for a in shown if not a.endswith(".deb")]
        count = len(self.inputs.debs)
        self.progress.say(
            f"    $ {' '.join(shown)} --deb ... ({count} .debs: otad, its dependencies)"
        )
        report = self._run_converter([sys.executable, "-m", "convert.cli", *argv[1:]])
        (self.work / "convert-report.txt").write_text(report)
        shutil.rmtree(overlay)
        artifact = output.with_suffix(".mender")
        self.inputs.converted = harness.Converted(output, artifact, key)
        size = artifact.stat().st_size >> 20
        return f"A/B image, first artifact {artifact.name} ({size} MiB, signed)"

    def _run_converter(self, argv: Sequence[str]) -> str:
        """Run the converter with its output (stderr too) shown as it comes; that output."""
        environment = {**os.environ, "PYTHONPATH": str(harness.REPO)}
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=environment, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            self.progress.say(f"    | {line.rstrip()}")
        if process.wait() != 0:
            raise DemoError(f"otad-convert exited with {process.returncode} (output above)")
        return "".join(lines)

    def make_releases(self) -> str:
        converted = self.inputs.converted
        assert converted is not None
        v2 = harness.ReleaseChanges(files=V2_FILES)
        v3 = harness.ReleaseChanges(files={"/usr/sbin/init": BROKEN_INIT})
        self.inputs.media = self.work / "media.img"
        log = self.work / "releases.log"
        with _stderr_to(log):  # e2fsck's and resize2fs's chatter, or their errors
            with self.progress.waiting("release v2: slot A's filesystem with a new /etc/motd"):
                self.inputs.v2 = harness.make_changed_release(converted, self.work, "v2", v2)
            with self.progress.waiting("release v3: slot A's filesystem with a broken init"):
                self.inputs.v3 = harness.make_changed_release(converted, self.work, "v3", v3)
            harness.make_media_of([self.inputs.v2, self.inputs.v3], self.inputs.media)
        for artifact in (self.inputs.v2, self.inputs.v3):
            self.progress.say(f"    {artifact.name}: {artifact.stat().st_size >> 20} MiB, signed")
        return "v2 and v3 signed, on a USB-like disk"

    # -- the guest's steps --

    def boot_slot_a(self) -> str:
        converted = self.inputs.converted
        assert converted is not None
        machine = self.work / "machine"
        machine.mkdir()
        self.progress.say(f"    QEMU q35, UEFI (OVMF), TCG; console log: {machine}/console.log")
        self.guest = harness.Guest(converted.image, machine, self.inputs.media)
        self.progress.follow(self.guest.console_log)
        with self.progress.waiting("firmware, GRUB, Linux and systemd, then a root shell"):
            self.guest.wait_shell()
        status = self.wait_for_otad()
        self.show_status()
        self.expect(status, booted="a", artifact=harness.FIRST_RELEASE, error=False)
        return f"slot a booted, {status['current_artifact']}, otad idle"

    def update_to_v2(self) -> str:
        guest = self.running()
        assert self.inputs.v2 is not None
        self.mount_media()
        before = guest.check(f"cat {RELEASE_FILE} 2>/dev/null || echo '(no {RELEASE_FILE})'")
        self.progress.say(f"    before: {before.strip()}")
        self.install_and_reboot(self.inputs.v2, INSTALL, "the install of v2 and the reboot")
        status = self.wait_for_otad()
        self.show_journal()
        self.show_status()
        self.expect(status, booted="b", artifact="v2", error=False)
        after = guest.check(f"cat {RELEASE_FILE}").strip()
        self.progress.say(f"    after: {after}; and /etc/motd:")
        self.progress.show(guest.check("cat /etc/motd").strip("\n"), prefix="      ")
        if after != V2_FILES[RELEASE_FILE].decode().strip():
            raise DemoError(f"{RELEASE_FILE} in slot b says {after!r}")
        return "slot b booted on trial, healthy, committed: v2"

    def broken_v3_falls_back(self) -> str:
        guest = self.running()
        assert self.inputs.v3 is not None
        self.mount_media()
        failures_before = self.console_text().count("v3 is broken")
        self.install_and_reboot(
            self.inputs.v3, FALLBACK, "v3's trial boots to fail and GRUB to return to slot b"
        )
        status = self.wait_for_otad()
        failures = self.console_text().count("v3 is broken") - failures_before
        self.show_journal()
        self.show_status()
        self.expect(status, booted="b", artifact="v2", error=True)
        if failures == 0:
            raise DemoError("slot a's broken init never ran: the trial boot did not happen")
        slot = guest.booted_slot_parameter()
        return f"v3 failed {failures} trial boots; GRUB fell back to slot {slot} (v2)"

    # -- helpers of the guest's steps --

    def running(self) -> harness.Guest:
        if self.guest is None:
            raise DemoError("the guest is not running")
        return self.guest

    def wait_for_otad(self) -> dict[str, object]:
        """`otactl status --json` once otad.service runs and otad-commit.service is done."""
        guest = self.running()
        with self.progress.waiting("otad.service to start"):
            guest.wait_until("systemctl is-active otad.service", SETTLE, "otad.service active")
        with self.progress.waiting("otad-commit.service (after boot-complete.target)"):
            guest.wait_until(
                "systemctl show -P ActiveState otad-commit.service | grep -qx active",
                SETTLE,
                "otad-commit.service done",
            )
        return guest.status()

    def show_status(self) -> None:
        self.progress.say("    # otactl status")
        self.progress.show(self.running().check("otactl status"))

    def show_journal(self) -> None:
        """otad's own account of this boot."""
        self.progress.say(
            "    # journalctl -b -u otad -u otad-commit (without systemd's lines, tracebacks)"
        )
        # TODO: stop filtering asyncio's "Exception in callback" lines when a Commit that
        # otad refuses (nothing to commit) no longer makes dbus-next log them.
        output = self.running().check(
            "journalctl -b -o short --no-pager -u otad.service -u otad-commit.service"
            " | sed -E 's/^.{15} [^ ]+ //' | grep -v -E '^systemd\\[|^[^:]+: "
            "([[:space:]]|Traceback|handle:|asyncio:|[A-Za-z_.]+(Error|Exception):)' | tail -n 6"
        )
        self.progress.show(output)

    def mount_media(self) -> None:
        self.running().check(f"mkdir -p {MEDIA} && mount -o ro /dev/vdb {MEDIA}")
        self.progress.say(f"    the release disk is mounted on {MEDIA}")

    def install_and_reboot(self, artifact: Path, timeout: float, what: str) -> None:
        """`otactl install --reboot`, its progress mirrored to the console, then the reboot."""
        guest = self.running()
        boot = guest.boot_id()
        command = f"otactl install {MEDIA}/{artifact.name} --reboot"
        self.progress.say(f"    # {command}")
        mirrored = f"(set -o pipefail; {command} 2>&1 | sed -u 's/^/[otactl] /' | tee /dev/ttyS0)"
        with self.progress.waiting(f"otactl install of {artifact.name}"):
            result = guest.run_into_reboot(mirrored, INSTALL)
        if result is not None and result.status != 0:
            raise DemoError(f"otactl install exited with {result.status}:\n{result.output}")
        with self.progress.waiting(what):
            guest.wait_reboot(boot, timeout)

    def console_text(self) -> str:
        return harness.tail(self.running().console_log, 10_000_000)

    def expect(self, status: dict[str, object], booted: str, artifact: str, error: bool) -> None:
        """Check the status otad reports, and the slot GRUB booted."""
        grub = self.running().booted_slot_parameter()
        problems = []
        if grub != booted or status.get("booted_slot") != booted:
            problems.append(f"slot {booted} should run: GRUB booted {grub!r}")
        if status.get("current_artifact") != artifact:
            problems.append(f"the artifact should be {artifact}")
        if status.get("state") != "idle":
            problems.append("otad should be idle")
        if bool(status.get("last_error")) != error:
            problems.append("otad should report a failure" if error else "no error expected")
        if problems:
            raise DemoError(f"{'; '.join(problems)}; otactl status --json: {status}")


# -- the entry point ---------------------------------------------------------------------


def check_machine() -> None:
    """Refuse early, before the first side effect, what would make a step fail later."""
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (loop devices, mounts, chroot); run ./tools/demo")
    tools = ("qemu-system-x86_64", "qemu-img", "debootstrap", "debugfs", "mkfs.ext4", "sfdisk")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    missing += [str(p) for p in (harness.OVMF_CODE, harness.OVMF_VARS) if not p.is_file()]
    if missing:
        raise DemoError(f"missing: {', '.join(missing)}; ./tools/setup installs them")


def remove_bulk(work: Path) -> int:
    """Remove the disk images from `work` (the logs and artifacts stay); bytes freed."""
    freed = 0
    for path in [*work.glob("*.img"), *work.glob("machine/*.qcow2")]:
        freed += path.stat().st_blocks * 512
        path.unlink()
    return freed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.boot.demo", description=__doc__)
    parser.add_argument("--work", type=Path, help="work directory (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the disk images at the end")
    args = parser.parse_args(argv)
    try:
        check_machine()
    except DemoError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 3

    work = args.work or Path(tempfile.mkdtemp(prefix="otad-demo.", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        print(f"{PROGRAM}: the work directory {work} is not empty", file=sys.stderr)
        return 2
    progress = Progress()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_SayHandler(progress)])
    demo = Demo(work, progress)
    plan = [
        ("build the otad .deb", demo.build_deb),
        ("stock Debian 12 image, otad's dependencies", demo.stock_image),
        ("convert the image with otad-convert", demo.convert),
        ("make releases v2 (new /etc/motd) and v3 (broken)", demo.make_releases),
        ("boot slot A in QEMU, otactl status", demo.boot_slot_a),
        ("update to v2: otactl install --reboot", demo.update_to_v2),
        ("broken v3: trial boots fail, GRUB falls back", demo.broken_v3_falls_back),
    ]
    steps = Steps(progress, total=len(plan))
    progress.say(f"{PROGRAM}: convert a stock Debian 12 image, boot it, update it; in {work}")
    try:
        for title, step in plan:
            steps.run(title, step)
    except Exception as error:  # the demo's edge: every failure ends in the same report
        return _failed(progress, steps, [title for title, _ in plan], work, error)
    except KeyboardInterrupt:
        progress.say(f"\n{PROGRAM}: interrupted; the work directory is kept: {work}")
        return 130
    finally:
        progress.follow(None)
        if demo.guest is not None:
            demo.guest.close()
        progress.close()

    progress.say()
    progress.say(steps.summary())
    progress.say()
    if not args.keep:
        freed = remove_bulk(work)
        progress.say(f"removed the disk images ({freed >> 20} MiB); --keep keeps them")
    progress.say(f"{PROGRAM}: done. Logs, releases and the converter's report: {work}")
    return 0


def _failed(
    progress: Progress, steps: Steps, titles: Sequence[str], work: Path, error: BaseException
) -> int:
    failed = steps.results[-1].title
    for title in titles[len(steps.results) :]:
        steps.results.append(StepResult(title, NOT_RUN, 0.0))
    known = (DemoError, harness.GuestError, subprocess.CalledProcessError, OSError)
    reason = str(error) if isinstance(error, known) else f"{type(error).__name__}: {error}"
    progress.say()
    progress.say(f"{PROGRAM}: {reason}")
    progress.say()
    progress.say(steps.summary())
    progress.say()
    progress.say(f"{PROGRAM}: FAILED at '{failed}'")
    progress.say(f"{PROGRAM}: the work directory is kept for inspection: {work}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
