"""The converted image booted in QEMU (TCG): first boot, a good update, a broken one.

Every scenario runs under both firmware paths of the converted image: UEFI (OVMF loads
GRUB from the ESP) and legacy BIOS (SeaBIOS loads the GRUB core otad-convert embedded in
the BIOS boot partition). Each test boots its own copy-on-write overlay of the cached
converted image; a boot takes 40 to 90 s under TCG, so every wait has a generous but
bounded deadline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.boot import harness
from tests.boot.conftest import GuestFactory

pytestmark = [pytest.mark.boot, pytest.mark.slow]

SETTLE = 180.0  # seconds for otad.service (and otad-commit) after the shell is up
INSTALL = 900.0  # seconds for `otactl install` of a release under TCG, reboot included
FALLBACK = 900.0  # seconds for the failed trial boots and the boot of the previous slot
MEDIA = "/run/otad-test-media"
BROKEN_INIT = b"#!/bin/sh\necho 'otad boot test: this release cannot boot'\nexit 1\n"


@pytest.fixture(params=harness.FIRMWARES)
def firmware(request: pytest.FixtureRequest) -> str:
    """Each scenario under each firmware path: test ids end in [uefi] or [bios]."""
    value: str = request.param
    return value


def check_firmware(guest: harness.Guest) -> None:
    """The guest was started by the firmware it was asked for (Linux shows EFI in sysfs)."""
    efi = guest.run("test -d /sys/firmware/efi").status == 0
    assert efi == (guest.firmware == "uefi"), guest.failure(f"not booted by {guest.firmware}")


def wait_for_otad(guest: harness.Guest) -> dict[str, object]:
    """otactl status once otad.service is active and otad-commit.service has run."""
    guest.wait_until("systemctl is-active otad.service", SETTLE, "otad.service active")
    guest.wait_until(
        "systemctl show -P ActiveState otad-commit.service | grep -qx active",
        SETTLE,
        "otad-commit.service done",
    )
    return guest.status()


def mount_media(guest: harness.Guest) -> None:
    guest.check(f"mkdir -p {MEDIA} && mount -o ro /dev/vdb {MEDIA}")


def install_and_reboot(guest: harness.Guest, artifact: Path) -> None:
    """`otactl install --reboot` of `artifact` from the media disk, into the next boot."""
    boot = guest.boot_id()
    result = guest.run_into_reboot(f"otactl install {MEDIA}/{artifact.name} --reboot", INSTALL)
    if result is not None and result.status != 0:
        raise guest.failure(f"otactl install exited with {result.status}:\n{result.output}")
    guest.wait_reboot(boot, INSTALL)


def boot_and_install(
    boot: GuestFactory, release: Path, work: Path, firmware: str = "uefi"
) -> tuple[harness.Guest, dict[str, object]]:
    """Boot slot A with `release` on a media disk, install it with `otactl install
    --reboot` and wait for otad after the reboot; the guest and `otactl status`. For a
    release that cannot boot, that is once GRUB has given up on slot b."""
    media = work / "media.img"
    harness.make_media(release, media)
    guest = boot(media, firmware)
    guest.wait_shell()
    wait_for_otad(guest)
    mount_media(guest)
    install_and_reboot(guest, release)
    return guest, wait_for_otad(guest)


def test_the_converted_image_boots_slot_a(boot: GuestFactory, firmware: str) -> None:
    guest = boot(firmware=firmware)
    guest.wait_shell()

    status = wait_for_otad(guest)

    check_firmware(guest)
    assert guest.booted_slot_parameter() == "a", guest.failure("GRUB did not boot slot a")
    assert status["booted_slot"] == "a", guest.failure(f"status: {status}")
    assert status["state"] == "idle", guest.failure(f"status: {status}")
    assert status["current_artifact"] == harness.FIRST_RELEASE, guest.failure(f"{status}")
    assert status["last_error"] == "", guest.failure(f"status: {status}")


def test_a_good_update_boots_slot_b_and_is_committed(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path, firmware: str
) -> None:
    release = harness.make_release(
        converted, tmp_path, "v2", {"/etc/otad-release-2": b"release 2\n"}
    )
    guest, status = boot_and_install(boot, release, tmp_path, firmware)

    check_firmware(guest)
    assert guest.booted_slot_parameter() == "b", guest.failure("GRUB did not boot slot b")
    assert status["booted_slot"] == "b", guest.failure(f"status: {status}")
    assert status["state"] == "idle", guest.failure(f"not committed: {status}")
    assert status["current_artifact"] == "v2", guest.failure(f"status: {status}")
    assert status["last_error"] == "", guest.failure(f"status: {status}")
    assert guest.check("cat /etc/otad-release-2") == "release 2\n"

    boot_id = guest.boot_id()
    guest.run_into_reboot("systemctl reboot", 60)
    guest.wait_reboot(boot_id, harness.BOOT_TIMEOUT)
    status = wait_for_otad(guest)

    assert guest.booted_slot_parameter() == "b", guest.failure("the commit did not hold")
    assert status["booted_slot"] == "b", guest.failure(f"status: {status}")
    assert status["state"] == "idle", guest.failure(f"status: {status}")
    assert guest.check("cat /etc/otad-release-2") == "release 2\n"


def test_a_release_that_cannot_boot_falls_back_to_slot_a(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path, firmware: str
) -> None:
    release = harness.make_release(converted, tmp_path, "v3", {"/usr/sbin/init": BROKEN_INIT})
    guest, status = boot_and_install(
        boot, release, tmp_path, firmware
    )  # comes back only once GRUB has given up on slot b

    console = harness.tail(guest.console_log, 100_000)
    assert "this release cannot boot" in console, guest.failure("slot b's init never ran")
    assert guest.booted_slot_parameter() == "a", guest.failure("GRUB did not fall back")
    assert status["booted_slot"] == "a", guest.failure(f"status: {status}")
    assert status["current_artifact"] == harness.FIRST_RELEASE, guest.failure(f"{status}")
    assert status["last_error"] != "", guest.failure(f"no failure reported: {status}")
