"""The converted image booted in QEMU (UEFI, TCG): what goes wrong, and what a person asks.

A release that boots but fails its health check, a release whose kernel freezes and one
whose initramfs hangs (both reset by the hardware watchdog, which the image arms in its
initramfs), a manual rollback after a commit, and artifacts that must be refused. Each
test boots its own overlay of the cached converted image once, and every wait has a
deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from convert.watchdog import MIN_TIMEOUT
from tests.boot import harness
from tests.boot.conftest import GuestFactory
from tests.boot.test_boot import (
    INSTALL,
    MEDIA,
    boot_and_install,
    install_and_reboot,
    mount_media,
    wait_for_otad,
)

pytestmark = [pytest.mark.boot, pytest.mark.slow]

HEALTH_TIMEOUT = 150  # seconds; the releases' otad.conf shortens the default 300
GATE = HEALTH_TIMEOUT + 240.0  # seconds until the health gate's reboot has come back
ENV_FILES = "/boot/efi/EFI/otad"  # the GRUB environment blocks otad writes, on the ESP

UNIT_DIR = "/etc/systemd/system"
BROKEN_APP = b"""#!/bin/sh
echo 'product-app: cannot read /etc/product/app.conf' >&2
exit 1
"""
APP_UNIT = b"""[Unit]
Description=The product's application

[Service]
Type=exec
ExecStart=/usr/local/bin/product-app

[Install]
WantedBy=multi-user.target
"""
# The shipped example check, enabled and told that the application must run.
HEALTH_SETTINGS = b'OTAD_HEALTH_UNITS="product-app.service"\nOTAD_HEALTH_WAIT=60\n'
# The image's initramfs arms the watchdog and systemd takes it over with the image's
# RuntimeWatchdogSec; a product may shorten the runtime timeout, as this release does so
# that each of its frozen trial boots is reset in 20 s rather than the image's 120.
RUNTIME_WATCHDOG = b"[Manager]\nRuntimeWatchdogSec=20s\n"
# Stands for a kernel that locks up during the boot: a panic after which the kernel
# waits forever (kernel.panic=0), before any getty or otad runs. systemd opened the
# watchdog before starting any unit; an inactive one fails fast instead of hanging.
FREEZE = b"""#!/bin/sh
state=/sys/class/watchdog/watchdog0/state
say() { echo "product-freeze: $*" >/dev/kmsg; }  # the console, before the kernel stops
if [ "$(cat $state 2>/dev/null)" != active ]; then
    say 'no armed watchdog, not freezing'
    exit 1
fi
say "watchdog $(cat /sys/class/watchdog/watchdog0/identity) armed," \
    "timeout $(cat /sys/class/watchdog/watchdog0/timeout) s; the kernel freezes now"
echo 0 >/proc/sys/kernel/panic
echo c >/proc/sysrq-trigger
"""
FREEZE_UNIT = b"""[Unit]
Description=A kernel lockup during the boot (boot test)
DefaultDependencies=no
After=systemd-udev-trigger.service systemd-modules-load.service
Before=sysinit.target

[Service]
Type=oneshot
ExecStart=/usr/local/bin/product-freeze

[Install]
WantedBy=sysinit.target
"""


def with_health_timeout(conf: bytes) -> bytes:
    """otad.conf with health_timeout set, a top-level key (before the first table)."""
    text = conf.decode()
    first_table = text.index("\n[")
    return f"{text[:first_table]}\nhealth_timeout = {HEALTH_TIMEOUT}{text[first_table:]}".encode()


def slots(guest: harness.Guest) -> list[dict[str, object]]:
    value = json.loads(guest.check("otactl slots --json"))
    assert isinstance(value, list), guest.failure(f"otactl slots --json printed {value!r}")
    return value


def slot_status(guest: harness.Guest, slot: str) -> object:
    (found,) = [s for s in slots(guest) if s["slot"] == slot]
    return found["status"]


def assert_fell_back(guest: harness.Guest, status: dict[str, object]) -> None:
    """GRUB gave up on slot b's trial and booted slot a, and otad says so."""
    assert guest.booted_slot_parameter() == "a", guest.failure("GRUB did not fall back")
    assert status["booted_slot"] == "a", guest.failure(f"status: {status}")
    assert status["current_artifact"] == harness.FIRST_RELEASE, guest.failure(f"{status}")
    assert status["state"] == "idle", guest.failure(f"status: {status}")
    assert "trial boot of slot b failed" in str(status["last_error"]), guest.failure(
        f"status: {status}"
    )
    assert slot_status(guest, "b") == "bad", guest.failure(f"slots: {slots(guest)}")


