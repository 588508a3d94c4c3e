"""Loop devices, mounts and chroots, each a context manager that always undoes itself.

The host may not scan partition tables of loop devices, so a partition is attached as
its own loop device with an offset and size limit; a whole disk gets its partitions
announced with `partx -u`. Release runs in reverse order and keeps going past errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from otad.errors import CommandFailed
from otad.process import run

log = logging.getLogger(__name__)


@contextlib.contextmanager
def loop_device(
    image: Path, offset: int = 0, size: int | None = None, read_only: bool = False
) -> Iterator[Path]:
    """A loop device over `image` (or its byte range offset..offset+size)."""
    argv: list[str | Path] = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    device = Path(run([*argv, image]).stdout.decode().strip())
    log.debug("attached %s to %s at offset %d", device, image, offset)
    try:
        yield device
    finally:
        _quietly(["losetup", "--detach", device])


@contextlib.contextmanager
def mounted(device: Path, target: Path, options: str = "") -> Iterator[Path]:
    """`device` mounted on `target` (created if needed) for the duration of the block."""
    target.mkdir(parents=True, exist_ok=True)
    run(["mount", *(["-o", options] if options else []), device, target])
    try:
        yield target
    finally:
        _quietly(["umount", target])


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[Path]:
    """/proc, /sys, /dev and /run of the host bound under `root`, for tools run in a chroot."""
    with contextlib.ExitStack() as stack:
        for name, argv in (
            ("proc", ["-t", "proc", "proc"]),
            ("sys", ["-t", "sysfs", "sysfs"]),
            ("dev", ["--bind", "/dev"]),
            ("run", ["-t", "tmpfs", "tmpfs"]),
        ):
            target = root / name
            target.mkdir(exist_ok=True)
            run(["mount", *argv, target])
            stack.callback(_quietly, ["umount", target])
        yield root


def _quietly(argv: list[str | Path]) -> None:
    try:
        run(argv)
    except CommandFailed as error:
        log.warning("cleanup step failed, a resource may be left behind: %s", error)
