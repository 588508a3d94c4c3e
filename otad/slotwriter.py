"""Writing a root filesystem image into a slot, carefully.

The slot is opened exclusively (O_EXCL on a block device fails while anything mounts or
holds it) and written at the offsets the payload dictates in large aligned blocks, with
direct I/O where the device allows it: the image does not pass through (and evict) the
page cache, which on a small device is most of its memory. The medium is flushed with
fsync every `fsync_interval` bytes and at the end; `synced` tells how much of the slot,
from its start, an fsync has made durable (the watermark a resumable download records).
The periodic fsyncs run on a flusher thread of their own while writing goes on: each
covers every write that had completed when it was asked for. The writer waits for a
flush only when it reaches the next watermark before the previous flush returned, so
flushing one interval overlaps writing the next, and `synced` never lags by more than
two intervals.

Blocks that already hold the right bytes are not rewritten: a reinstall of the same
release, or of one that shares most blocks, wears the flash less and finishes sooner.
Comparing costs a read, so after a run of blocks that differ (a fresh slot) the writer
compares only now and then, and returns to comparing every block when one matches. A
compare first reads the block's first page only and reads the rest only if that page
matches: a block that differs, the common case on a fresh slot, costs one small read.

Writes run on their own thread, so that the medium works while the artifact reader
decompresses and hashes the next block.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from otad.errors import DeviceError

log = logging.getLogger(__name__)

_QUEUE_DEPTH = 4
# Direct I/O needs buffers, offsets and lengths aligned to the logical block size; 4096
# covers every device otad writes (512-byte and 4K-sector disks, eMMC, SD cards).
_ALIGNMENT = 4096
# After this many differing blocks in a row, compare only one block in _PROBE_EVERY.
_MISSES_BEFORE_PROBING = 4
_PROBE_EVERY = 64


class _Comparer:
    """Decides which blocks are worth reading back before they are written."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._misses = 0
        self._since_probe = 0

    def should_compare(self) -> bool:
        if not self._enabled:
            return False
        if self._misses < _MISSES_BEFORE_PROBING:
            return True
        self._since_probe += 1
        if self._since_probe >= _PROBE_EVERY:
            self._since_probe = 0
            return True
        return False

    def record(self, matched: bool) -> None:
        self._misses = 0 if matched else self._misses + 1


