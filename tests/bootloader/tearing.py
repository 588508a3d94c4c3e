"""Cut writes: record what a backend writes, then rebuild the disk as a cut left it.

A write in place cut after k bytes leaves the first k new bytes over the old ones; an
atomic write cut anywhere leaves the old file (the temp file is abandoned) or, once
renamed, the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.bootloader import durable

Files = dict[str, bytes]


@dataclass(frozen=True)
class Write:
    name: str
    old: bytes | None
    new: bytes
    in_place: bool


class WriteRecorder:
    """Wraps durable's writers in `module` and records each write relative to `root`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, root: Path) -> None:
        self.root = root
        self.writes: list[Write] = []
        for name, in_place in (("overwrite_in_place", True), ("write_atomically", False)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, self._wrap(getattr(durable, name), in_place))

    def _wrap(
        self, real: Callable[[Path, bytes], None], in_place: bool
    ) -> Callable[[Path, bytes], None]:
        def record(path: Path, data: bytes) -> None:
            old = path.read_bytes() if path.exists() else None
            in_place_here = in_place and old is not None and len(old) == len(data)
            name = path.relative_to(self.root).as_posix()
            self.writes.append(Write(name, old, data, in_place_here))
            real(path, data)

        return record


def snapshot(root: Path) -> Files:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def restore(root: Path, files: Files) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            path.unlink()
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def torn_states(before: Files, writes: list[Write]) -> Iterator[tuple[int, int, Files]]:
    """(write index, bytes written, files) for every cut of every write, in order."""
    files = dict(before)
    for index, write in enumerate(writes):
        for cut in range(len(write.new) + 1):
            torn = dict(files)
            if write.in_place:
                assert write.old is not None
                torn[write.name] = write.new[:cut] + write.old[cut:]
            elif cut == len(write.new):
                torn[write.name] = write.new
            elif write.old is None:
                torn.pop(write.name, None)
            yield index, cut, torn
        files[write.name] = write.new


def distinct(states: list[Files]) -> list[Files]:
    """The states with equal content once: equal bytes on disk boot equally."""
    seen: dict[tuple[tuple[str, bytes], ...], Files] = {}
    for files in states:
        seen.setdefault(tuple(sorted(files.items())), files)
    return list(seen.values())


def key(files: Files) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted(files.items()))
