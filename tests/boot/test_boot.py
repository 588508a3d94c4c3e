"""The converted image booted in QEMU (UEFI, TCG): first boot, a good update, a broken one.

Each test boots its own copy-on-write overlay of the cached converted image; a boot
takes 40 to 60 s under TCG, so every wait has a generous but bounded deadline.
"""

from __future__ import annotations

import pytest

from tests.boot import harness
from tests.boot.conftest import GuestFactory

pytestmark = [pytest.mark.boot, pytest.mark.slow]

SETTLE = 180.0  # seconds for otad.service (and otad-commit) after the shell is up


def wait_for_otad(guest: harness.Guest) -> dict[str, object]:
    """otactl status once otad.service is active and otad-commit.service has run."""
    guest.wait_until("systemctl is-active otad.service", SETTLE, "otad.service active")
    guest.wait_until(
        "systemctl show -P ActiveState otad-commit.service | grep -qx active",
        SETTLE,
        "otad-commit.service done",
    )
    return guest.status()


def test_the_converted_image_boots_slot_a(boot: GuestFactory) -> None:
    guest = boot()
    guest.wait_shell()
    guest.run("systemctl is-system-running --wait", SETTLE)  # settled, whatever the verdict

    active = guest.run("systemctl is-active otad.service")
    assert active.output.strip() == "active", guest.failure(f"otad.service: {active.output}")
    status = wait_for_otad(guest)
    assert guest.booted_slot_parameter() == "a", guest.failure("GRUB did not boot slot a")
    assert status["booted_slot"] == "a", guest.failure(f"status: {status}")
    assert status["state"] == "idle", guest.failure(f"status: {status}")
    assert status["current_artifact"] == harness.FIRST_RELEASE, guest.failure(f"{status}")
    assert status["last_error"] == "", guest.failure(f"status: {status}")