class SlotWriter:
    """Context manager: `write(block)` appends, `finish()` flushes and reports."""

    def __init__(
        self,
        device: Path,
        fsync_interval: int = 64 << 20,
        skip_identical: bool = True,
        on_synced: Callable[[int], None] | None = None,
    ) -> None:
        """`on_synced(watermark)` runs on the flusher thread after each periodic fsync."""
        self.device = device
        self._fsync_interval = fsync_interval
        self._on_synced = on_synced
        self._comparer = _Comparer(skip_identical)
        self._descriptor = -1
        self._direct = False
        self._offset = 0
        self._since_fsync = 0
        self.written = 0
        self.skipped = 0
        # Bytes from the start of the slot that are on the medium: every block before
        # this offset was written or found identical, and an fsync followed. Set by the
        # writer thread; an int, so other threads read it whole.
        self.synced = 0
        self._queue: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        self._buffer_size = 0
        # The writer thread's buffer for reading blocks back (_holds), reused: a fresh
        # mapping per compare would fault in and zero every page of it each time.
        self._scratch: mmap.mmap | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # The flusher's work: fsync once the writer asked for a watermark beyond `synced`.
        self._flush_wanted = 0
        self._flush_condition = threading.Condition()
        self._flusher: threading.Thread | None = None
        self._closing = False

    def __enter__(self) -> SlotWriter:
        self._descriptor = self._open(os.O_DIRECT)
        self._direct = self._descriptor >= 0
        if not self._direct:
            self._descriptor = self._open(0)
        self._thread = threading.Thread(target=self._run, name="otad-slot-writer", daemon=True)
        self._thread.start()
        self._flusher = threading.Thread(
            target=self._flush_loop, name="otad-slot-flusher", daemon=True
        )
        self._flusher.start()
        return self

    def _open(self, extra: int) -> int:
        """Open the slot exclusively; -1 when `extra` flags are refused (no O_DIRECT)."""
        try:
            return os.open(self.device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC | extra)
        except OSError as error:
            if error.errno == errno.EINVAL and extra:
                return -1
            if error.errno == errno.EBUSY:
                raise DeviceError(
                    f"{self.device} is in use (mounted or held); not writing"
                ) from None
            raise DeviceError(f"cannot open {self.device}: {error.strerror}") from None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()
        os.close(self._descriptor)
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def write(self, block: bytes | memoryview) -> None:
        """Queue `block` for the next offset; raises the writer thread's error, if any."""
        if self._error is not None:
            raise self._error
        buffer = self._take_buffer(len(block))
        buffer[: len(block)] = block
        self._queue.put((buffer, len(block)))

    def _take_buffer(self, size: int) -> mmap.mmap:
        # Anonymous mappings are page-aligned, as direct I/O needs. Blocks keep one size
        # (the payload's chunk size) except the last, so a small pool serves them all.
        if size > self._buffer_size:
            self._buffer_size = -(-size // _ALIGNMENT) * _ALIGNMENT
            while not self._free.empty():
                self._free.get_nowait().close()
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            return mmap.mmap(-1, self._buffer_size)
        if len(buffer) < size:
            buffer.close()
            return mmap.mmap(-1, self._buffer_size)
        return buffer

    def finish(self) -> None:
        """Wait for every queued block, fsync, and raise any write error."""
        self._stop()
        if self._error is not None:
            raise self._error
        os.fsync(self._descriptor)
        self.synced = self._offset
        if self._error is not None:
            raise self._error  # a periodic fsync that failed is not undone by this one
        log.info(
            "wrote %d bytes to %s (%s I/O), %d bytes already right and skipped",
            self.written,
            self.device,
            "direct" if self._direct else "buffered",
            self.skipped,
        )

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._flusher is not None:
            with self._flush_condition:
                self._closing = True
                self._flush_condition.notify()
            self._flusher.join()
            self._flusher = None

    def _request_flush(self, watermark: int) -> None:
        """Ask the flusher to make the slot durable up to `watermark`.

        Returns at once unless the previous flush (and its `on_synced`) is still running.
        """
        with self._flush_condition:
            while self._flush_wanted > self.synced and self._error is None:
                self._flush_condition.wait()
            self._flush_wanted = watermark
            self._flush_condition.notify_all()

    def _flush_loop(self) -> None:
        while True:
            with self._flush_condition:
                while self._flush_wanted <= self.synced and not self._closing:
                    self._flush_condition.wait()
                if self._closing:
                    return
                watermark = self._flush_wanted
            try:
                self._flush(watermark)
            except BaseException as error:  # raised again by the next write or finish()
                with self._flush_condition:
                    if self._error is None:
                        self._error = error
                    self._flush_condition.notify_all()
                return

    def _flush(self, watermark: int) -> None:
        try:
            os.fsync(self._descriptor)
        except OSError as error:
            raise DeviceError(f"flushing {self.device} failed: {error.strerror}") from None
        if self._on_synced is not None:
            self._on_synced(watermark)
        with self._flush_condition:
            self.synced = watermark
            self._flush_condition.notify_all()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            buffer, length = item
            if self._error is None:
                try:
                    self._write_at(self._offset, buffer, length)
                except OSError as error:
                    self._error = DeviceError(
                        f"writing {self.device} at byte {self._offset} failed: {error.strerror}"
                    )
            self._offset += length
            self._free.put(buffer)

    def _write_at(self, offset: int, buffer: mmap.mmap, length: int) -> None:
        view = memoryview(buffer)[:length]
        try:
            if self._comparer.should_compare():
                matched = self._holds(offset, view)
                self._comparer.record(matched)
                if matched:
                    self.skipped += length
                    return
            aligned = self._aligned_part(offset, length)
            self._pwrite_all(self._descriptor, view[:aligned], offset)
            if aligned < length:
                self._write_tail(view[aligned:], offset + aligned)
        finally:
            view.release()
        self.written += length
        self._since_fsync += length
        if self._since_fsync >= self._fsync_interval:
            self._since_fsync = 0
            self._request_flush(offset + length)

    def _aligned_part(self, offset: int, length: int) -> int:
        """How many of `length` bytes at `offset` can go through the direct descriptor."""
        if not self._direct:
            return length
        if offset % _ALIGNMENT:
            return 0
        return length - length % _ALIGNMENT

    def _holds(self, offset: int, expected: memoryview) -> bool:
        """True when the slot already has `expected` at `offset`.

        The first page is read and compared on its own first: when it differs, as it does
        for nearly every block of a fresh or different slot, the other 255 pages of a
        1 MiB block are never read.
        """
        size = -(-len(expected) // _ALIGNMENT) * _ALIGNMENT
        if self._scratch is None or len(self._scratch) < size:
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = mmap.mmap(-1, size)
        with memoryview(self._scratch) as scratch:
            head = min(_ALIGNMENT, len(expected))
            if size > _ALIGNMENT:
                count = os.preadv(self._descriptor, [scratch[:_ALIGNMENT]], offset)
                if count < head or not _same(scratch[:head], expected[:head]):
                    return False
                rest = os.preadv(self._descriptor, [scratch[_ALIGNMENT:size]], offset + _ALIGNMENT)
                count += rest
            else:
                count = os.preadv(self._descriptor, [scratch[:size]], offset)
            length = len(expected)
            return count >= length and _same(scratch[:length], expected)

    def _write_tail(self, tail: memoryview, offset: int) -> None:
        """The unaligned end of the image, through a buffered descriptor."""
        descriptor = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._pwrite_all(descriptor, tail, offset)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    @staticmethod
    def _pwrite_all(descriptor: int, view: memoryview, offset: int) -> None:
        while view:
            count = os.pwrite(descriptor, view, offset)
            view = view[count:]
            offset += count


def _same(first: memoryview, second: memoryview) -> bool:
    """True when two byte views of the same length hold the same bytes.

    memoryview's `==` compares byte by byte in Python's item-unpacking loop (about
    0.8 ms per MiB); seen as 8-byte words, the same comparison is several times faster,
    and it copies nothing, unlike `bytes(first) == bytes(second)`.
    """
    if len(first) != len(second):
        return False
    words = len(first) - len(first) % 8
    if words and first[:words].cast("Q") != second[:words].cast("Q"):
        return False
    return first[words:].tobytes() == second[words:].tobytes()


def read_back_sha256(device: Path, size: int) -> str:
    """SHA-256 of the first `size` bytes of `device`, read from the medium."""
    digest = hashlib.sha256()
    descriptor = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Drop cached pages so the bytes come from the medium, not from memory.
        os.posix_fadvise(descriptor, 0, size, os.POSIX_FADV_DONTNEED)
        left = size
        while left:
            chunk = os.read(descriptor, min(left, 1 << 20))
            if not chunk:
                raise DeviceError(f"{device} ends {left} bytes before the payload's end")
            digest.update(chunk)
            left -= len(chunk)
    finally:
        os.close(descriptor)
    return digest.hexdigest()
