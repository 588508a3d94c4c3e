"""A strict, forward-only tar reader with bounded memory.

The Mender Artifact format nests tar archives. Python's tarfile reads pax headers of any
size into memory and accepts links and devices; an updater must not. This reader knows
exactly what an artifact may contain (regular files, directories, the pax and GNU
long-name records that writers use for long names and big sizes) and refuses the rest
with an error that names the member.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from otad.artifact.streams import Readable, read_exactly, read_into_fully, skip_exactly
from otad.errors import LimitExceeded, MalformedArtifact, TruncatedArtifact, UnsafePath

BLOCK = 512
MAX_EXTENDED_HEADER = 64 * 1024
# All pax and long-name records of one archive together: an artifact needs a few
# hundred bytes of them; a stream of them is a way to make a reader parse forever.
MAX_EXTENDED_TOTAL = 1 << 20
MAX_TRAILING_ZEROS = 1 << 20

_ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(r"[0-9]+")


class EntryType(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"


@dataclass(frozen=True)
class TarEntry:
    """One member: its name, size, and where its data starts in the tar stream."""

    name: str
    size: int
    type: EntryType
    data_offset: int


def _parse_number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        # GNU base-256: big-endian two's complement with the top bit as marker.
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        if field[0] & 0x40:
            raise MalformedArtifact(f"{what} is negative")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    # int() would also take a sign, underscores and inner spaces: "-1" is no size.
    if not _OCTAL.fullmatch(text):
        raise MalformedArtifact(f"{what} is not an octal number: {text!r}")
    return int(text, 8)


def _header_checksum_ok(block: bytes) -> bool:
    stored = _parse_number(block[148:156], "tar header checksum")
    blanked = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def _parse_pax(data: bytes, what: str) -> dict[str, str]:
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            raise MalformedArtifact(f"{what}: pax record without a length")
        try:
            length = int(data[position:space])
        except ValueError:
            raise MalformedArtifact(f"{what}: pax record length is not a number") from None
        record = data[space + 1 : position + length]
        overruns = position + length > len(data)
        if length <= 0 or overruns or not record.endswith(b"\n") or b"=" not in record:
            raise MalformedArtifact(f"{what}: malformed pax record at byte {position}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def check_safe_name(name: str, what: str) -> str:
    """Return `name` without a trailing slash, refusing absolute and climbing paths."""
    if not name or "\0" in name:
        raise UnsafePath(f"{what}: empty member name or a NUL byte in {name!r}")
    if name.startswith("/"):
        raise UnsafePath(f"{what}: absolute member name {name!r}, expected a relative one")
    trimmed = name.rstrip("/")
    parts = trimmed.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"{what}: member name {name!r} has an empty, '.' or '..' component")
    return trimmed


class TarReader:
    """Reads a tar archive front to back from a Readable.

    `next_entry()` returns each member in turn (None at the end-of-archive marker);
    `readinto()` reads the current member's data. Unread data of a member is skipped
    when the next member is requested.
    """

    def __init__(self, source: Readable, what: str) -> None:
        self._source = source
        self.what = what
        self.position = 0
        self._remaining = 0
        self._padding = 0
        self._entry: TarEntry | None = None
        self._ended = False
        self._extended_total = 0

    def _read(self, size: int, what: str) -> bytes:
        data = read_exactly(self._source, size, what)
        self.position += size
        return data

    def _skip(self, size: int, what: str) -> None:
        skip_exactly(self._source, size, what)
        self.position += size

    def _read_header_block(self) -> bytes | None:
        block = bytearray(BLOCK)
        count = read_into_fully(self._source, memoryview(block))
        self.position += count
        if count == 0:
            raise TruncatedArtifact(f"{self.what} ends without an end-of-archive marker")
        if count < BLOCK:
            raise TruncatedArtifact(f"{self.what} ends inside a tar header")
        if block == _ZERO_BLOCK:
            return None
        if not _header_checksum_ok(bytes(block)):
            raise MalformedArtifact(
                f"{self.what}: bad tar header checksum at byte {self.position - BLOCK}"
            )
        return bytes(block)

    def _read_extended(self, size: int, what: str) -> bytes:
        if size > MAX_EXTENDED_HEADER:
            raise LimitExceeded(
                f"{self.what}: {what} of {size} bytes, at most {MAX_EXTENDED_HEADER} allowed"
            )
        self._extended_total += size
        if self._extended_total > MAX_EXTENDED_TOTAL:
            raise LimitExceeded(
                f"{self.what}: more than {MAX_EXTENDED_TOTAL} bytes of pax and long-name records"
            )
        data = self._read(size, f"{self.what} {what}")
        self._skip(-size % BLOCK, f"{self.what} {what}")
        return data

    def next_entry(self) -> TarEntry | None:
        """Advance to the next member; None once the end-of-archive marker is read."""
        if self._ended:
            return None
        self._finish_member()
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            block = self._read_header_block()
            if block is None:
                self._ended = True
                self._entry = None
                return None
            kind = block[156:157]
            size = _parse_number(block[124:136], f"{self.what}: tar size field")
            if kind == b"x":
                pax.update(_parse_pax(self._read_extended(size, "pax header"), self.what))
                continue
            if kind == b"g":
                self._read_extended(size, "global pax header")
                continue
            if kind == b"L":
                raw = self._read_extended(size, "GNU long name")
                long_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            return self._make_entry(block, kind, size, long_name, pax)

    def _make_entry(
        self, block: bytes, kind: bytes, size: int, long_name: str | None, pax: dict[str, str]
    ) -> TarEntry:
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        name = pax.get("path", long_name or name)
        if "size" in pax:
            if not _DECIMAL.fullmatch(pax["size"]):
                raise MalformedArtifact(f"{self.what}: pax size {pax['size']!r}")
            size = int(pax["size"])
        if kind in (b"0", b"\0", b"7"):
            entry_type = EntryType.FILE
        elif kind == b"5":
            entry_type = EntryType.DIRECTORY
        else:
            raise MalformedArtifact(
                f"{self.what}: member {name!r} has tar type {kind!r}; "
                "only regular files and directories are allowed"
            )
        safe = check_safe_name(name, self.what)
        self._entry = TarEntry(safe, size, entry_type, self.position)
        self._remaining = size
        self._padding = -size % BLOCK
        return self._entry

    def _finish_member(self) -> None:
        if self._entry is not None:
            what = f"{self.what} member {self._entry.name}"
            self._skip(self._remaining, what)
            self._skip(self._padding, what)
        self._remaining = 0
        self._padding = 0
        self._entry = None

    def readinto(self, buffer: memoryview, /) -> int:
        """Read from the current member; 0 once its data is exhausted."""
        if not self._remaining:
            return 0
        view = buffer[: min(len(buffer), self._remaining)]
        count = self._source.readinto(view) or 0
        if not count:
            name = self._entry.name if self._entry else "?"
            raise TruncatedArtifact(
                f"{self.what} member {name} ends {self._remaining} bytes before its declared end"
            )
        self._remaining -= count
        self.position += count
        return count

    def read_member(self, limit: int) -> bytes:
        """Read the whole current member, refusing one larger than `limit` bytes."""
        entry = self._entry
        assert entry is not None
        if entry.size > limit:
            raise LimitExceeded(
                f"{self.what} member {entry.name} is {entry.size} bytes, at most {limit} allowed"
            )
        data = self._read(entry.size, f"{self.what} member {entry.name}")
        self._remaining = 0
        return data

    def check_trailer(self) -> None:
        """After the end marker, accept only zero padding up to a bound, then the end."""
        scratch = memoryview(bytearray(64 * 1024))
        seen = 0
        while True:
            count = self._source.readinto(scratch) or 0
            if not count:
                return
            if scratch[:count].tobytes() != bytes(count):
                raise MalformedArtifact(
                    f"{self.what}: data after the end-of-archive marker at byte {self.position}"
                )
            seen += count
            self.position += count
            if seen > MAX_TRAILING_ZEROS:
                raise LimitExceeded(
                    f"{self.what}: more than {MAX_TRAILING_ZEROS} bytes of padding after the end"
                )
