"""Progress of the converter's long steps: a bar on a terminal, plain periodic lines otherwise.

A step that knows its size reports bytes done through a `Progress`; a step run by an
external tool or by a library that takes a path is watched from outside instead: how
far the process has read a file (`watch_reads`, from /proc's fdinfo) or how much a file
it writes has grown (`watch_growth`). The command line decides once where progress goes
(`configure`); by default, and with --quiet, nothing is shown.

On a terminal the bar is redrawn in place at most five times a second; otherwise a line
is written every LINE_SECONDS or every LINE_STEP_PERCENT of the total, whichever comes
first.
Either way a last line gives the total, the time and the mean rate.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

MIB = 1 << 20
LINE_SECONDS = 5.0
LINE_STEP_PERCENT = 10
REDRAW_SECONDS = 0.2
POLL_SECONDS = 0.5
BAR_WIDTH = 24


@dataclass
class _Display:
    stream: TextIO | None = None
    interactive: bool = False


_display = _Display()  # set once, by the command line
_active = threading.Event()  # a bar is on the terminal: log lines would break it


def configure(stream: TextIO | None, quiet: bool = False) -> None:
    """Show progress on `stream` (a bar if it is a terminal), or nowhere if `quiet`."""
    _display.stream = None if quiet else stream
    _display.interactive = bool(_display.stream is not None and _display.stream.isatty())


def is_drawing() -> bool:
    """True while a bar is drawn on a terminal."""
    return _active.is_set()


class Progress:
    """Bytes done of `total` for one step, shown on `stream` (None: nowhere)."""

    def __init__(
        self,
        title: str,
        total: int,
        stream: TextIO | None,
        interactive: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.title = title
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream
        self._interactive = interactive
        self._clock = clock
        self._started = self._last = clock()
        self._last_step = 0  # tenths of the total reached at the last line
        self._lock = threading.Lock()

    def advance(self, count: int) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        """Set the bytes done; shows a line or redraws the bar when it is time to."""
        with self._lock:
            self.done = done
            if self._stream is None:
                return
            now = self._clock()
            step = self._percent() // LINE_STEP_PERCENT
            if self._interactive:
                if now - self._last >= REDRAW_SECONDS:
                    self._last = now
                    self._draw(now, end="")
            elif now - self._last >= LINE_SECONDS or step > self._last_step:
                self._last, self._last_step = now, step
                self._stream.write(self._line(now) + "\n")
                self._stream.flush()

    def finish(self) -> None:
        """The last line: what was done, in how long, at what mean rate."""
        with self._lock:
            if self._stream is None:
                return
            now = self._clock()
            if self._interactive:
                self._draw(now, end="\n")
            else:
                self._stream.write(self._line(now, final=True) + "\n")
                self._stream.flush()

    def _rate(self, now: float) -> float:
        elapsed = now - self._started
        return self.done / elapsed / MIB if elapsed > 0 else 0.0

    def _line(self, now: float, final: bool = False) -> str:
        sizes = f"{self.done // MIB}/{self.total // MIB} MiB"
        if final:
            return (
                f"   {self.title}: {sizes} in {now - self._started:.1f} s, "
                f"{self._rate(now):.0f} MiB/s"
            )
        return f"   {self.title}: {self._percent():3d}% {sizes}, {self._rate(now):.0f} MiB/s"

    def _percent(self) -> int:
        return min(100, self.done * 100 // self.total) if self.total else 0

    def _draw(self, now: float, end: str) -> None:
        assert self._stream is not None
        filled = BAR_WIDTH * self._percent() // 100
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self._stream.write(
            f"\r{self.title} [{bar}] {self._percent():3d}% {self.done // MIB}/"
            f"{self.total // MIB} MiB {self._rate(now):.0f} MiB/s\x1b[K{end}"
        )
        self._stream.flush()


@contextlib.contextmanager
def track(title: str, total: int) -> Iterator[Progress]:
    """A Progress shown where `configure` said, finished when the block ends well."""
    stream, interactive = _display.stream, _display.interactive
    progress = Progress(title, total, stream, interactive)
    if interactive:
        _active.set()
    try:
        yield progress
    except BaseException:
        if interactive and stream is not None:
            stream.write("\n")  # end the bar's line before the error is shown
        raise
    else:
        progress.finish()
    finally:
        _active.clear()


@contextlib.contextmanager
def _polling(title: str, total: int, measure: Callable[[], int | None]) -> Iterator[None]:
    finished = threading.Event()
    with track(title, total) as progress:

        def poll() -> None:
            while not finished.wait(POLL_SECONDS):
                value = measure()
                if value is not None:
                    progress.update(min(value, total))

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            finished.set()
            thread.join()
        progress.update(total)


def watch_growth(title: str, path: Path, total: int) -> contextlib.AbstractContextManager[None]:
    """Progress of a step that writes `path`: the bytes allocated to it so far."""

    def allocated() -> int | None:
        try:
            return path.stat().st_blocks * 512
        except OSError:
            return None

    return _polling(title, total, allocated)


def watch_reads(
    title: str, path: Path, size: int, passes: int = 1
) -> contextlib.AbstractContextManager[None]:
    """Progress of a step that reads `path` (`size` bytes) `passes` times from start to end,
    in this process or a child: the read position of its open descriptor."""
    target = str(path.resolve())
    state = {"pass": 0, "last": 0}

    def position() -> int | None:
        found = read_position(target)
        if found is None:
            return None
        if found < state["last"]:
            state["pass"] = min(state["pass"] + 1, passes - 1)
        state["last"] = found
        return state["pass"] * size + found

    return _polling(title, size * passes, position)


def read_position(target: str) -> int | None:
    """The largest file position among the descriptors of this process and its children
    that have `target` open, or None if none has."""
    pids = ["self"]
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            pids += Path(f"/proc/self/task/{task}/children").read_text().split()
    best: int | None = None
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") != target:
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{descriptor}").read_text()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("pos:"):
                    value = int(line.split()[1])
                    if best is None or value > best:
                        best = value
    return best
