"""Where an artifact the daemon reads comes from: a path it opens, a descriptor passed to
it, or an https URL it downloads (otad.download, streamed straight into the engine,
which resumes an interrupted download: otad.resume).

Paths and descriptors become a binary file object the engine reads from. A path must be
absolute and name a regular file: the daemon never opens a FIFO or a device a caller
points it at, which could block it or read a disk. A passed descriptor may be a pipe
(`otactl install -`).
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, cast

from otad.errors import UsageError

if TYPE_CHECKING:
    from otad.download import DownloadSettings, HttpSource

# What the engine reads an artifact from: a file object, or a download.
Source: TypeAlias = "BufferedReader | HttpSource"

_URL_SCHEMES = ("http://", "https://")


def is_url(text: str) -> bool:
    return text.startswith(_URL_SCHEMES)


def open_source(text: str, download: DownloadSettings | None) -> Source:
    """An absolute path opened for reading, or an http(s) URL streamed as it is read."""
    if not is_url(text):
        return open_path(text)
    # Imported here so that a device that never downloads does not load requests.
    from otad.download import DownloadSettings, HttpSource

    return HttpSource(text, download or DownloadSettings())


def as_download(source: object) -> HttpSource | None:
    """`source` if it is a download (an HttpSource), else None.

    A download exists only once otad.download is imported, so a device that never
    downloads does not import it (and requests) for this question.
    """
    download = sys.modules.get("otad.download")
    if download is not None and isinstance(source, download.HttpSource):
        return cast("HttpSource", source)
    return None


def open_path(text: str) -> BufferedReader:
    """Open the artifact at the absolute path `text` for reading; UsageError if it cannot be."""
    if is_url(text):
        raise UsageError(f"{text}: a URL where a local file is needed")
    if not os.path.isabs(text):
        raise UsageError(f"{text!r} is not an absolute path")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        descriptor = os.open(text, flags)
    except OSError as error:
        raise UsageError(f"cannot open {text}: {error.strerror}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{text} is not a regular file")
        os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return open(descriptor, "rb")  # the caller owns and closes it


def open_descriptor(descriptor: int) -> BufferedReader:
    """Take ownership of a passed descriptor that must be open for reading."""
    try:
        access = fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE
        mode = os.fstat(descriptor).st_mode
    except OSError as error:
        os.close(descriptor)
        raise UsageError(f"the passed file descriptor is not usable: {error.strerror}") from None
    if access not in (os.O_RDONLY, os.O_RDWR):
        os.close(descriptor)
        raise UsageError("the passed file descriptor is not open for reading")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        os.close(descriptor)
        raise UsageError("the passed file descriptor is not a file, a pipe or a socket")
    os.set_blocking(descriptor, True)
    return open(descriptor, "rb")  # the caller owns and closes it


def is_seekable(source: Source) -> bool:
    """True for a regular file, which can be read twice (checked, then installed)."""
    if not isinstance(source, BufferedReader):
        return False  # a download is checked as it streams
    return stat.S_ISREG(os.fstat(source.fileno()).st_mode)


def is_public(source: BufferedReader) -> bool:
    """True when every user may read the opened file (and search every directory above it).

    The check is made on what was opened, not on the name, so that a symbolic link
    swapped in after the check cannot point the daemon at a private file.
    """
    descriptor = source.fileno()
    try:
        if not os.fstat(descriptor).st_mode & stat.S_IROTH:
            return False
        real = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False
