"""The converter's progress display, in both modes, with a clock the tests move by hand;
and the two ways of watching a step from outside (reads, growth)."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert import pipeline, progress
from convert.progress import MIB, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_every_tenth_of_the_total_with_sizes_and_rate() -> None:
    out, clock = io.StringIO(), Clock()
    shown = Progress("writing slot A", 100 * MIB, out, interactive=False, clock=clock)

    for _ in range(20):  # 5 MiB a second
        clock.now += 1
        shown.advance(5 * MIB)
    shown.finish()

    lines = out.getvalue().splitlines()
    assert lines[0] == "   writing slot A:  10% 10/100 MiB, 5 MiB/s"
    assert lines[1] == "   writing slot A:  20% 20/100 MiB, 5 MiB/s"
    assert len(lines) == 11  # 10% .. 100%, then the last line
    assert lines[-1] == "   writing slot A: 100/100 MiB in 20.0 s, 5 MiB/s"
    assert "\r" not in out.getvalue()


def test_plain_lines_also_come_every_five_seconds_when_progress_is_slow() -> None:
    out, clock = io.StringIO(), Clock()
    shown = Progress("checking", 1000 * MIB, out, interactive=False, clock=clock)

    for _ in range(12):  # 1 MiB a second: 1.2% in all, never a tenth
        clock.now += 1
        shown.advance(MIB)

    lines = out.getvalue().splitlines()
    assert lines == [
        "   checking:   0% 5/1000 MiB, 1 MiB/s",
        "   checking:   1% 10/1000 MiB, 1 MiB/s",
    ]


def test_a_terminal_gets_one_bar_redrawn_in_place() -> None:
    out, clock = io.StringIO(), Clock()
    shown = Progress("writing slot B", 64 * MIB, out, interactive=True, clock=clock)

    for _ in range(8):
        clock.now += 0.5
        shown.advance(8 * MIB)
    shown.finish()

    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 9  # one redraw per update (each 0.5 s apart), then the last
    assert frames[0] == "writing slot B [##----------------------]  12% 8/64 MiB 16 MiB/s\x1b[K"
    assert frames[-1] == "writing slot B [########################] 100% 64/64 MiB 16 MiB/s\x1b[K\n"
    assert text.count("\n") == 1


def test_a_terminal_bar_is_not_redrawn_more_than_five_times_a_second() -> None:
    out, clock = io.StringIO(), Clock()
    shown = Progress("copying", 100 * MIB, out, interactive=True, clock=clock)

    for _ in range(100):
        clock.now += 0.01
        shown.advance(MIB)

    assert out.getvalue().count("\r") == 5


def test_quiet_shows_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_display", progress._Display())
    progress.configure(out, quiet=True)

    with progress.track("writing slot A", 10 * MIB) as shown:
        shown.advance(10 * MIB)

    assert out.getvalue() == ""
    assert not progress.is_drawing()


def test_track_on_a_terminal_marks_the_bar_and_ends_its_line_on_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    monkeypatch.setattr(progress, "_display", progress._Display())
    progress.configure(out)

    drawing = []

    def fail_part_way() -> None:
        with progress.track("writing slot A", 10 * MIB) as shown:
            drawing.append(progress.is_drawing())
            shown.advance(MIB)
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fail_part_way()

    assert drawing == [True]
    assert not progress.is_drawing()
    assert out.getvalue().endswith("\n")
    assert "100%" not in out.getvalue()


def test_watch_growth_follows_a_file_a_child_process_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_display", progress._Display())
    monkeypatch.setattr(progress, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    progress.configure(out)
    target = tmp_path / "grown"
    writer = (
        "import sys, time\n"
        "with open(sys.argv[1], 'wb') as f:\n"
        "    for _ in range(8):\n"
        "        f.write(b'x' * (1 << 20)); f.flush(); time.sleep(0.1)\n"
    )

    with progress.watch_growth("copying the root filesystem", target, 8 * MIB):
        subprocess.run([sys.executable, "-c", writer, str(target)], check=True)

    lines = out.getvalue().splitlines()
    middle = [line for line in lines if re.search(r" [1-9][0-9]?% [1-7]/8 MiB", line)]
    assert middle, lines  # seen part-way, not only at the end
    assert lines[-1].startswith("   copying the root filesystem: 8/8 MiB in ")


def test_watch_reads_follows_the_position_of_a_reader_in_this_process_over_two_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_display", progress._Display())
    monkeypatch.setattr(progress, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    progress.configure(out)
    source = tmp_path / "payload"
    source.write_bytes(b"y" * (4 * MIB))

    with progress.watch_reads("hashing and compressing slot A", source, 4 * MIB, passes=2):
        for _ in range(2):
            with source.open("rb", buffering=0) as stream:
                while stream.read(MIB):
                    time.sleep(0.1)

    percents = [int(m[1]) for m in re.finditer(r" ([0-9]+)% ", out.getvalue())]
    assert any(0 < p <= 50 for p in percents), out.getvalue()
    assert any(50 < p < 100 for p in percents), out.getvalue()  # the second pass counts on
    assert percents == sorted(percents)
    assert (
        out.getvalue().splitlines()[-1].startswith("   hashing and compressing slot A: 8/8 MiB in ")
    )


def test_read_position_is_none_when_nobody_has_the_file_open(tmp_path: Path) -> None:
    (tmp_path / "closed").write_bytes(b"z")

    assert progress.read_position(str(tmp_path / "closed")) is None


def test_a_phase_that_runs_long_says_it_is_still_working(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pipeline, "HEARTBEAT", 0.05)
    caplog.set_level(logging.INFO, logger="convert.pipeline")
    with pipeline._phase("a long phase"):
        deadline = time.monotonic() + 30  # for the heartbeat's thread to run at all
        while "a long phase: still working" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.01)
    assert "== a long phase" in caplog.text
    assert re.search(r"a long phase: still working \([0-9]+ s\)", caplog.text)
    assert "a long phase: done in " in caplog.text
