"""Compressions an artifact member may use, as streaming readers and writers.

The member's name says its compression: `.gz` (gzip), `.xz` (xz, which mender-artifact
calls lzma), `.zst` (zstd) or no suffix. Readers decompress into the caller's buffer
and never produce more than it asks for, so a decompression bomb cannot grow memory;
the reader above bounds the total by what the signed header promises.

A compressed stream may be several gzip members, xz streams or zstd frames one after the
other, which every decompressor reads as one stream. The writer can end one and start
the next at chosen places (`CompressingWriter.start_members_at`), and the readers note
where each starts (`Decompressor.boundaries`): a fresh decoder started there, in the
middle of the compressed stream, yields the rest of the decompressed stream. That is
what lets an interrupted download of a compressed image resume (otad.resume).
"""

from __future__ import annotations

import collections
import enum
import lzma
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, BinaryIO, NamedTuple, Protocol, cast

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


class Boundary(NamedTuple):
    """Where a gzip member, xz stream or zstd frame starts: its offset in the compressed
    stream and the offset of its first byte in the decompressed stream."""

    compressed: int
    decompressed: int


class Decompressor:
    """A Readable of decompressed bytes that notes where each member or frame starts.

    `boundaries` grows as reading passes them (the first is (0, 0)); a fresh decoder
    started at one's compressed offset yields the decompressed stream from its
    decompressed offset on. It may be asked from another thread while this one reads.
    """

    def __init__(self) -> None:
        self._found: list[Boundary] = [Boundary(0, 0)]

    @property
    def boundaries(self) -> list[Boundary]:
        return list(self._found)

    def readinto(self, buffer: memoryview, /) -> int:
        raise NotImplementedError


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


class _ChunkedDecompressor(Decompressor):
    """A Readable that decompresses gzip or xz, including multi-member streams."""

    def __init__(self, source: Readable, compression: Compression, what: str) -> None:
        super().__init__()
        self._source = source
        self._compression = compression
        self._what = what
        self._decoder = self._new_decoder()
        self._input = bytearray(_INPUT_SIZE)
        self._pending = b""
        self._source_done = False
        self._read = 0  # compressed bytes read from the source
        self._produced = 0  # decompressed bytes returned

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
        self._read += count
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
                self._produced += len(output)
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
        # Nothing else is buffered here: the member that ended had consumed all its input.
        self._found.append(Boundary(self._read - len(rest), self._produced))
        return True


class _FrameInput:
    """Gives zstandard's stream_reader the read() it wants over one frame, copying nothing.

    Each read returns a view of the frame walker's buffer, which stays valid until the
    next read: the stream reader asks for more input only once it has consumed the last.
    """

    def __init__(self, frames: _ZstdFrames) -> None:
        self._frames = frames

    def read(self, size: int = -1) -> memoryview:
        return self._frames.read_view(size if size > 0 else _INPUT_SIZE)


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # up to 0x184D2A5F
_DICTIONARY_ID_SIZES = (0, 1, 2, 4)
_CONTENT_SIZE_SIZES = (0, 2, 4, 8)
# The longest part of a frame read at once to parse it: a skippable frame's header.
_LONGEST_PEEK = 8


