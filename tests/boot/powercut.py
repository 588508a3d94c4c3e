"""Power cuts: machines whose power is cut at seeded moments of their updates, again and again.

A chain is one machine (one disk overlay, one firmware) that takes a series of cuts. For
each cut a seeded RNG chooses a phase and a point in it:

    install   `otactl install` is streaming a release into the inactive slot
    reboot    the trial boot of a slot: shutdown, firmware, GRUB's counter, early boot
    commit    the trial boot's userspace, around otad-commit after boot-complete.target
    rollback  `otactl rollback --reboot` from a committed release: the request, the
              reboot and the trial boot of the previous slot, up to its commit

The point is a fraction of the phase's window, whose length in seconds is what the
chain last measured for that step (a full install, a boot, a commit), so the delays
follow the machine's speed. The chain brings the machine to the phase as cheaply as it
can (a trial comes from `otactl rollback` when the other slot holds a good release, from
a full install otherwise), waits, and kills QEMU with SIGKILL. Then it powers the same
disk on again and checks what a device must guarantee: a root shell, otad active and
idle (not wedged), the booted slot running a complete release (its marker file, GRUB's
`otad.slot=` and `otactl status` agree, and the release is the one running before the
cut or the one the phase was switching to). A full install of another release (at least
every ACCEPT_EVERY cuts, and a whole update at the end of the chain) proves the machine
still accepts updates.

The power-cut model is QEMU's writeback cache over a qcow2 overlay (Guest.kill): what
the guest flushed survives, writes it did not flush may be lost wholly or in part, in
clusters; the host's page cache survives. It is weaker than a disk that loses power: no
torn sectors, and writes that reached the overlay file survive even unflushed.

The seed fixes the phases and fractions of every chain; where exactly a cut lands also
depends on the machine's speed, so a replay reproduces the plan, not the instruction.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.boot import harness
from tests.convert import stock

log = logging.getLogger(__name__)

PHASES = ("install", "reboot", "commit", "rollback")
MARKER = "/etc/otad-powercut-release"  # the release's version; absent in FIRST_RELEASE
RELEASES = ("v2", "v3")  # installed in turn (v3 to v2 with --allow-downgrade)
MEDIA = "/run/otad-powercut-media"
ACCEPT_EVERY = 4  # cuts at most between two full installs that must succeed
SETTLE = 240.0  # seconds from the shell to otad active and idle (a trial committed)
# Seconds from power-on or reboot to a shell: longer than harness.BOOT_TIMEOUT, since two
# machines booting at once on a loaded 2-core host take four minutes at worst.
BOOT_TIMEOUT = 480.0
INSTALL_TIMEOUT = 900.0
# Windows before the chain has measured its own (seconds, TCG on a shared machine).
INITIAL_WINDOWS = {"install": 180.0, "boot": 80.0, "commit": 30.0}


@dataclass(frozen=True)
class Cut:
    """One planned cut: the chain's `index`-th, in `phase`, at `fraction` of its window."""

    seed: int
    chain: int
    index: int
    phase: str
    fraction: float

    def name(self) -> str:
        return f"seed {self.seed}, chain {self.chain}, cut {self.index} ({self.phase})"


@dataclass(frozen=True)
class CutResult:
    """What a cut did: when the power went and what the machine ran after it."""

    cut: Cut
    firmware: str
    delay: float  # seconds into the phase's window when the power went
    window: float  # seconds
    seconds: float  # wall time of the cut: preparation, the cut, the boot and the checks
    release: str  # what the machine runs after the cut ("" if it did not come back)
    last_error: str  # otad's last error after the cut, such as an interrupted install
    error: str  # "" when the machine survived

    @property
    def survived(self) -> bool:
        return not self.error


@dataclass
class ChainReport:
    firmware: str
    results: list[CutResult] = field(default_factory=list)
    installs: int = 0  # full installs, all of which succeeded
    final_update: str = ""  # the release the closing update committed, "" if not reached
    error: str = ""  # a failure outside any cut (the first boot, the closing update)


def plan(seed: int, chain: int, count: int) -> list[Cut]:
    """The first `count` cuts of chain `chain` under `seed`; a longer plan extends a shorter.

    The phases come in rounds, each of them once per round in a seeded order, so that a
    short run still cuts every phase.
    """
    rng = random.Random(f"otad-powercut/{seed}/{chain}")
    cuts: list[Cut] = []
    while len(cuts) < count:
        for phase in rng.sample(PHASES, len(PHASES)):
            cuts.append(Cut(seed, chain, len(cuts), phase, rng.random()))
    return cuts[:count]


