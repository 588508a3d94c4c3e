"""Writing a root filesystem image into a slot, carefully.

The slot is opened exclusively (O_EXCL on a block device fails while anything mounts or
holds it), written at the offsets the payload dictates in large aligned blocks, and
flushed to the medium with fsync every `fsync_interval` bytes and at the end. Blocks
that already hold the right bytes are not rewritten: a reinstall of the same release,
or of one that shares most blocks, wears the flash less and finishes sooner.

Writes run on their own thread, so that the medium works while the artifact reader
decompresses and hashes the next block.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import threading
from pathlib import Path
from types import TracebackType

from otad.errors import DeviceError

log = logging.getLogger(__name__)

_QUEUE_DEPTH = 4


class SlotWriter:
    """Context manager: `write(block)` appends, `finish()` flushes and reports."""

    def __init__(
        self, device: Path, fsync_interval: int = 64 << 20, skip_identical: bool = True
    ) -> None:
        self.device = device
        self._fsync_interval = fsync_interval
        self._skip_identical = skip_identical
        self._descriptor = -1
        self._offset = 0
        self._since_fsync = 0
        self.written = 0
        self.skipped = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SlotWriter:
        try:
            self._descriptor = os.open(self.device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as error:
            if error.errno == errno.EBUSY:
                raise DeviceError(
                    f"{self.device} is in use (mounted or held); not writing"
                ) from None
            raise DeviceError(f"cannot open {self.device}: {error.strerror}") from None
        self._thread = threading.Thread(target=self._run, name="otad-slot-writer", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()
        os.close(self._descriptor)

    def write(self, block: bytes | memoryview) -> None:
        """Queue `block` for the next offset; raises the writer thread's error, if any."""
        if self._error is not None:
            raise self._error
        self._queue.put(bytes(block))

    def finish(self) -> None:
        """Wait for every queued block, fsync, and raise any write error."""
        self._stop()
        if self._error is not None:
            raise self._error
        os.fsync(self._descriptor)
        log.info(
            "wrote %d bytes to %s, %d bytes already right and skipped",
            self.written,
            self.device,
            self.skipped,
        )

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                self._write_at(self._offset, block)
            except OSError as error:
                self._error = DeviceError(
                    f"writing {self.device} at byte {self._offset} failed: {error.strerror}"
                )
            self._offset += len(block)

    def _write_at(self, offset: int, block: bytes) -> None:
        if self._skip_identical and os.pread(self._descriptor, len(block), offset) == block:
            self.skipped += len(block)
            return
        view = memoryview(block)
        while view:
            count = os.pwrite(self._descriptor, view, offset)
            view = view[count:]
            offset += count
        self.written += len(block)
        self._since_fsync += len(block)
        if self._since_fsync >= self._fsync_interval:
            os.fsync(self._descriptor)
            self._since_fsync = 0


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