def test_a_release_failing_its_health_check_is_rolled_back(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path
) -> None:
    changes = harness.ReleaseChanges(
        files={
            "/usr/local/bin/product-app": BROKEN_APP,
            f"{UNIT_DIR}/product-app.service": APP_UNIT,
            "/etc/default/otad-health-example": HEALTH_SETTINGS,
        },
        edits={"/etc/otad/otad.conf": with_health_timeout},
        directories=[f"{UNIT_DIR}/boot-complete.target.requires"],
        links={
            f"{UNIT_DIR}/boot-complete.target.requires/otad-health-example.service":
                "/lib/systemd/system/otad-health-example.service",
            f"{UNIT_DIR}/multi-user.target.wants/product-app.service":
                f"{UNIT_DIR}/product-app.service",
        },
    )  # fmt: skip
    release = harness.make_changed_release(converted, tmp_path, "v2", changes)
    media = tmp_path / "media.img"
    harness.make_media(release, media)
    guest = boot(media)
    guest.wait_shell()
    wait_for_otad(guest)
    mount_media(guest)

    install_and_reboot(guest, release)
    trial_boot = guest.boot_id()

    # The trial boot of slot b: the check fails, so nothing commits it.
    assert guest.booted_slot_parameter() == "b", guest.failure("GRUB did not boot slot b")
    guest.wait_until(
        "systemctl is-failed otad-health-example.service", 180, "the health check failed"
    )
    check_log = guest.check("journalctl -b -o cat -u otad-health-example.service")
    assert "product-app.service has failed" in check_log, guest.failure(check_log)
    status = guest.status()
    assert status["booted_slot"] == "b", guest.failure(f"status: {status}")
    assert status["state"] == "trial", guest.failure(f"committed anyway: {status}")
    commit = guest.check("systemctl show -P ActiveState otad-commit.service").strip()
    assert commit != "active", guest.failure(f"otad-commit.service is {commit}")

    # When health_timeout expires, otad rolls back and reboots into slot a.
    guest.wait_reboot(trial_boot, GATE)
    status = wait_for_otad(guest)

    assert guest.booted_slot_parameter() == "a", guest.failure("not back on slot a")
    assert status["booted_slot"] == "a", guest.failure(f"status: {status}")
    assert status["current_artifact"] == harness.FIRST_RELEASE, guest.failure(f"{status}")
    assert status["state"] == "idle", guest.failure(f"a new install would be refused: {status}")
    error = str(status["last_error"])
    assert "slot b" in error, guest.failure(f"the failed update is not reported: {status}")
    assert f"{HEALTH_TIMEOUT} s" in error, guest.failure(f"the reason is not reported: {status}")
    assert slot_status(guest, "b") == "bad", guest.failure(f"slots: {slots(guest)}")
    assert guest.run("test -e /usr/local/bin/product-app").status != 0


