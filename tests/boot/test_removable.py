"""Updates from a USB stick, hot-plugged into the running converted image (UEFI, TCG).

The stick is what a person would prepare: an MBR and one FAT32 partition holding the
signed artifact. QEMU plugs it into an xHCI controller while the guest runs, so the
guest's kernel, udev and otad see a USB mass-storage disk arrive, as on a device. The
converted image ships with removable media disabled (otad.conf [removable]); the test
turns it on as a person would, in its default "announce" mode: otad verifies the
artifact and offers it, `otactl offers` lists it, `otactl install-offered` installs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.boot import harness
from tests.boot.conftest import GuestFactory
from tests.boot.test_boot import INSTALL, wait_for_otad

pytestmark = [pytest.mark.boot, pytest.mark.slow]

OFFER = 600.0  # seconds from the plug to the offer: udev, mount, a full verification
ENABLE = "printf '\\n[removable]\\nenabled = true\\n' >> /etc/otad/otad.conf"


def test_an_artifact_on_a_hot_plugged_usb_stick_is_offered_and_installed(
    converted: harness.Converted, boot: GuestFactory, tmp_path: Path
) -> None:
    release = harness.make_changed_release(
        converted,
        tmp_path,
        "v2",
        harness.ReleaseChanges(files={"/etc/otad-release-2": b"from a USB stick\n"}),
    )
    stick = tmp_path / "stick.img"
    harness.make_usb_stick(release, stick)
    guest = boot(usb=True)
    guest.wait_shell()
    wait_for_otad(guest)
    assert json.loads(guest.check("otactl offers --json")) == [], "an offer before any stick"
    # otad.service is Type=notify and says READY after its media watcher has started, so
    # the restart returns once otad is watching; the pause covers the watcher thread
    # opening its event socket.
    guest.check(f"{ENABLE} && systemctl restart otad.service && sleep 3")

    guest.plug_usb_stick(stick)

    output = guest.wait_until(
        "otactl offers --json | grep -q v2 && otactl offers --json", OFFER, "the stick's offer"
    )
    offers = json.loads(output)
    assert len(offers) == 1, guest.failure(f"offers: {offers}")
    medium = offers[0]["medium"]
    assert offers[0]["name"] == "v2", guest.failure(f"offers: {offers}")
    # The offer's disk is the stick: a USB disk, as the kernel sees it.
    assert "usb" in guest.check(f"readlink -f /sys/class/block/{Path(medium).name}"), guest.failure(
        f"{medium} is not a USB disk"
    )

    boot_id = guest.boot_id()
    result = guest.run_into_reboot(f"otactl install-offered {medium} --reboot", INSTALL)
    if result is not None and result.status != 0:
        raise guest.failure(f"install-offered exited with {result.status}:\n{result.output}")
    guest.wait_reboot(boot_id, INSTALL)
    status = wait_for_otad(guest)

    assert guest.booted_slot_parameter() == "b", guest.failure("GRUB did not boot slot b")
    assert status["booted_slot"] == "b", guest.failure(f"status: {status}")
    assert status["state"] == "idle", guest.failure(f"not committed: {status}")
    assert status["current_artifact"] == "v2", guest.failure(f"status: {status}")
    assert guest.check("cat /etc/otad-release-2") == "from a USB stick\n"
