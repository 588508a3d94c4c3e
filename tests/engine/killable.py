"""A child process for the kill -9 tests: runs one engine operation, pausing at every
durable write (each state record saved, each bootloader change) until told to go on.

The parent reads "point N <what>" lines from stdout and either answers on stdin or
kills the process with SIGKILL right there: a real kill between two durable steps.
Usage: python3 -m tests.engine.killable SETUP_JSON OPERATION [ARTIFACT]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from otad.artifact.signing import load_verifier
from otad.bootloader.base import Slot
from otad.bootloader.file import FileBootloader
from otad.config import parse_config
from otad.devices import SystemPaths
from otad.engine import Engine
from otad.state import StateStore


class _Points:
    reached = 0


def pause(what: str) -> None:
    _Points.reached += 1
    print(f"point {_Points.reached} {what}", flush=True)
    sys.stdin.readline()


class _StateSaved(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("state saved"):
            pause(record.getMessage())


class PausingBootloader(FileBootloader):
    def start_trial(self, slot: Slot) -> None:
        super().start_trial(slot)
        pause(f"bootloader start_trial {slot.value}")

    def mark_good(self, slot: Slot) -> None:
        super().mark_good(slot)
        pause(f"bootloader mark_good {slot.value}")

    def mark_bad(self, slot: Slot) -> None:
        super().mark_bad(slot)
        pause(f"bootloader mark_bad {slot.value}")


def engine_from(setup: dict[str, str]) -> Engine:
    return Engine(
        parse_config(Path(setup["config"]).read_text()),
        PausingBootloader(Path(setup["bootloader"])),
        paths=SystemPaths(proc=Path(setup["proc"])),
        store=StateStore(Path(setup["data"])),
        verifiers=(load_verifier(Path(setup["key"])),),
    )


def main() -> int:
    setup = json.loads(Path(sys.argv[1]).read_text())
    operation = sys.argv[2]
    state_log = logging.getLogger("otad.state")
    state_log.setLevel(logging.INFO)
    state_log.addHandler(_StateSaved())
    engine = engine_from(setup)
    if operation == "install":
        with Path(sys.argv[3]).open("rb") as stream:
            engine.install(stream)
    elif operation == "commit":
        engine.commit()
    elif operation == "rollback":
        engine.rollback()
    elif operation == "recover":
        engine.recover()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
