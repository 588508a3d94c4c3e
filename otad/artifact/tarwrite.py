"""Writing the tar archives of an artifact, reproducibly.

Every member gets the same owner (0/0, no names), mode 0644 and a fixed mtime, so the
same inputs always give the same bytes. Headers use the GNU format, which stores sizes
of 8 GiB and more in base-256 and so keeps every header exactly one block long; that
lets `reserve()` leave room for a member whose size is known only after it is written.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO, Protocol, cast

from otad.artifact.streams import BLOCK_SIZE, Readable, read_into_fully
from otad.errors import EnvironmentProblem

BLOCK = 512


class Sink(Protocol):
    """Anything bytes can be written to: a file, or a compressing writer."""

    def write(self, data: bytes | memoryview, /) -> object: ...


def member_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


class TarWriter:
    """Appends members to `out` and ends the archive with two zero blocks.

    `reserve()` and `complete()` need `out` to be a seekable file.
    """

    def __init__(self, out: Sink, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime

    def add_bytes(self, name: str, data: bytes) -> None:
        self._out.write(member_header(name, len(data), self._mtime))
        self._out.write(data)
        self._pad(len(data))

    def add_stream(self, name: str, size: int, source: Readable) -> None:
        """Copy exactly `size` bytes of `source` as member `name`."""
        self._out.write(member_header(name, size, self._mtime))
        buffer = memoryview(bytearray(min(BLOCK_SIZE, size) or 1))
        left = size
        while left:
            count = read_into_fully(source, buffer[: min(left, len(buffer))])
            if not count:
                raise EnvironmentProblem(f"{name} shrank while it was being written")
            self._out.write(buffer[:count])
            left -= count
        self._pad(size)

    def reserve(self) -> int:
        """Leave a header block to fill in later with `complete()`; return its offset."""
        out = cast(BinaryIO, self._out)
        offset = out.tell()
        out.write(bytes(BLOCK))
        return offset

    def complete(self, offset: int, name: str) -> None:
        """Finish the member reserved at `offset`, whose data has just been written."""
        out = cast(BinaryIO, self._out)
        size = out.tell() - offset - BLOCK
        header = member_header(name, size, self._mtime)
        if len(header) != BLOCK:
            raise ValueError(f"member name {name!r} needs a long-name header")
        self._pad(size)
        resume = out.tell()
        out.seek(offset)
        out.write(header)
        out.seek(resume)

    def close(self) -> None:
        self._out.write(bytes(2 * BLOCK))

    def _pad(self, size: int) -> None:
        self._out.write(bytes(-size % BLOCK))
