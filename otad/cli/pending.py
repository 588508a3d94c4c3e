"""Entry points for the commands that are declared but not built yet.

otad (the daemon), otactl (its client) and otad-convert (the image converter) are
part of otad's design and declared as console scripts so that packaging and
documentation can refer to them; until they exist they say so and exit with 69
(EX_UNAVAILABLE) instead of pretending to work.
"""

from __future__ import annotations

import sys

EX_UNAVAILABLE = 69


def _unavailable(program: str, what: str) -> int:
    print(f"{program}: {what} is not implemented in otad yet", file=sys.stderr)
    return EX_UNAVAILABLE


def otad_main() -> int:
    return _unavailable("otad", "the update daemon")


def otactl_main() -> int:
    return _unavailable("otactl", "the daemon's command-line client")


def convert_main() -> int:
    return _unavailable("otad-convert", "the image converter")