def test_a_release_whose_kernel_freezes_is_reset_by_the_watchdog(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path
) -> None:
    changes = harness.ReleaseChanges(
        files={
            # After the image's 50-otad-watchdog.conf, so it overrides its timeout.
            "/etc/systemd/system.conf.d/90-watchdog.conf": RUNTIME_WATCHDOG,
            "/usr/local/bin/product-freeze": FREEZE,
            f"{UNIT_DIR}/product-freeze.service": FREEZE_UNIT,
        },
        links={
            f"{UNIT_DIR}/sysinit.target.wants/product-freeze.service":
                f"{UNIT_DIR}/product-freeze.service",
        },
    )  # fmt: skip
    release = harness.make_changed_release(converted, tmp_path, "v2", changes)
    guest, status = boot_and_install(
        boot, release, tmp_path
    )  # comes back only once GRUB has given up on slot b

    console = harness.tail(guest.console_log, 100_000)
    assert "no armed watchdog" not in console, guest.failure("the watchdog was not armed")
    assert ARMED.search(console), guest.failure("the initramfs armed no watchdog")
    freezes = [m.start() for m in re.finditer("the kernel freezes now", console)]
    assert freezes, guest.failure("slot b's boot never reached the freeze")
    # systemd took the watchdog over from the initramfs with the release's timeout.
    assert "timeout 20 s; the kernel freezes now" in console, guest.failure("not systemd's")
    after = console[freezes[0] :]
    assert "Kernel panic - not syncing" in after, guest.failure("the kernel did not stop")
    # No panic reboot and no orderly restart: only the watchdog can have reset it.
    assert "Rebooting in" not in after, guest.failure("the kernel rebooted by itself")
    assert "reboot: Restarting system" not in after, guest.failure("an orderly reboot")
    assert_fell_back(guest, status)


# v2's initramfs, after init-top (where the image arms the watchdog), before the root is
# mounted: an init-premount script list that runs only a script that never returns.
HANG_ORDER = b"""/scripts/init-premount/product-hang "$@"
[ -e /conf/param.conf ] && . /conf/param.conf
"""
HANG = b"""#!/bin/sh
echo "product-hang: v2's initramfs hangs before the root is mounted" >/dev/kmsg
while :; do sleep 60; done
"""
ARMED = re.compile(r"otad-watchdog: armed /dev/watchdog0 \(.*\), timeout (\d+) s")
# v2 also carries its own, shorter watchdog timeout (the least otad-convert accepts), as a
# release may: what the image's hook wrote into the initramfs, written again. It makes
# each of the three hung trial boots last about 45 s instead of the default's 135.
HANG_TIMEOUT = MIN_TIMEOUT
HANG_SETTINGS = {
    "conf/otad-watchdog.conf": f"OTAD_WATCHDOG_SEC={HANG_TIMEOUT}\n".encode(),
    "etc/modprobe.d/otad-watchdog.conf": f"options i6300esb heartbeat={HANG_TIMEOUT}\n".encode(),
}


def hang_archive(work: Path) -> bytes:
    """An uncompressed newc cpio archive that, appended to an initramfs, replaces its
    init-premount scripts with HANG and its watchdog settings with HANG_SETTINGS (a
    later archive's files replace earlier ones)."""
    tree = work / "hang"
    scripts = tree / "scripts/init-premount"
    scripts.mkdir(parents=True)
    (scripts / "ORDER").write_bytes(HANG_ORDER)
    (scripts / "product-hang").write_bytes(HANG)
    (scripts / "product-hang").chmod(0o755)
    names = "scripts\nscripts/init-premount\nscripts/init-premount/ORDER\n"
    names += "scripts/init-premount/product-hang\n"
    for name, content in HANG_SETTINGS.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(content)
    names += "conf\nconf/otad-watchdog.conf\netc\netc/modprobe.d\n"
    names += "etc/modprobe.d/otad-watchdog.conf\n"
    return subprocess.run(
        ["cpio", "--create", "--format=newc", "--owner=0:0", "--quiet"],
        cwd=tree, input=names.encode(), capture_output=True, check=True,
    ).stdout  # fmt: skip


def with_appended(archive: bytes) -> Callable[[bytes], bytes]:
    """An edit that appends `archive` to an initramfs, at the 4-byte boundary the kernel
    expects a following archive's header on (it skips the zeros before it)."""
    return lambda initramfs: initramfs + b"\0" * (-len(initramfs) % 4) + archive