# -- releases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Releases:
    """The chains' releases, and one read-only disk that carries all of them."""

    artifacts: dict[str, Path]
    media: Path


def releases(converted: harness.Converted) -> Releases:
    """RELEASES made from the converted image with MARKER (zstd payloads, the fastest to
    install under TCG), cached beside it."""
    source = inspect.getsource(harness.make_changed_release)
    recipe = hashlib.sha256(source.encode()).hexdigest()[:8]
    final = stock.cache_dir() / f"powercut-{converted.image.parent.name}-{recipe}"
    # The harness's cache helper: a scratch directory renamed into place when complete.
    with harness._building(final) as directory:
        if directory != final:
            for version in RELEASES:
                changes = harness.ReleaseChanges(files={MARKER: f"{version}\n".encode()})
                harness.make_changed_release(converted, directory, version, changes)
            _make_media([directory / f"{v}.mender" for v in RELEASES], directory / "media.img")
    return Releases({v: final / f"{v}.mender" for v in RELEASES}, final / "media.img")


def _make_media(artifacts: Sequence[Path], target: Path) -> None:
    content = target.with_suffix(".content")
    content.mkdir()
    for artifact in artifacts:
        os.link(artifact, content / artifact.name)
    size = sum(a.stat().st_size for a in artifacts) * 11 // 10 + (16 << 20)
    harness._sh("mkfs.ext4", "-q", "-L", "otad-media", "-d", content, target, f"{size // 1024}k")
    shutil.rmtree(content)


# -- a chain ------------------------------------------------------------------------------


class CutFailed(AssertionError):
    """The machine did not survive a cut (or a step between cuts) as it must."""


