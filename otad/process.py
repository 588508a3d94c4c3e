"""The one way otad runs an external command.

`run()` logs the quoted argv at debug level, closes stdin, forces the C locale so that
output can be parsed, and turns a failure into CommandFailed carrying the command, its
exit code and its stderr. `require_tools()` checks that tools exist before the first
side effect of an operation.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from otad.errors import CommandFailed, MissingTool

log = logging.getLogger(__name__)

Argument = str | Path


def run(
    argv: Sequence[Argument],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return its result; raise CommandFailed when it exits non-zero."""
    command = [str(argument) for argument in argv]
    log.debug("running %s", shlex.join(command))
    environment = {**os.environ, **(env or {}), "LC_ALL": "C", "LANG": "C"}
    try:
        result = subprocess.run(
            command,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=environment,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError:
        raise MissingTool(command[0]) from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(command, None, f"timed out after {timeout} s") from None
    if check and result.returncode != 0:
        stderr = result.stderr.decode("utf-8", "replace").strip()
        raise CommandFailed(command, result.returncode, stderr)
    return result


def require_tools(*names: str) -> None:
    """Raise MissingTool for the first of `names` that is not on PATH."""
    for name in names:
        if shutil.which(name) is None:
            raise MissingTool(name)
