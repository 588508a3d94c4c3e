"""Power-safe writes of the small files that hold a bootloader's state.

Two ways, because bootloaders differ in what survives a cut: `write_atomically` (temp
file, fsync, rename, fsync of the directory) for files only Linux writes, and
`overwrite_in_place` for fixed-size blocks that a bootloader also rewrites in place
(GRUB's save_env needs the file's blocks to stay where they are).
"""

from __future__ import annotations

import os
from pathlib import Path

from otad.errors import BootloaderIOError


def read_bytes(path: Path) -> bytes | None:
    """The content of `path`, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BootloaderIOError(str(path), "read", err.strerror or str(err)) from err


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: a cut leaves either the old or the new file."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        _write_file(temp, data, os.O_CREAT | os.O_TRUNC)
        os.replace(temp, path)
        fsync_directory(path.parent)
    except OSError as err:
        raise BootloaderIOError(str(path), "write", err.strerror or str(err)) from err


def overwrite_in_place(path: Path, data: bytes) -> None:
    """Write `data` over the same-sized file `path` without moving its blocks.

    A cut leaves a prefix of `data` over the old bytes; the formats written this way are
    designed so that such a mix is detected. A missing file, or one of another size, is
    created atomically instead (nothing can have relied on it).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = -1
    except OSError as err:
        raise BootloaderIOError(str(path), "inspect", err.strerror or str(err)) from err
    if size != len(data):
        write_atomically(path, data)
        return

    try:
        _write_file(path, data, 0)
    except OSError as err:
        raise BootloaderIOError(str(path), "write", err.strerror or str(err)) from err


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new name in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o644)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
