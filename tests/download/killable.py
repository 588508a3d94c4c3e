"""A child process for the kill -9 tests of downloads: installs from a URL with the real
engine and pauses after each save of the resume record until told to go on.

It prints "point N saved BYTES" (BYTES: the verified bytes the record holds) and waits for
a line on stdin; bootloader changes pause as in tests/engine/killable.py. The parent
kills it with SIGKILL at the point it chooses.
Usage: python3 -m tests.download.killable SETUP_JSON URL CA_BUNDLE
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from otad.download import DownloadSettings, HttpSource
from tests.engine.killable import engine_from, pause

_SAVED = re.compile(r"resume record saved: (\d+) bytes")


class _RecordSaved(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        match = _SAVED.match(record.getMessage())
        if match:
            pause(f"saved {match.group(1)}")


def main() -> int:
    setup = json.loads(Path(sys.argv[1]).read_text())
    url, ca_bundle = sys.argv[2], Path(sys.argv[3])
    resume_log = logging.getLogger("otad.resume")
    resume_log.setLevel(logging.DEBUG)
    resume_log.addHandler(_RecordSaved())
    engine = engine_from(setup)
    settings = DownloadSettings(ca_bundle=ca_bundle, retries=1, read_timeout=30.0)
    with HttpSource(url, settings) as source:
        engine.install(source)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