class Chain:
    """One machine taking the cuts of its plan, one after another, on one disk overlay."""

    def __init__(
        self, converted: harness.Converted, rel: Releases, work: Path, firmware: str, label: str
    ) -> None:
        self.converted = converted
        self.releases = rel
        self.work = work
        self.firmware = firmware
        self.label = label
        self.overlay = work / "disk.qcow2"
        self.windows = dict(INITIAL_WINDOWS)
        self.boots = 0
        self.cuts_since_install = 0
        self.installs = 0
        self.guest: harness.Guest | None = None
        self.running = harness.FIRST_RELEASE
        self.other: str = ""  # the good release in the other slot, "" if none
        self.last_error = ""

    # -- the plan --

    def run(self, cuts: Sequence[Cut], report: ChainReport) -> None:
        """Take `cuts` in order, stopping at the first the machine does not survive."""
        try:
            self._power_on({harness.FIRST_RELEASE})
            for cut in cuts:
                result = self.take(cut)
                report.results.append(result)
                report.installs = self.installs
                if not result.survived:
                    return
            report.final_update = self._update(self._next_release())
            report.installs = self.installs
        except (harness.GuestError, CutFailed) as error:
            report.error = f"{self.label}, outside the cuts: {error}"
        finally:
            self.close()

    def take(self, cut: Cut) -> CutResult:
        started = time.monotonic()
        log.info("%s: %s at %.2f of its window", self.label, cut.name(), cut.fraction)
        window, delay, release, stage = 0.0, 0.0, "", "preparing the phase"
        try:
            if self.cuts_since_install >= ACCEPT_EVERY and cut.phase in ("install", "rollback"):
                self._update(self._next_release())
            expected, window = self._prepare(cut.phase)
            delay = cut.fraction * window
            stage = "starting the phase"
            self._start_phase(cut.phase)
            time.sleep(delay)
            self._guest().kill()
            stage = "after the cut"
            release = self._power_on(expected)
            self.cuts_since_install += 1
            error = ""
        except (harness.GuestError, CutFailed) as failure:
            error = (
                f"{cut.name()} on {self.firmware}, {stage} (cut {delay:.1f} s into a "
                f"{window:.0f} s window; replay: OTAD_POWERCUT_SEED={cut.seed}; logs in "
                f"{self.work}): {failure}"
            )
            log.error("%s", error)
        seconds = time.monotonic() - started
        log.info("%s: %s: %s in %.0f s", self.label, cut.name(), error or release, seconds)
        return CutResult(
            cut, self.firmware, delay, window, seconds, release, self.last_error, error
        )

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None

    # -- the phases --

    def _prepare(self, phase: str) -> tuple[set[str], float]:
        """Bring the machine to the start of `phase`; the releases it may run after a cut
        there, and the phase's window (seconds)."""
        if phase == "install":
            return {self.running, self._next_release()}, self.windows["install"]
        if phase == "rollback":
            if not self.other:
                self._update(self._next_release())
            return {self.running, self.other}, self.windows["boot"] + self.windows["commit"]
        target = self._start_trial()
        if phase == "reboot":
            return {self.running, target}, self.windows["boot"]
        self._reboot()  # the commit phase starts when the trial boot's shell answers
        return {self.running, target}, self.windows["commit"]

    def _start_phase(self, phase: str) -> None:
        guest = self._guest()
        if phase == "install":
            version = self._next_release()
            self._background(f"otactl install {MEDIA}/{version}.mender --allow-downgrade")
        elif phase == "rollback":
            self._background("otactl rollback --reboot")
        elif phase == "reboot":
            guest.run_into_reboot("systemctl reboot", 60)
        # commit: the trial boot is under way already

    def _background(self, command: str) -> None:
        """Start `command` as a transient service, so that the shell answers at once."""
        self._guest().check(f"systemd-run --quiet --collect {command}")

    def _start_trial(self) -> str:
        """Ask for a trial boot, the cheapest way; the release it will boot."""
        if self.other and self.cuts_since_install < ACCEPT_EVERY:
            self._guest().check("otactl rollback")
            return self.other
        version = self._next_release()
        self._install(version)
        return version

    def _install(self, version: str) -> None:
        """A full install of `version`, which must succeed: the machine accepts updates."""
        guest = self._guest()
        started = time.monotonic()
        output = guest.check(
            f"otactl install {MEDIA}/{version}.mender --allow-downgrade", INSTALL_TIMEOUT
        )
        self.windows["install"] = time.monotonic() - started
        state = guest.status()["state"]
        if state != "reboot-required":
            last = output.replace("\x1b[K", "\n").strip().splitlines()[-1:]
            raise CutFailed(f"{self.label}: after installing {version}, state {state}: {last}")
        self.installs += 1
        self.cuts_since_install = 0

    def _reboot(self) -> None:
        """Reboot (into a requested trial) and wait for the new boot's shell."""
        guest = self._guest()
        boot = guest.boot_id()
        started = time.monotonic()
        guest.run_into_reboot("systemctl reboot", 60)
        guest.wait_reboot(boot, BOOT_TIMEOUT)
        self.windows["boot"] = time.monotonic() - started

    def _update(self, version: str) -> str:
        """Install `version`, boot it and see it committed; the release then running."""
        self._install(version)
        previous = self.running
        self._reboot()
        self._check(self._guest(), {version})
        self.cuts_since_install = 0
        if self.other != previous:
            raise CutFailed(f"{self.label}: {previous} is not kept in the other slot")
        return self.running

    def _next_release(self) -> str:
        return RELEASES[1] if self.running == RELEASES[0] else RELEASES[0]

    # -- after the cut --

    def _power_on(self, expected: set[str]) -> str:
        """Boot the chain's disk; check the machine runs one of `expected`; return it."""
        self.close()
        self.boots += 1
        work = self.work / f"boot-{self.boots:03d}"
        work.mkdir()
        guest = harness.Guest(
            self.converted.image, work, self.releases.media, self.firmware, self.overlay
        )
        self.guest = guest
        started = time.monotonic()
        guest.wait_shell(BOOT_TIMEOUT)
        self.windows["boot"] = time.monotonic() - started
        return self._check(guest, expected)

    def _check(self, guest: harness.Guest, expected: set[str]) -> str:
        """otad active and idle, the booted slot whole and running one of `expected`."""
        started = time.monotonic()
        guest.wait_until("systemctl is-active otad.service", SETTLE, "otad.service active")
        guest.wait_until('otactl status --json | grep -q \'"state": "idle"\'', SETTLE, "otad idle")
        # The longest wait seen is a trial's commit; a boot of a good slot is idle sooner.
        settled = time.monotonic() - started + 5
        self.windows["commit"] = max(self.windows["commit"], settled)
        status = guest.status()
        slot = guest.booted_slot_parameter()
        marker = guest.run(f"cat {MARKER}")
        release = marker.output.strip() if marker.status == 0 else harness.FIRST_RELEASE
        slots = json.loads(guest.check("otactl slots --json"))
        problems = []
        if status["booted_slot"] != slot:
            problems.append(f"GRUB booted slot {slot!r}, otad says {status['booted_slot']!r}")
        if status["current_artifact"] != release:
            problems.append(f"slot {slot} holds {release}, otad says {status['current_artifact']}")
        if release not in expected:
            problems.append(f"slot {slot} runs {release}, expected one of {sorted(expected)}")
        if problems:
            raise guest.failure("; ".join(problems) + f"\nstatus: {status}\nslots: {slots}")

        guest.check(f"mkdir -p {MEDIA} && mount -o ro /dev/vdb {MEDIA}")
        self.running = release
        self.last_error = str(status["last_error"])
        others = [s for s in slots if s["slot"] != slot and s["status"] == "good"]
        self.other = str(others[0]["artifact"]) if others and others[0]["artifact"] else ""
        log.info(
            "%s: slot %s runs %s (other slot: %s); last error: %s",
            self.label, slot, release, self.other or "none", status["last_error"] or "none",
        )  # fmt: skip
        return release

    def _guest(self) -> harness.Guest:
        if self.guest is None:
            raise CutFailed(f"{self.label}: no machine running")
        return self.guest


