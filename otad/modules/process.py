"""Starting, watching and stopping one call of an update module.

This is otad's process wrapper (`otad.process.run`) grown the two things a module call
needs and a tool call does not: the module runs while otad feeds it FIFOs, and a module
that overstays its timeout is killed with its whole process group (a shell module's
children included). The rest is the same: argv logged at debug, stdin closed, C locale,
and failures carry the exit code and the end of stderr.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from otad.errors import ModuleError, ModuleProtocolError, ModuleTimeout
from otad.modules.protocol import State

log = logging.getLogger(__name__)

STDERR_KEPT = 64 * 1024  # bytes of a module's stderr kept for the error message
STDOUT_ANSWER_LIMIT = 64 * 1024  # a query answer is one word; more is a broken module


@dataclass(frozen=True)
class Limits:
    """How long a module may take, in seconds.

    `timeout` bounds each state call, Download included (Mender's module_timeout,
    4 hours by default); `kill_grace` is how long a module has to exit after SIGTERM
    before it gets SIGKILL.
    """

    timeout: float = 4 * 3600.0
    kill_grace: float = 5.0


class _Drain(threading.Thread):
    """Reads one output pipe of a module to its end, logging and keeping what it must."""

    def __init__(self, pipe: IO[bytes], label: str, keep: int, is_log: bool) -> None:
        super().__init__(name=f"module {label}", daemon=True)
        self._pipe = pipe
        self._label = label
        self._keep = keep
        self._is_log = is_log
        self._chunks: collections.deque[bytes] = collections.deque()
        self._kept = 0
        self.total = 0

    def run(self) -> None:
        with self._pipe:
            for line in self._pipe:
                self.total += len(line)
                if self._is_log:
                    log.info("%s: %s", self._label, line.decode("utf-8", "replace").rstrip())
                self._chunks.append(line)
                self._kept += len(line)
                while self._kept > self._keep and len(self._chunks) > 1:
                    self._kept -= len(self._chunks.popleft())

    @property
    def data(self) -> bytes:
        return b"".join(self._chunks)


class ModuleCall:
    """One running `MODULE STATE TREE`; use as a context manager, which kills on exit."""

    def __init__(
        self,
        module: Path,
        state: State,
        tree: Path,
        limits: Limits,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.module = module
        self.state = state
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout
        argv = [str(module), state.value, str(tree)]
        log.debug("running %s", shlex.join(argv))
        env = {**os.environ, **(environment or {}), "LC_ALL": "C", "LANG": "C"}
        try:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=tree,
                env=env,
                start_new_session=True,
            )
        except OSError as error:
            raise self.error(None, f"cannot start it: {error.strerror}") from None
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        name = module.name
        self._stdout = _Drain(
            self._process.stdout,
            f"{name} {state.value} (stdout)",
            STDOUT_ANSWER_LIMIT if state.is_query else STDERR_KEPT,
            is_log=not state.is_query,
        )
        self._stderr = _Drain(
            self._process.stderr, f"{name} {state.value} (stderr)", STDERR_KEPT, is_log=True
        )
        self._stdout.start()
        self._stderr.start()

    def __enter__(self) -> ModuleCall:
        return self

    def __exit__(self, *_: object) -> None:
        if self._process.poll() is None:
            self.kill()
        self._join_output()

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def poll(self) -> int | None:
        return self._process.poll()

    def check_deadline(self) -> None:
        """Kill the module and raise ModuleTimeout when its time is up."""
        if time.monotonic() >= self.deadline:
            self.kill()
            raise self.timed_out()

    def wait(self) -> bytes:
        """Wait for the module to exit 0 within its deadline; return its stdout."""
        try:
            code = self._process.wait(self.remaining)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.timed_out() from None
        self._join_output()
        if code != 0:
            raise self.error(code, _describe_exit(code))
        if self.state.is_query and self._stdout.total > STDOUT_ANSWER_LIMIT:
            raise self.protocol_error(f"printed {self._stdout.total} bytes as its answer")
        return self._stdout.data

    def kill(self) -> None:
        """SIGTERM the module's process group, then SIGKILL it after the grace time."""
        self._signal_group(signal.SIGTERM)
        try:
            self._process.wait(self.limits.kill_grace)
        except subprocess.TimeoutExpired:
            log.warning(
                "update module %s ignored SIGTERM for %.0f s; killing it",
                self.module,
                self.limits.kill_grace,
            )
        # Children that outlived the module would keep its pipes open; none may stay.
        self._signal_group(signal.SIGKILL)
        self._process.wait()

    def _signal_group(self, number: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, number)

    def _join_output(self) -> None:
        # A child the module left running may hold the pipes open; do not wait for it.
        for drain in (self._stdout, self._stderr):
            drain.join(1.0)

    @property
    def stderr(self) -> str:
        return self._stderr.data.decode("utf-8", "replace")

    def error(self, code: int | None, problem: str) -> ModuleError:
        return ModuleError(str(self.module), self.state.value, code, self.stderr, problem)

    def timed_out(self) -> ModuleTimeout:
        self._join_output()
        return ModuleTimeout(
            str(self.module),
            self.state.value,
            None,
            self.stderr,
            f"did not finish within {self.limits.timeout:g} s and was killed",
        )

    def protocol_error(self, problem: str) -> ModuleProtocolError:
        return ModuleProtocolError(
            str(self.module), self.state.value, self._process.returncode, self.stderr, problem
        )


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with {code}"
