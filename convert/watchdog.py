"""The hardware watchdog armed from the initramfs on, so that a hang before systemd resets.

otad's package ships an initramfs-tools hook and init-top script (initramfs/ in the
source) that arm /dev/watchdog0 early in every boot when /etc/otad/watchdog enables it;
systemd takes the watchdog over through the system.conf drop-in written here. The
converter writes both settings and rebuilds the image's initramfs in a chroot, offline,
then checks that the rebuilt initramfs holds the setting. Raspberry Pi OS images boot
without an initramfs and are left alone (convert/rpi_pipeline.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from convert.errors import InitramfsFailed
from convert.mounts import chroot_mounts
from otad.errors import UsageError
from otad.process import run

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120  # seconds; a loaded TCG boot takes up to 30 from init-top to systemd
MIN_TIMEOUT = 30  # seconds; shorter could reset healthy boots for ever
MAX_TIMEOUT = 3600
SETTING = Path("etc/otad/watchdog")
DROP_IN = Path("etc/systemd/system.conf.d/50-otad-watchdog.conf")
HOOK = Path("usr/share/initramfs-tools/hooks/otad-watchdog")
UPDATE_INITRAMFS = Path("usr/sbin/update-initramfs")
IN_INITRAMFS = "conf/otad-watchdog.conf"  # what the hook writes, when enabled
REBOOT_TIMEOUT = "10min"  # systemd's own default for a reboot that hangs, made explicit
# mkinitramfs builds its tree in TMPDIR: the chroot's /run is a tmpfs (chroot_mounts),
# so the slot needs room only for the new image.
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "TMPDIR": "/run"}


def check_timeout(seconds: int) -> None:
    """Refuse a timeout that would reset healthy boots or that no watchdog supports."""
    if seconds != 0 and not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
        raise UsageError(
            f"--watchdog {seconds}: expected 0 (off) or {MIN_TIMEOUT} to {MAX_TIMEOUT} "
            "seconds; a boot from the initramfs to systemd must fit in it"
        )


def render_setting(seconds: int) -> str:
    """/etc/otad/watchdog, read by the initramfs hook (and sourceable by a shell)."""
    return (
        "# Written by otad-convert. The hardware watchdog is armed in the initramfs with\n"
        "# this timeout in seconds (0: not armed there); systemd takes it over with\n"
        "# RuntimeWatchdogSec= in\n"
        f"# /{DROP_IN}.\n"
        "# A change takes effect with the next update-initramfs -u.\n"
        f"OTAD_WATCHDOG_SEC={seconds}\n"
    )


def render_drop_in(seconds: int) -> str:
    """The system.conf drop-in through which systemd (PID 1) pings the watchdog."""
    return (
        "# Written by otad-convert: systemd takes over the hardware watchdog that the\n"
        "# initramfs armed (/etc/otad/watchdog) and pings it while it runs; a shutdown\n"
        "# that hangs is reset too.\n"
        "[Manager]\n"
        f"RuntimeWatchdogSec={seconds}s\n"
        f"RebootWatchdogSec={REBOOT_TIMEOUT}\n"
    )


def install(root: Path, seconds: int, initrd: str | None, owed: bool = False) -> str:
    """Write the settings into `root` and rebuild its initramfs; what changed, for the report.

    `initrd` is the initramfs the boot entries name (None: the image boots without one);
    `owed`: packages were installed without the rebuild they asked for (it happens here).
    """
    setting = root / SETTING
    setting.parent.mkdir(parents=True, exist_ok=True)
    setting.write_text(render_setting(seconds))
    setting.chmod(0o644)
    drop_in = root / DROP_IN
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(render_drop_in(seconds))
    drop_in.chmod(0o644)
    systemd = f"systemd pings it (RuntimeWatchdogSec={seconds}s in /{DROP_IN})"

    missing = _missing_for_initramfs(root, initrd)
    if missing:
        log.warning("%s: the watchdog is armed only once systemd starts", missing)
        if owed:
            rebuild_initramfs(root, check=False)
        return f"watchdog: {seconds} s; {systemd}; not armed earlier: {missing}"
    images = rebuild_initramfs(root)
    return (
        f"watchdog: armed in the initramfs with {seconds} s (/{SETTING}), then {systemd}; "
        f"rebuilt {', '.join(images)}"
    )


def _missing_for_initramfs(root: Path, initrd: str | None) -> str | None:
    """Why the image's initramfs cannot arm the watchdog, or None when it can."""
    if initrd is None:
        return "the image boots without an initramfs"
    if not (root / UPDATE_INITRAMFS).exists():
        return "the image has no initramfs-tools (update-initramfs)"
    if not (root / HOOK).exists():
        return f"the image has no /{HOOK} (an otad package without it, or none installed)"
    return None


def can_rebuild(root: Path) -> bool:
    """Whether the image has initramfs-tools and an initramfs that rebuild_initramfs updates."""
    return (root / UPDATE_INITRAMFS).exists() and any((root / "boot").glob("initrd.img-*"))


def rebuild_initramfs(root: Path, check: bool = True) -> list[str]:
    """`update-initramfs -u -k all` in a chroot of `root`; the images rebuilt, each checked
    (unless not `check`) to hold the watchdog setting."""
    with chroot_mounts(root):
        log.info("rebuilding the initramfs")
        result = run(
            ["chroot", root, "update-initramfs", "-u", "-k", "all"],
            env=_CHROOT_ENV,
            check=False,
        )
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        log.debug("update-initramfs: %s", output.strip())
        if result.returncode != 0:
            raise InitramfsFailed(
                f"update-initramfs -u -k all failed in the image (exit {result.returncode}): "
                f"{_last_line(output)}"
            )
        images = sorted(path.name for path in (root / "boot").glob("initrd.img-*"))
        if not images:
            raise InitramfsFailed("update-initramfs left no /boot/initrd.img-* in the image")
        for name in images if check else ():
            _check_initramfs(root, f"/boot/{name}")
    return [f"/boot/{name}" for name in images]


def _check_initramfs(root: Path, image: str) -> None:
    listing = run(["chroot", root, "lsinitramfs", image], env=_CHROOT_ENV).stdout.decode()
    names = {line.strip() for line in listing.splitlines()}
    if IN_INITRAMFS not in names:
        raise InitramfsFailed(
            f"{image} was rebuilt without {IN_INITRAMFS}: otad's initramfs hook did not "
            f"enable the watchdog (/{SETTING}, /{HOOK})"
        )
    modules = [name for name in names if "/kernel/drivers/watchdog/" in name]
    log.info("%s: watchdog setting and %d watchdog driver modules", image, len(modules))


def _last_line(output: str) -> str:
    """mkinitramfs's errors (E: lines, a tool's error) if it printed any, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:") or "error" in line.lower()]
    return "; ".join(errors) or (lines[-1] if lines else "no output")
