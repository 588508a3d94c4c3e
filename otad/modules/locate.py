"""Finding the update module executable for a payload type.

A module's file name is its payload type. otad looks in its own module directory first
and then in Mender's, so a device can keep the community modules it already has and
otad's own modules take precedence where both exist.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from otad.errors import UnknownPayloadType, UnsafePath

log = logging.getLogger(__name__)

OTAD_MODULE_DIR = Path("/usr/share/otad/modules/v3")
MENDER_MODULE_DIR = Path("/usr/share/mender/modules/v3")
DEFAULT_MODULE_DIRS = (OTAD_MODULE_DIR, MENDER_MODULE_DIR)


def check_payload_type(payload_type: str) -> str:
    """Return `payload_type` if it can name a file in a module directory."""
    if payload_type in ("", ".", "..") or "/" in payload_type or "\0" in payload_type:
        raise UnsafePath(f"payload type {payload_type!r} cannot name an update module")
    return payload_type


def is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_module(payload_type: str, directories: Sequence[Path] = DEFAULT_MODULE_DIRS) -> Path:
    """The executable that installs `payload_type`, from the first directory holding one.

    A file of that name that is not executable is skipped with a warning, as Mender does.
    """
    check_payload_type(payload_type)
    for directory in directories:
        candidate = directory / payload_type
        if is_executable_file(candidate):
            log.debug("payload type %s is installed by %s", payload_type, candidate)
            return candidate
        if candidate.exists():
            log.warning("%s is not an executable file; it cannot install updates", candidate)
    raise UnknownPayloadType(payload_type, tuple(str(directory) for directory in directories))
