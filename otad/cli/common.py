"""What every otad command-line tool does at its edge: logging, errors, exit codes.

Exit codes shared by all tools:

    0  success
    1  the artifact (or other input) is invalid or not trusted
    2  the command line is wrong
    3  the machine is missing something: a file, a key, a tool, a permission
    4  an unexpected internal error (a bug: please report it with --debug output)
    5  the device's update state does not allow it now: another operation runs, nothing
       is on trial to commit, an update waits for its reboot (otactl)
  130  interrupted or cancelled
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from otad.errors import (
    ArtifactError,
    BootloaderError,
    BootSyncError,
    Cancelled,
    ConfigError,
    DeviceError,
    EnvironmentProblem,
    KeyProblem,
    ModuleError,
    NoSpace,
    NotAuthorized,
    OtadError,
    StateConflict,
    StateCorrupt,
    UsageError,
)

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4
EXIT_STATE = 5
EXIT_CANCELLED = 130

# Problems of the machine rather than of the input: exit 3, like a missing file.
_MACHINE_ERRORS = (
    EnvironmentProblem,
    KeyProblem,
    OSError,
    ConfigError,
    DeviceError,
    BootloaderError,
    BootSyncError,
    ModuleError,
    StateCorrupt,
    NotAuthorized,
)

_LEVELS = {
    "emerg": logging.CRITICAL,
    "alert": logging.CRITICAL,
    "crit": logging.CRITICAL,
    "err": logging.ERROR,
    "warning": logging.WARNING,
    "notice": logging.INFO,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def setup_logging(verbosity: int, default: int = logging.WARNING) -> None:
    """Log to stderr without timestamps, from `default` up (the commands: warnings; the
    daemon: info, for the journal). SYSTEMD_LOG_LEVEL replaces `default`; each -v lowers
    the level by one step (warning, info, debug)."""
    level = _LEVELS.get(os.environ.get("SYSTEMD_LOG_LEVEL", "").strip().lower(), default)
    level = max(logging.DEBUG, level - 10 * verbosity)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)


def exit_code_for(error: BaseException) -> int:
    """The exit code (and the result of the daemon's Completed signal) for `error`."""
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, (ArtifactError, NoSpace)):
        return EXIT_INVALID
    if isinstance(error, _MACHINE_ERRORS):
        return EXIT_ENVIRONMENT
    if isinstance(error, StateConflict):
        return EXIT_STATE
    if isinstance(error, Cancelled):
        return EXIT_CANCELLED
    return EXIT_INTERNAL


def run_command(program: str, command: Callable[[], int], debug: bool) -> int:
    """Run `command`, turning errors into one line on stderr and an exit code."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:
        return EXIT_OK
    except (OtadError, OSError) as error:
        if debug:
            raise
        print(f"{program}: {_describe(error)}", file=sys.stderr)
        return exit_code_for(error)
    except Exception as error:  # the one place a bug is turned into a message
        if debug:
            raise
        print(
            f"{program}: internal error: {type(error).__name__}: {error} "
            "(run with --debug for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        return f"error:{where}: {error.strerror}"
    kind = "error" if isinstance(error, OtadError) else type(error).__name__
    return f"{kind}: {error}"
