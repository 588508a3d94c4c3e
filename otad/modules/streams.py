"""The Download state: handing payload files to a module through FIFOs, or into files/.

otad creates `stream-next` before it starts the module, then waits for the module to
open it. A module that exits 0 without ever opening it has chosen the files tree: otad
then writes every payload file into `files/`. A module that opens it is served one file
at a time, in the order the v3 file API fixes:

1. otad opens `stream-next`, creates the FIFO `streams/NAME`, writes the line
   `streams/NAME` (with ` SIZE` under DownloadWithFileSizes) and closes `stream-next`;
2. the module opens `streams/NAME` and reads the file to its end;
3. after the last file, otad opens `stream-next` and closes it at once, which the
   module reads as zero bytes: there are no more files.

Every block otad writes has already been verified by the artifact reader. Waiting for
the module to open a FIFO is a poll (a non-blocking open fails with ENXIO until a
reader is there), so a module that exits or hangs is noticed and never blocks otad past
its deadline.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from otad.artifact.reader import PayloadFile
from otad.errors import EnvironmentProblem
from otad.modules.process import ModuleCall
from otad.modules.tree import FileTree, fsync_directory

log = logging.getLogger(__name__)

_POLL_START = 0.001  # seconds between attempts to open a FIFO, doubling up to _POLL_MAX
_POLL_MAX = 0.02


class DownloadMode(enum.Enum):
    """How the module received its payload files."""

    STREAMS = "streams"
    FILES = "files"


class _ModuleExited(Exception):
    """The module exited while otad waited for it to open or read a FIFO."""


def prepare_streams(tree: FileTree) -> None:
    """Create `stream-next` and `streams/` before the module starts."""
    tree.remove_streams()
    try:
        tree.streams.mkdir(mode=0o700)
        os.mkfifo(tree.stream_next, 0o600)
    except OSError as error:
        raise EnvironmentProblem(
            f"cannot create the stream FIFOs in {tree.root}: {error.strerror}"
        ) from None


def serve(
    call: ModuleCall, tree: FileTree, files: Iterable[PayloadFile], sizes: bool
) -> DownloadMode:
    """Feed `files` to the module running Download; return how it took them.

    Raises ModuleError (with ModuleTimeout and ModuleProtocolError) for the module's
    failures; errors of the artifact itself propagate from the reader unchanged. The
    caller kills the module when anything is raised.
    """
    iterator = iter(files)
    try:
        descriptor = _open_writer(tree.stream_next, call)
    except _ModuleExited:
        call.wait()
        log.debug("%s did not open stream-next: storing the payload in files/", call.module)
        tree.remove_streams()
        store_files(tree, iterator)
        return DownloadMode.FILES
    try:
        _stream_all(call, tree, iterator, descriptor, sizes)
    except _ModuleExited:
        call.wait()
        raise call.protocol_error(
            "it exited 0 before reading every stream and the end of stream-next"
        ) from None
    call.wait()
    tree.remove_streams()
    return DownloadMode.STREAMS


def _stream_all(
    call: ModuleCall, tree: FileTree, files: Iterator[PayloadFile], descriptor: int, sizes: bool
) -> None:
    """Serve every file; `descriptor` is stream-next, already opened for the first one."""
    for payload_file in files:
        stream = tree.stream(payload_file.name)
        os.mkfifo(stream, 0o600)
        line = f"streams/{payload_file.name}"
        if sizes:
            line += f" {payload_file.size}"
        try:
            _write_all(descriptor, memoryview(f"{line}\n".encode()), call)
        finally:
            os.close(descriptor)
        log.debug(
            "streaming %s (%d bytes) to %s", payload_file.name, payload_file.size, call.module
        )
        _stream_file(call, stream, payload_file)
        descriptor = _open_writer(tree.stream_next, call)
    os.close(descriptor)


def _stream_file(call: ModuleCall, stream: Path, payload_file: PayloadFile) -> None:
    descriptor = _open_writer(stream, call)
    try:
        for block in payload_file.blocks():
            _write_all(descriptor, block, call)
    finally:
        os.close(descriptor)


def _open_writer(path: Path, call: ModuleCall) -> int:
    """Open the FIFO `path` for writing once the module has opened it for reading."""
    delay = _POLL_START
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise EnvironmentProblem(f"cannot open the FIFO {path}: {error.strerror}") from None
        if call.poll() is not None:
            raise _ModuleExited
        call.check_deadline()
        time.sleep(min(delay, call.remaining))
        delay = min(delay * 2, _POLL_MAX)


def _write_all(descriptor: int, data: memoryview, call: ModuleCall) -> None:
    while data:
        try:
            data = data[os.write(descriptor, data) :]
            continue
        except BlockingIOError:
            pass
        except BrokenPipeError:
            raise _ModuleExited from None
        _, writable, _ = select.select([], [descriptor], [], call.remaining)
        if not writable:
            call.check_deadline()


def store_files(tree: FileTree, files: Iterable[PayloadFile]) -> None:
    """Write every payload file into `files/`, synced, for a module that did not stream."""
    try:
        tree.files.mkdir(mode=0o700, exist_ok=True)
        for payload_file in files:
            _store_file(tree.file(payload_file.name), payload_file)
        fsync_directory(tree.files)
    except OSError as error:
        raise EnvironmentProblem(
            f"cannot store payload files in {tree.files}: {error.strerror}"
        ) from None


def _store_file(path: Path, payload_file: PayloadFile) -> None:
    log.debug("storing %s (%d bytes) in %s", payload_file.name, payload_file.size, path)
    with path.open("xb") as out:
        for block in payload_file.blocks():
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