def initramfs_images(image: Path) -> list[str]:
    """The /boot/initrd.img-* files of slot A in the converted image."""
    part = harness.partition_of(image, harness.SLOT_A_PARTITION)
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /boot", f"{image}?offset={part.start}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = [entry.split("/")[5] for entry in listing.splitlines() if entry.count("/") >= 6]
    return [f"/boot/{name}" for name in names if name.startswith("initrd.img-")]


def boots(console: str) -> list[str]:
    """The console log cut into one piece per kernel boot, each from its command line to
    the firmware's or GRUB's first words of the next power-on (or the end)."""
    starts = [m.start() for m in re.finditer(r"\] Command line: ", console)]
    pieces = [console[a:b] for a, b in zip(starts, [*starts[1:], len(console)], strict=True)]
    return [re.split(r"BdsDxe:|Welcome to GRUB!", piece, maxsplit=1)[0] for piece in pieces]


def test_a_release_that_hangs_in_its_initramfs_is_reset_by_the_watchdog(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path
) -> None:
    images = initramfs_images(converted.image)
    assert images, f"slot A of {converted.image} has no /boot/initrd.img-*"
    hang = hang_archive(tmp_path)
    changes = harness.ReleaseChanges(edits={image: with_appended(hang) for image in images})
    release = harness.make_changed_release(converted, tmp_path, "v2", changes)
    guest, status = boot_and_install(
        boot, release, tmp_path
    )  # comes back only once GRUB has given up on slot b

    console = harness.tail(guest.console_log, 100_000)
    pieces = boots(console)
    trials = [piece for piece in pieces if " otad.slot=b" in piece.splitlines()[0]]
    assert trials, guest.failure("GRUB never booted slot b")
    for number, trial in enumerate(trials, 1):
        armed = ARMED.search(trial)
        assert armed, guest.failure(f"trial boot {number}: the initramfs armed no watchdog")
        assert int(armed[1]) == HANG_TIMEOUT, guest.failure(f"trial boot {number}: {armed[0]}")
        assert "watchdog did not stop!" in trial, guest.failure(f"trial boot {number}: stopped")
        hung = trial.find("product-hang: v2's initramfs hangs")
        assert hung > armed.start(), guest.failure(f"trial boot {number}: v2 did not hang")
        # Nothing after the hang: no root mounted, no systemd, no panic, no orderly
        # restart. Only the watchdog can have reset the machine.
        after = trial[hung:]
        for sign in ("EXT4-fs (", "systemd[1]", "Kernel panic", "reboot: Restarting system"):
            assert sign not in after, guest.failure(f"trial boot {number} went on: {sign!r}")
    # One power cycle for the reboot into the trial, one per watchdog reset.
    assert guest.power_cycles >= len(trials) + 1, guest.failure(f"{guest.power_cycles} resets")
    back = pieces[-1]
    assert " otad.slot=a" in back.splitlines()[0], guest.failure("the last boot is not slot a")
    assert ARMED.search(back), guest.failure("slot a's initramfs armed no watchdog")
    assert "systemd[1]: Using hardware watchdog" in back, guest.failure("systemd took no watchdog")
    assert_fell_back(guest, status)


def test_a_committed_release_is_rolled_back_on_request(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path
) -> None:
    changes = harness.ReleaseChanges(files={"/etc/otad-release-2": b"release 2\n"})
    release = harness.make_changed_release(converted, tmp_path, "v2", changes)
    guest, status = boot_and_install(boot, release, tmp_path)
    assert (status["booted_slot"], status["state"]) == ("b", "idle"), guest.failure(f"{status}")
    assert status["current_artifact"] == "v2", guest.failure(f"status: {status}")

    answer = guest.check("otactl rollback")

    assert "slot a boots next" in answer, guest.failure(answer)
    status = guest.status()
    assert status["state"] == "reboot-required", guest.failure(f"status: {status}")
    assert status["next_slot"] == "a", guest.failure(f"status: {status}")

    boot_id = guest.boot_id()
    guest.run_into_reboot("systemctl reboot", 60)
    guest.wait_reboot(boot_id, harness.BOOT_TIMEOUT)
    status = wait_for_otad(guest)

    assert guest.booted_slot_parameter() == "a", guest.failure("GRUB did not boot slot a")
    assert status["booted_slot"] == "a", guest.failure(f"status: {status}")
    assert status["state"] == "idle", guest.failure(f"slot a not committed: {status}")
    assert status["current_artifact"] == harness.FIRST_RELEASE, guest.failure(f"{status}")
    assert status["last_error"] == "", guest.failure(f"status: {status}")
    assert guest.run("test -e /etc/otad-release-2").status != 0, guest.failure("v2 runs")
    listed = {str(s["slot"]): s for s in slots(guest)}
    assert listed["a"]["status"] == "good", guest.failure(f"slots: {listed}")
    assert listed["b"]["artifact"] == "v2", guest.failure(f"slots: {listed}")


