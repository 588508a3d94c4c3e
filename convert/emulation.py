"""Running an image's own programs when it is for another architecture (arm64, armhf).

A chroot of a foreign root filesystem runs through qemu-user-static, registered with the
kernel's binfmt_misc with the F flag (the interpreter is opened when it is registered,
so that it need not exist inside the chroot): what Debian's qemu-user-static package
does. binfmt_misc is mounted and the interpreter enabled when they are not yet.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

from convert.errors import EmulationMissing
from otad.process import run

log = logging.getLogger(__name__)

BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Debian architecture -> binfmt_misc entry of qemu-user-static.
INTERPRETERS = {"arm64": "qemu-aarch64", "armhf": "qemu-arm", "amd64": "qemu-x86_64"}
HOST_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}
INSTALL_HINT = "install Debian's qemu-user-static and binfmt-support"


def host_architecture() -> str:
    machine = platform.machine()
    return HOST_ARCHITECTURES.get(machine, machine)


def is_foreign(architecture: str) -> bool:
    return architecture != host_architecture()


def enable(architecture: str, root: Path) -> None:
    """Make programs of `architecture` run in a chroot of `root`; EmulationMissing if not."""
    if not is_foreign(architecture):
        return
    entry_name = INTERPRETERS.get(architecture)
    if entry_name is None:
        raise EmulationMissing(f"no emulator is known for {architecture} root filesystems")
    if not (BINFMT / "register").exists():
        log.info("mounting binfmt_misc on %s", BINFMT)
        result = run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], check=False)
        if result.returncode != 0:
            raise EmulationMissing(
                f"the image is for {architecture}: running its programs needs binfmt_misc, "
                f"which cannot be mounted on {BINFMT} ({result.stderr.decode().strip()})"
            )
    entry = BINFMT / entry_name
    if not _is_enabled(entry) and shutil.which("update-binfmts"):
        run(["update-binfmts", "--enable", entry_name], check=False)
    if not _is_enabled(entry):
        raise EmulationMissing(
            f"the image is for {architecture}: running its programs (to install --deb "
            f"packages) needs {entry_name} in binfmt_misc, which is not registered; "
            f"{INSTALL_HINT}"
        )
    flags = _field(entry, "flags")
    if "F" not in flags:
        raise EmulationMissing(
            f"{entry} is registered without the F flag (flags: {flags or 'none'}), so the "
            f"emulator cannot be found inside the image's chroot; {INSTALL_HINT}, which "
            "register it with that flag"
        )
    result = run(["chroot", root, "/bin/true"], check=False)
    if result.returncode != 0:
        raise EmulationMissing(
            f"programs of the {architecture} image do not run through {entry_name}: "
            f"{result.stderr.decode('utf-8', 'replace').strip() or 'no reason given'}"
        )
    log.info("running %s programs through %s", architecture, entry_name)


def _is_enabled(entry: Path) -> bool:
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def _field(entry: Path, name: str) -> str:
    for line in entry.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == f"{name}:":
            return value.strip()
    return ""
