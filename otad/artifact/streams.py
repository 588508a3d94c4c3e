"""Byte-stream plumbing shared by the artifact reader and writer.

Everything the reader consumes is a `Readable`: an object with `readinto`, as files,
sockets and urllib3 responses have. The helpers here read exactly, skip, and run a
stream ahead on a second thread so that decompression overlaps hashing.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

from otad.errors import TruncatedArtifact

BLOCK_SIZE = 1 << 20


class Readable(Protocol):
    """A source of bytes; `readinto` returns 0 only at the end of the stream."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def read_into_fully(source: Readable, buffer: memoryview) -> int:
    """Fill `buffer` from `source`; return fewer bytes only at the end of the stream."""
    filled = 0
    while filled < len(buffer):
        count = source.readinto(buffer[filled:])
        if not count:
            break
        filled += count
    return filled


def read_exactly(source: Readable, size: int, what: str) -> bytes:
    """Read `size` bytes or raise TruncatedArtifact naming `what`."""
    buffer = bytearray(size)
    count = read_into_fully(source, memoryview(buffer))
    if count < size:
        raise TruncatedArtifact(f"{what} ends after {count} of {size} bytes")
    return bytes(buffer)


def skip_exactly(source: Readable, size: int, what: str) -> None:
    """Discard `size` bytes of `source` or raise TruncatedArtifact."""
    scratch = memoryview(bytearray(min(size, BLOCK_SIZE) or 1))
    left = size
    while left:
        count = source.readinto(scratch[: min(left, len(scratch))])
        if not count:
            raise TruncatedArtifact(f"{what} ends {left} bytes before its declared end")
        left -= count


class BytesSource:
    """A Readable over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._position = 0

    def readinto(self, buffer: memoryview, /) -> int:
        count = min(len(buffer), len(self._view) - self._position)
        buffer[:count] = self._view[self._position : self._position + count]
        self._position += count
        return count


_END = object()


class Prefetcher:
    """Reads a source ahead on its own thread, a bounded number of blocks at a time.

    The thread does the reading (and, for a decompressing source, the decompression)
    while the caller hashes and hands on the previous block. zlib, lzma, zstandard and
    hashlib all release the GIL on large buffers, so the two really run in parallel.
    Memory stays bounded: at most `depth` blocks wait in the queue. Blocks the caller has
    used up go back to a pool the thread fills again: a new 1 MiB bytearray per block
    would be zeroed first (a wasted pass over memory) and then filled.
    """

    def __init__(self, source: Readable, block_size: int = BLOCK_SIZE, depth: int = 4) -> None:
        self._source = source
        self._block_size = block_size
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._current = memoryview(b"")
        self._current_block: bytearray | None = None
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="otad-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    block = self._free.get_nowait()
                except queue.Empty:
                    block = bytearray(self._block_size)
                count = read_into_fully(self._source, memoryview(block))
                if count and not self._put((block, count)):
                    return
                if count < self._block_size:
                    self._put(_END)
                    return
        except BaseException as error:  # handed to the reading thread, re-raised there
            self._put(error)

    def readinto(self, buffer: memoryview, /) -> int:
        while not self._current:
            if self._current_block is not None:
                self._current.release()  # no view left on it, so the thread may refill it
                self._free.put(self._current_block)
                self._current_block = None
            if self._finished:
                return 0
            item = self._queue.get()
            if item is _END:
                self._finished = True
                return 0
            if isinstance(item, BaseException):
                self._finished = True
                raise item
            assert isinstance(item, tuple)
            block, length = item
            assert isinstance(block, bytearray)
            assert isinstance(length, int)
            self._current_block = block
            self._current = memoryview(block)[:length]
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        return count

    def close(self) -> None:
        """Stop the thread and wait for it; safe to call more than once.

        A read already in progress is waited for, so a source must not block forever.
        """
        # TODO: give network sources a read timeout when downloads stream through the
        # reader, so that close() after a stalled connection returns.
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