# name: (version, device type, signed, what the refusal must say)
REFUSED = {
    "unsigned": ("v9", harness.DEVICE_TYPE, False, "signature"),
    "other-device": ("v9", "raspberrypi4", True, "raspberrypi4"),
    "downgrade": ("v0.9", harness.DEVICE_TYPE, True, "older than the running v1"),
}
TAMPER_MARKER = b"otad boot test: the payload of a signed artifact, tampered with " * 64


def environment_listing(guest: harness.Guest) -> str:
    """The checksum of every file of the GRUB environment on the ESP, and what
    grub-editenv reads from each (GRUB's own view of the variables)."""
    return guest.check(
        f"cd {ENV_FILES} && find . -type f | sort | xargs sha256sum && "
        'for f in $(find . -type f | sort); do echo "$f:"; grub-editenv $f list; done'
    )


def test_bad_artifacts_are_refused_and_the_device_is_untouched(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path
) -> None:
    artifacts = {
        name: harness.make_small_artifact(
            tmp_path,
            name,
            version=version,
            device_type=device,
            key=converted.key if signed else None,
        )  # fmt: skip
        for name, (version, device, signed, _) in REFUSED.items()
    }
    signed = harness.make_small_artifact(
        tmp_path, "signed", version="v9", key=converted.key, marker=TAMPER_MARKER
    )
    artifacts["tampered"] = tmp_path / "tampered.mender"
    harness.tamper(signed, TAMPER_MARKER, artifacts["tampered"])
    media = tmp_path / "media.img"
    harness.make_media_of(list(artifacts.values()), media)
    guest = boot(media)
    guest.wait_shell()
    before = wait_for_otad(guest)
    mount_media(guest)
    boot_id = guest.boot_id()
    slots_before = slots(guest)
    environment_before = environment_listing(guest)

    answers = {
        name: guest.run(f"otactl install {MEDIA}/{artifact.name}", INSTALL)
        for name, artifact in artifacts.items()
    }

    for name, (_, _, _, reason) in REFUSED.items():
        answer = answers[name]
        assert answer.status == 1, guest.failure(f"{name}: exit {answer.status}: {answer.output}")
        assert reason in answer.output, guest.failure(f"{name}: {answer.output}")
        assert len(answer.output.strip().splitlines()) == 1, guest.failure(answer.output)
    tampered = answers["tampered"]
    assert tampered.status == 1, guest.failure(f"tampered: {tampered}")
    assert (
        "checksum" in tampered.output.lower() or "sha-256" in tampered.output.lower()
    ), guest.failure(f"tampered: {tampered.output}")
    assert guest.boot_id() == boot_id, guest.failure("the guest rebooted")
    assert guest.booted_slot_parameter() == "a"
    assert environment_listing(guest) == environment_before, guest.failure(
        f"the bootloader environment changed; before:\n{environment_before}"
    )
    after = guest.status()
    for key in ("booted_slot", "next_slot", "current_artifact", "state"):
        assert after[key] == before[key], guest.failure(f"{key}: {before} -> {after}")
    assert slots(guest) == slots_before, guest.failure(f"slots were {slots_before}")