class _ZstdFrames:
    """A Readable over the current zstd frame of `source`: it ends where the frame ends.

    It walks the frame's structure (RFC 8878: header, block headers, checksum) without
    decompressing, so it knows exactly where each frame ends in the compressed stream;
    `next_frame()` moves on to the next one (skipping skippable frames).

    The compressed bytes are read into one fixed buffer and handed on from there, as
    views (`read_view`, for the decoder) or copied (`readinto`): a fixed buffer, not one
    that grows and shrinks, so a view handed on stays valid while the walker reads on.
    """

    def __init__(self, source: Readable, what: str) -> None:
        self._source = source
        self._what = what
        self._data = bytearray(_INPUT_SIZE)
        self._view = memoryview(self._data)
        self._start = 0  # the buffered bytes are self._data[self._start : self._end]
        self._end = 0
        self.offset = 0  # of the next byte handed on, in the compressed stream
        self._left = 0  # bytes of the current part (header, block, checksum) to hand on
        self._state = "start"  # start, block, checksum, done
        self._checksum = False
        self._last_block = False

    def _fill(self, size: int) -> bool:
        """Buffer at least `size` (at most _LONGEST_PEEK) bytes; False if the source ends
        first. May move the buffered bytes: call it only with no view of them handed on
        that the caller still reads."""
        while self._end - self._start < size:
            if self._start == self._end:
                self._start = self._end = 0
            elif len(self._data) - self._end < size:
                rest = bytes(self._view[self._start : self._end])  # under _LONGEST_PEEK
                self._data[: len(rest)] = rest
                self._start, self._end = 0, len(rest)
            count = self._source.readinto(self._view[self._end :]) or 0
            if not count:
                return False
            self._end += count
        return True

    def _need(self, size: int) -> bytes:
        if not self._fill(size):
            raise TruncatedArtifact(f"{self._what}: compressed stream ends early")
        return bytes(self._view[self._start : self._start + size])

    def next_frame(self) -> bool:
        """Start the next frame; False at the end of the stream."""
        while True:
            if not self._fill(1):
                return False
            magic = int.from_bytes(self._need(4), "little")
            if magic & 0xFFFFFFF0 != _SKIPPABLE_MAGIC:
                break
            size = int.from_bytes(self._need(8)[4:], "little")
            self._skip(8 + size)
        if magic != _ZSTD_MAGIC:
            raise CompressionError(
                f"{self._what}: corrupt zstd data: no frame at byte {self.offset}"
            )
        descriptor = self._need(5)[4]
        if descriptor & 0x08:
            raise CompressionError(f"{self._what}: corrupt zstd data: reserved bit set")
        single_segment = bool(descriptor & 0x20)
        content_size = _CONTENT_SIZE_SIZES[descriptor >> 6] or int(single_segment)
        self._left = 5 + (not single_segment) + _DICTIONARY_ID_SIZES[descriptor & 3] + content_size
        self._checksum = bool(descriptor & 0x04)
        self._state = "block"
        self._last_block = False
        return True

    def _skip(self, size: int) -> None:
        while size:
            if not self._fill(1):
                raise TruncatedArtifact(f"{self._what}: compressed stream ends early")
            take = min(size, self._end - self._start)
            self._start += take
            self.offset += take
            size -= take

    def _next_part(self) -> bool:
        """Learn the length of the frame's next part; False once the frame has ended."""
        if self._state == "block":
            if self._last_block:
                self._state = "checksum"
                self._left = 4 if self._checksum else 0
                return self._left > 0 or self._next_part()
            header = int.from_bytes(self._need(3), "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise CompressionError(f"{self._what}: corrupt zstd data: reserved block type")
            self._last_block = bool(header & 1)
            self._left = 3 + (1 if kind == 1 else size)
            return True
        self._state = "done"
        return False

    def read_view(self, size: int) -> memoryview:
        """The frame's next bytes, up to `size`, as a view of the buffer (empty at the
        frame's end), valid until the walker is called again.

        It spans as many parts as the buffer holds whole; it stops early rather than
        read where reading could move the bytes it hands on.
        """
        begin = self._start
        while self._start - begin < size:
            if not self._left:
                if self._state == "done":
                    break
                taken = self._start > begin
                # Parsing a block header reads it when it is not buffered whole.
                if taken and self._end - self._start < 3:
                    break
                if not self._next_part():
                    break
                if not taken:
                    begin = self._start  # the header's read may have moved the buffer
                continue
            if self._start == self._end:
                if self._start > begin:
                    break  # hand on what is here rather than wait for more
                if not self._fill(1):
                    raise TruncatedArtifact(f"{self._what}: compressed stream ends early")
                begin = self._start
            take = min(self._left, size - (self._start - begin), self._end - self._start)
            self._start += take
            self._left -= take
            self.offset += take
        return self._view[begin : self._start]

    def readinto(self, buffer: memoryview, /) -> int:
        filled = 0
        while filled < len(buffer):
            view = self.read_view(len(buffer) - filled)
            if not view:
                break
            buffer[filled : filled + len(view)] = view
            filled += len(view)
        return filled

    def is_frame_done(self) -> bool:
        """True once every byte of the frame was handed on (reading further gives 0)."""
        return not self.readinto(memoryview(bytearray(1))) and self._state == "done"


class _ZstdDecompressor(Decompressor):
    """Decompresses zstd one frame at a time, each with a fresh stream reader."""

    def __init__(self, source: Readable, what: str) -> None:
        super().__init__()
        self._what = what
        self._frames = _ZstdFrames(source, what)
        self._produced = 0
        self._reader: zstandard.ZstdDecompressionReader | None = None
        self._ended = False

    def _next_reader(self) -> bool:
        frames = self._frames
        if self._reader is not None and not frames.is_frame_done():
            raise CompressionError(f"{self._what}: corrupt zstd data: a frame ends early")
        start = frames.offset
        if not frames.next_frame():
            self._ended = True
            return False
        if self._reader is not None:
            self._found.append(Boundary(start, self._produced))
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], _FrameInput(frames)), read_size=_INPUT_SIZE, closefd=False
        )
        return True

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            while not self._ended:
                if self._reader is None and not self._next_reader():
                    break
                assert self._reader is not None
                count = int(self._reader.readinto(buffer))
                if count:
                    self._produced += count
                    return count
                if not self._next_reader():
                    break
            return 0
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
    """A write-only stream that compresses into `sink`; call `finish()` at the end.

    `start_members_at(offsets)` ends the current gzip member, xz stream or zstd frame
    and starts a new one at each of those offsets of the uncompressed stream.

    With `threads` above 1, every member whose end is planned (and is at most
    `MAX_BUFFERED_MEMBER` away) is gathered whole and compressed on a pool of that many
    threads (zlib, lzma and zstandard release the GIL while they work), the results
    written in order, at most `threads` members ahead of the sink. A member with no
    planned end, such as the last, goes through one encoder as it comes. The bytes are
    the same for any number of threads: each member is compressed by a fresh encoder from
    the same input, and these encoders' output does not depend on how it is fed. A member
    of zeros only (free space of a filesystem image) is compressed once per size and
    reused. Call `close()` (or use the writer as a context manager) to stop the pool when
    writing ends early.
    """

    def __init__(
        self,
        sink: BinaryIO,
        compression: Compression,
        level: int | None = None,
        threads: int = 1,
    ) -> None:
        self._sink = sink
        self._compression = compression
        self._level = level
        self.position = 0  # uncompressed bytes written
        self._starts: list[int] = []
        parallel = threads > 1 and compression is not Compression.NONE
        self._pool = ThreadPoolExecutor(threads, "compress") if parallel else None
        self._ahead = threads
        self._results: collections.deque[Future[bytes]] = collections.deque()
        self._zero_members: dict[int, bytes] = {}  # compressed, by uncompressed size
        self._zero_block = b""
        # The member being written: gathered in `_gathered` (for the pool) or streamed
        # through `_encoder`; `_fresh` while nothing of it has been written yet.
        self._gathered: bytearray | None = None
        self._encoder = _new_encoder(self._compression, self._level)
        self._fresh = True

    def __enter__(self) -> CompressingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start_members_at(self, offsets: Iterable[int]) -> None:
        """Start a new member at each offset (ahead of `position`) as writing reaches it."""
        starts = sorted(set(offsets))
        if starts and starts[0] <= self.position:
            raise UsageError(f"member start {starts[0]} is not ahead of {self.position}")
        self._starts = starts[::-1]
        if self._fresh:
            self._begin_member()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while self._starts and self.position + len(view) >= self._starts[-1]:
            take = self._starts.pop() - self.position
            self._write(view[:take])
            view = view[take:]
            self._end_member()
        self._write(view)

    def _write(self, view: memoryview) -> None:
        if not view:
            return
        self.position += len(view)
        self._fresh = False
        if self._gathered is not None:
            self._gathered += view
        elif self._encoder is None:
            self._sink.write(view)
        else:
            self._sink.write(self._encoder.compress(bytes(view)))

    def _begin_member(self) -> None:
        """Choose how the member starting at `position` is compressed."""
        self._fresh = True
        end = self._starts[-1] if self._starts else None
        if (
            self._pool is not None
            and end is not None
            and end - self.position <= MAX_BUFFERED_MEMBER
        ):
            self._gathered = bytearray()
            self._encoder = None
        else:
            self._gathered = None
            self._encoder = _new_encoder(self._compression, self._level)

    def _end_member(self) -> None:
        if self._gathered is not None:
            self._submit(self._gathered)
        elif self._encoder is not None:
            self._sink.write(self._encoder.flush())
        self._begin_member()
        if self._gathered is None:  # what follows is streamed: the pool's members first
            self._drain(0)

    def _submit(self, member: bytearray) -> None:
        assert self._pool is not None
        size = len(member)
        zeros = member == self._zeros(size)  # a memcmp, ending at the first non-zero byte
        result: Future[bytes]
        if zeros and size in self._zero_members:
            result = Future()
            result.set_result(self._zero_members[size])
        else:
            result = self._pool.submit(_compress_member, self._compression, self._level, member)
            if zeros:
                self._zero_members[size] = result.result()
        self._results.append(result)
        self._drain(self._ahead)

    def _zeros(self, size: int) -> bytes:
        if len(self._zero_block) != size:
            self._zero_block = bytes(size)  # members mostly share one size
        return self._zero_block

    def _drain(self, keep: int) -> None:
        """Write finished members, in order, until at most `keep` are outstanding."""
        while len(self._results) > keep:
            self._sink.write(self._results.popleft().result())

    def finish(self) -> None:
        if self._gathered is not None:
            self._submit(self._gathered)
            self._gathered = None
        self._drain(0)
        if self._encoder is not None:
            self._sink.write(self._encoder.flush())
            self._encoder = None
        self.close()

    def close(self) -> None:
        """Stop the pool; members not yet written are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._results.clear()


# Input of a member that the pool compresses is held in memory in full: bounded by this.
MAX_BUFFERED_MEMBER = 64 << 20


def _new_encoder(compression: Compression, level: int | None) -> _Encoder | None:
    if compression is Compression.NONE:
        return None
    if compression is Compression.GZIP:
        # wbits 31 writes a gzip header with mtime 0 and no file name: reproducible.
        return zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
    if compression is Compression.XZ:
        return lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=6 if level is None else level)
    return zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()


def _compress_member(compression: Compression, level: int | None, member: bytearray) -> bytes:
    """One whole member, by a fresh encoder: the same bytes as streaming it would give."""
    encoder = _new_encoder(compression, level)
    assert encoder is not None
    return encoder.compress(member) + encoder.flush()
