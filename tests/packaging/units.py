"""Reading systemd unit files and D-Bus service files in tests: sections of key/value lists.

Both formats are ini-like but allow a key more than once (DeviceAllow=), which
configparser does not, so keys map to every value they were given, in order.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """The sections of the unit file at `path`; comments and blank lines dropped."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], defaultdict(list))
            continue
        key, separator, value = line.partition("=")
        if current is None or not separator:
            raise ValueError(f"{path}:{number}: not a key=value line in a section: {raw!r}")
        current[key.strip()].append(value.strip())
    return sections


def value(unit: Unit, section: str, key: str) -> str:
    """The one value of `key` in `section`; an error when it is missing or repeated."""
    values = unit.get(section, {}).get(key, [])
    if len(values) != 1:
        raise AssertionError(f"[{section}] {key}= should be set once, found {values}")
    return values[0]


def words(unit: Unit, section: str, key: str) -> list[str]:
    """Every space-separated word of every value of `key` in `section`."""
    return [word for item in unit.get(section, {}).get(key, []) for word in item.split()]