# -- several chains -------------------------------------------------------------------------


def run_chains(
    converted: harness.Converted,
    work: Path,
    seed: int,
    cuts: int,
    chains: int = 2,
    firmwares: Sequence[str] = harness.FIRMWARES,
    restart: bool = False,
) -> list[ChainReport]:
    """`cuts` cuts shared among `chains` machines running at once, firmwares in turn.

    With `restart`, a chain that failed is followed by a fresh machine (a new chain
    number) that takes the cuts it had left, so the count reaches `cuts` (the bench);
    otherwise a failed chain ends there (the test).
    """
    rel = releases(converted)
    shares = [cuts // chains + (1 if n < cuts % chains else 0) for n in range(chains)]
    numbers = iter(range(1_000_000))
    lock = threading.Lock()
    reports: list[ChainReport] = []

    def drive(share: int) -> None:
        while share > 0:
            with lock:
                number = next(numbers)
            firmware = firmwares[number % len(firmwares)]
            report = ChainReport(firmware)
            with lock:
                reports.append(report)
            directory = work / f"chain-{number}"
            directory.mkdir()
            label = f"chain {number} ({firmware})"
            Chain(converted, rel, directory, firmware, label).run(plan(seed, number, share), report)
            share -= len(report.results)
            if not restart or (report.error and not report.results):
                return

    with ThreadPoolExecutor(max_workers=chains) as pool:
        for future in [pool.submit(drive, share) for share in shares if share]:
            future.result()
    return reports


def summary(reports: Sequence[ChainReport], seed: int, seconds: float) -> str:
    """`survived N of M cuts`, per phase and per firmware, and the time per cut."""
    results = [r for report in reports for r in report.results]
    survived = sum(r.survived for r in results)
    lines = [f"survived {survived} of {len(results)} cuts (seed {seed}, {seconds:.0f} s)"]
    for label in ("phase", "firmware"):
        groups: dict[str, list[CutResult]] = {}
        for result in results:
            name = result.cut.phase if label == "phase" else result.firmware
            groups.setdefault(name, []).append(result)
        for name, group in sorted(groups.items()):
            ok = sum(r.survived for r in group)
            lines.append(f"  {label} {name:9} survived {ok} of {len(group)}")
    if results:
        times = sorted(r.seconds for r in results)
        lines.append(
            f"  time per cut: median {times[len(times) // 2]:.0f} s, "
            f"mean {sum(times) / len(times):.0f} s, max {times[-1]:.0f} s"
        )
    installs = sum(report.installs for report in reports)
    finals = sum(bool(report.final_update) for report in reports)
    lines.append(
        f"  full installs (each must succeed): {installs}; chains ending with a committed update: "
        f"{finals} of {len(reports)}"
    )
    lines += [f"  FAILED {r.error}" for r in results if not r.survived]
    lines += [f"  FAILED {report.error}" for report in reports if report.error]
    return "\n".join(lines)
