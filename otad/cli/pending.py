"""Entry points for the commands that are declared but not built yet.

otad-convert (the image converter) is part of otad's design and declared as a console
script so that packaging and documentation can refer to it; until it exists it says so
and exits with 69 (EX_UNAVAILABLE) instead of pretending to work.
"""

from __future__ import annotations

import sys

EX_UNAVAILABLE = 69


def _unavailable(program: str, what: str) -> int:
    print(f"{program}: {what} is not implemented in otad yet", file=sys.stderr)
    return EX_UNAVAILABLE


def convert_main() -> int:
    return _unavailable("otad-convert", "the image converter")
