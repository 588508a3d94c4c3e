"""The named errors of org.otad.Updater1, and how otad's exceptions become them.

A client gets one of the names below with the exception's one-line message, and never a
Python traceback: an exception otad did not raise on purpose becomes Failed with a
generic text, and its traceback goes to the daemon's log.

    Busy             another operation runs, or the update state does not allow the
                     request now (an update waits for its reboot, the booted slot is
                     on trial and must be committed or rolled back before an install)
    InvalidArtifact  the artifact is malformed, truncated or altered
    BadSignature     the artifact is unsigned or not signed by a trusted key
    Incompatible     the artifact is not for this device (type, depends)
    Downgrade        the artifact is older than the running release
    NotInTrial       Commit, but no slot runs on trial
    NoSpace          the payload does not fit the slot
    InvalidArgs      a bad argument: unknown option, wrong type, unusable source
    NotAuthorized    the caller may not do this (see otad.dbus.authorize)
    Failed           anything else: the device, the bootloader, an update module
"""

from __future__ import annotations

import logging

from dbus_next.errors import DBusError

from otad.cli.common import EXIT_OK, exit_code_for
from otad.dbus.bus import make_error
from otad.errors import (
    ArtifactError,
    Downgrade,
    Incompatible,
    NoSpace,
    NotAuthorized,
    NotInTrial,
    OtadError,
    SignatureError,
    StateConflict,
    UsageError,
)
from otad.updater import error_message

log = logging.getLogger(__name__)

PREFIX = "org.otad.Error."
BUSY = PREFIX + "Busy"
INVALID_ARTIFACT = PREFIX + "InvalidArtifact"
BAD_SIGNATURE = PREFIX + "BadSignature"
INCOMPATIBLE = PREFIX + "Incompatible"
DOWNGRADE = PREFIX + "Downgrade"
NOT_IN_TRIAL = PREFIX + "NotInTrial"
NO_SPACE = PREFIX + "NoSpace"
INVALID_ARGS = PREFIX + "InvalidArgs"
NOT_AUTHORIZED = PREFIX + "NotAuthorized"
FAILED = PREFIX + "Failed"

# First match wins: subclasses before the classes they derive from.
_NAMES: tuple[tuple[type[Exception], str], ...] = (
    (NotAuthorized, NOT_AUTHORIZED),
    (NotInTrial, NOT_IN_TRIAL),
    (StateConflict, BUSY),
    (UsageError, INVALID_ARGS),
    (SignatureError, BAD_SIGNATURE),
    (Downgrade, DOWNGRADE),
    (Incompatible, INCOMPATIBLE),
    (ArtifactError, INVALID_ARTIFACT),
    (NoSpace, NO_SPACE),
)


def translate(error: Exception) -> DBusError:
    """The named D-Bus error a client gets for `error`."""
    if isinstance(error, DBusError):
        return error
    for kind, name in _NAMES:
        if isinstance(error, kind):
            return make_error(name, error_message(error))
    if not isinstance(error, (OtadError, OSError)):
        log.error("unexpected error in a D-Bus method", exc_info=error)
    return make_error(FAILED, error_message(error))


def completion_result(error: Exception | None) -> int:
    """The `result` of the Completed signal: 0, or the exit code otactl exits with."""
    return EXIT_OK if error is None else exit_code_for(error)
