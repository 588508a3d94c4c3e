"""The booted slot, as the bootloader told the kernel: `otad.slot=a|b` on its command line."""

from __future__ import annotations

from pathlib import Path

from otad.bootloader.base import Slot
from otad.bootloader.durable import read_bytes
from otad.errors import BootloaderStateError

PROC_CMDLINE = Path("/proc/cmdline")
PARAMETER = "otad.slot"


def read_booted_slot(path: Path = PROC_CMDLINE) -> Slot:
    """The slot named by the last `otad.slot=` on the kernel command line in `path`."""
    data = read_bytes(path)
    if data is None:
        raise BootloaderStateError(str(path), "the kernel command line is not readable")

    found: str | None = None
    for word in data.decode("utf-8", "replace").split():
        name, sep, value = word.partition("=")
        if sep and name == PARAMETER:
            found = value
    if found is None:
        raise BootloaderStateError(
            str(path), f"no {PARAMETER}= on the kernel command line: not booted by otad's menu"
        )
    try:
        return Slot(found)
    except ValueError:
        raise BootloaderStateError(
            str(path), f"{PARAMETER}={found} names no slot, expected a or b"
        ) from None
