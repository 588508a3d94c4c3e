"""Compressions an artifact member may use, as streaming readers and writers.

The member's name says its compression: `.gz` (gzip), `.xz` (xz, which mender-artifact
calls lzma), `.zst` (zstd) or no suffix. Readers decompress into the caller's buffer
and never produce more than it asks for, so a decompression bomb cannot grow memory;
the reader above bounds the total by what the signed header promises.
"""

from __future__ import annotations

import enum
import lzma
import zlib
from typing import IO, BinaryIO, Protocol, cast

import zstandard

from otad.artifact.streams import Readable
from otad.errors import CompressionError, TruncatedArtifact, UsageError

_INPUT_SIZE = 256 * 1024


class Compression(enum.Enum):
    """A member compression; the value is the name used on the command line."""

    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"

    @property
    def suffix(self) -> str:
        return _SUFFIXES[self]

    @classmethod
    def from_name(cls, name: str) -> Compression:
        """Parse a command-line name; `lzma` is accepted as mender-artifact spells xz."""
        spelled = "xz" if name == "lzma" else name
        try:
            return cls(spelled)
        except ValueError:
            choices = ", ".join(c.value for c in cls)
            raise UsageError(f"unknown compression {name!r}, expected one of {choices}") from None


_SUFFIXES = {
    Compression.NONE: "",
    Compression.GZIP: ".gz",
    Compression.XZ: ".xz",
    Compression.ZSTD: ".zst",
}


def split_suffix(name: str, stem: str) -> Compression | None:
    """If `name` is `stem` plus a known compression suffix, return that compression."""
    for compression, suffix in _SUFFIXES.items():
        if name == stem + suffix:
            return compression
    return None


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int) -> bytes: ...


class _ZlibDecoder:
    """Adapts zlib's decompressobj to the max_length protocol lzma already has."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def unused_data(self) -> bytes:
        return self._inner.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        output = self._inner.decompress(self._tail + data, max_length)
        self._tail = self._inner.unconsumed_tail
        return output


class _ChunkedDecompressor:
    """A Readable that decompresses gzip or xz, including multi-member streams."""

    def __init__(self, source: Readable, compression: Compression, what: str) -> None:
        self._source = source
        self._compression = compression
        self._what = what
        self._decoder = self._new_decoder()
        self._input = bytearray(_INPUT_SIZE)
        self._pending = b""
        self._source_done = False

    def _new_decoder(self) -> _ZlibDecoder | lzma.LZMADecompressor:
        if self._compression is Compression.GZIP:
            return _ZlibDecoder()
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def _next_input(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._source_done:
            return b""
        count = self._source.readinto(memoryview(self._input)) or 0
        if not count:
            self._source_done = True
        return bytes(self._input[:count])

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            return self._readinto(buffer)
        except (zlib.error, lzma.LZMAError) as error:
            raise CompressionError(
                f"{self._what}: corrupt {self._compression.value} data: {error}"
            ) from None

    def _readinto(self, buffer: memoryview) -> int:
        while True:
            if self._decoder.eof and not self._start_next_member():
                return 0
            data = self._next_input() if self._decoder.needs_input else b""
            output = self._decoder.decompress(data, len(buffer))
            if output:
                buffer[: len(output)] = output
                return len(output)
            source_exhausted = not data and self._source_done and self._decoder.needs_input
            if source_exhausted and not self._decoder.eof:
                raise TruncatedArtifact(f"{self._what}: compressed stream ends early")

    def _start_next_member(self) -> bool:
        """After one gzip member or xz stream, start the next; False at the real end.

        Zero bytes after the last member are padding (xz requires tolerating it, gzip
        tools do), not another member.
        """
        rest = self._decoder.unused_data or self._next_input()
        while rest and not rest.strip(b"\0"):
            rest = self._next_input()
        if not rest:
            return False
        self._decoder = self._new_decoder()
        self._pending = rest
        return True


class _FileAdapter:
    """Gives a Readable the read() that zstandard's stream_reader wants."""

    def __init__(self, source: Readable) -> None:
        self._source = source

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(size if size > 0 else _INPUT_SIZE)
        count = self._source.readinto(memoryview(buffer)) or 0
        return bytes(buffer[:count])


class _ZstdDecompressor:
    def __init__(self, source: Readable, what: str) -> None:
        self._what = what
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], _FileAdapter(source)), read_size=_INPUT_SIZE, read_across_frames=True
        )

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            return int(self._reader.readinto(buffer))
        except zstandard.ZstdError as error:
            raise CompressionError(f"{self._what}: corrupt zstd data: {error}") from None


def open_decompressed(source: Readable, compression: Compression, what: str) -> Readable:
    """Wrap `source` so that reading it yields the decompressed bytes."""
    if compression is Compression.NONE:
        return source
    if compression is Compression.ZSTD:
        return _ZstdDecompressor(source, what)
    return _ChunkedDecompressor(source, compression, what)


class _Encoder(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class CompressingWriter:
    """A write-only stream that compresses into `sink`; call `finish()` at the end."""

    def __init__(self, sink: BinaryIO, compression: Compression, level: int | None = None) -> None:
        self._sink = sink
        self._encoder: _Encoder | None
        if compression is Compression.NONE:
            self._encoder = None
        elif compression is Compression.GZIP:
            # wbits 31 writes a gzip header with mtime 0 and no file name: reproducible.
            self._encoder = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
        elif compression is Compression.XZ:
            self._encoder = lzma.LZMACompressor(
                format=lzma.FORMAT_XZ, preset=6 if level is None else level
            )
        else:
            options = zstandard.ZstdCompressor(level=3 if level is None else level)
            self._encoder = options.compressobj()

    def write(self, data: bytes | memoryview) -> None:
        if self._encoder is None:
            self._sink.write(data)
        else:
            self._sink.write(self._encoder.compress(bytes(data)))

    def finish(self) -> None:
        if self._encoder is not None:
            self._sink.write(self._encoder.flush())
