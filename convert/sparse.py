"""Copying only the data of a sparse file into a region of another, in the kernel.

A slot's filesystem is a sparse work file: e2image copied only the used blocks of the
stock root into it, so its holes are free space. Writing it into the new disk image
(itself a fresh sparse file) needs only its data ranges, found with SEEK_DATA and
SEEK_HOLE and moved with copy_file_range, so that no byte of a hole is read or written.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from convert.errors import ImageError

STEP = 64 << 20  # bytes per copy_file_range call: progress granularity


def data_ranges(
    descriptor: int, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data range of the open file between `start` and `end`."""
    limit = os.fstat(descriptor).st_size if end is None else end
    position = start
    while position < limit:
        try:
            data = os.lseek(descriptor, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        if data >= limit:
            return
        hole = min(os.lseek(descriptor, data, os.SEEK_HOLE), limit)
        yield data, hole - data
        position = hole


def data_bytes(path: Path, start: int = 0, end: int | None = None) -> int:
    """How many bytes of `path` between `start` and `end` are data rather than holes."""
    with path.open("rb") as stream:
        return sum(length for _, length in data_ranges(stream.fileno(), start, end))


def copy_data(
    source: Path,
    target: Path,
    offset: int,
    limit: int,
    advance: Callable[[int], None] = lambda count: None,
) -> int:
    """Copy the data ranges of `source` to byte `offset` + the same place in `target`.

    `target` must already exist and be zero where `source` has holes (a fresh sparse
    image). `limit` is the size of the region: a larger `source` is refused. Calls
    `advance` with each count of bytes copied; returns the total.
    """
    size = source.stat().st_size
    if size > limit:
        raise ImageError(f"{source} ({size} bytes) is larger than its place ({limit} bytes)")
    copied = 0
    with source.open("rb") as inp, target.open("r+b") as out:
        for start, length in data_ranges(inp.fileno()):
            done = 0
            while done < length:
                count = os.copy_file_range(
                    inp.fileno(), out.fileno(), min(STEP, length - done),
                    start + done, offset + start + done,
                )  # fmt: skip
                if count == 0:
                    raise ImageError(f"{source} ended while being copied into {target}")
                done += count
                advance(count)
            copied += done
    return copied
