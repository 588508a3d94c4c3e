"""Resuming an interrupted download of an artifact from what the slot already holds.

An artifact whose data member is uncompressed has its image at a fixed place in the
file (`PayloadFile.artifact_offset`), and the signed chunk index says what every chunk
of the image must hash to. So after an interruption the slot itself tells how far the
last attempt got: `resume_point()` counts the leading chunks the slot already holds
(`ChunkIndex.count_matching_prefix`) and says which byte of the artifact to download
next, `artifact_offset + chunks * chunk_size`. The engine does this by itself
(otad.resume keeps the record of what was being downloaded; otad.engine and
otad.updater use it):

1. While it installs from a URL, it records the URL, `HttpSource.identity` (ETag,
   Last-Modified, size), the digest of the signed manifest, the target slot, the
   image's `artifact_offset` and, at each fsync watermark of the slot writer, how much
   of the image is verified and on the medium.
2. After a restart, recovery marks the slot empty as for any interrupted install; its
   bytes stay where they are. The next install of the same URL (or the daemon, when it
   starts) asks with `end_first_request_at(artifact_offset)` only for the bytes before
   the image, reads and verifies the header, and compares it and the validators with
   the record.
3. If everything matches, it calls `resume_point(slot, chunk_index, offset)` and
   `SplicedSource.splice(point)` before the reader reaches the image.
4. The reader then receives the image's first `point.prefix` bytes from the slot and
   the rest from a Range request at `point.resume_at`. It verifies every chunk and the
   whole-file SHA-256 exactly as for a fresh download: the whole-file digest is seeded
   by hashing the slot's prefix as it passes through, and a wrong recorded offset or a
   changed slot only makes verification fail, so the record needs no trust. The slot
   writer's skip-identical comparison finds the prefix blocks already right and does not
   rewrite them.

This needs no change to the reader. The alternative, starting the reader in the middle
of the file, would need a reader API that takes `ResumePoint.prefix_sha256()` as the
seeded whole-file digest and skips the first `point.chunks` chunk checks; it saves the
second read of the prefix from the slot, which is local and far cheaper than the network.

A compressed data member has no fixed offset for a byte of the image, but the data
archives otad-artifact writes are cut into gzip members (xz streams, zstd frames) that
start on chunk boundaries of the image, and the reader notes the ones it passes
(`PayloadFile.boundaries()`: the offset in the compressed member, the byte of the
image). The record keeps the last one at or before the verified bytes, and the resume
is spliced after decompression rather than before (`SplicedSource.splice_member`):

1. `probe_member()` first asks, in a request of its own, for about one chunk's worth
   of compressed bytes from the boundary and checks that a fresh decoder turns them
   into the signed chunk the boundary claims to start; if not, the download starts
   over from byte 0. Only boundaries at chunks found once in the image are recorded
   (otad.resume), so a boundary that passes is the one it claims to be: a wrong record
   costs a start-over, not a failed install.
2. The first request stops where the data member starts. When the reader reaches it,
   `open_data()` hands it a decompressed stream made of the image's tar header (made
   from the signed name and size), the slot's bytes up to the boundary, then a fresh
   decoder's output from the boundary on, downloaded with a Range request; the
   compressed bytes before the boundary are never downloaded (the outer archive reads
   zeros for them, which only its skip looks at).
3. The reader checks every chunk against the signed index and bounds every size by the
   signed header exactly as for a fresh download.

An artifact whose compressed data is one member (other tools write it so) has no such
boundary: its download restarts from byte 0, and the slot writer's skip-identical
blocks make rewriting the part already there a matter of reading it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from otad.artifact.chunks import ChunkIndex
from otad.artifact.compression import Boundary, Compression, Decompressor, open_decompressed
from otad.artifact.reader import Payload
from otad.artifact.streams import Readable, read_into_fully, skip_exactly
from otad.artifact.tarstream import TarEntry
from otad.artifact.tarwrite import member_header
from otad.download import DownloadError, HttpSource, shown_url
from otad.errors import (
    ArtifactError,
    DeviceError,
    UsageError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """How much of a payload file a slot already holds, and where the download goes on.

    `chunks` leading chunks (`prefix` bytes) match the signed chunk index; the next byte
    to download is `resume_at` in the artifact.
    """

    artifact_offset: int
    chunk_size: int
    size: int
    chunks: int
    prefix: int
    _prefix_sha256: Any = field(repr=False, compare=False)

    @property
    def resume_at(self) -> int:
        return self.artifact_offset + self.prefix

    @property
    def range_header(self) -> str:
        return f"bytes={self.resume_at}-"

    @property
    def is_complete(self) -> bool:
        return self.prefix == self.size

    def prefix_sha256(self) -> hashlib._Hash:
        """A SHA-256 that has hashed the slot's prefix: a whole-file digest to go on with."""
        copy: hashlib._Hash = self._prefix_sha256.copy()
        return copy


class _PrefixHasher:
    """Reads a slot for count_matching_prefix, keeping the digest of each chunk boundary.

    count_matching_prefix reads chunk k only after chunks 0..k-1 matched, so the state
    saved when chunk k begins is the digest of exactly the matching prefix.
    """

    def __init__(self, descriptor: int, chunk_size: int) -> None:
        self._descriptor = descriptor
        self._chunk_size = chunk_size
        self._position = 0
        self.whole = hashlib.sha256()
        self.at_boundary = self.whole.copy()

    def readinto(self, buffer: memoryview, /) -> int:
        if self._position % self._chunk_size == 0:
            self.at_boundary = self.whole.copy()
        count = os.preadv(self._descriptor, [buffer], self._position)
        self.whole.update(buffer[:count])
        self._position += count
        return count


def _open_slot(slot: Path) -> int:
    try:
        return os.open(slot, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise DeviceError(f"cannot read slot {slot}: {error.strerror}") from None


def resume_point(
    slot: Path, chunk_index: ChunkIndex | None, artifact_offset: int | None
) -> ResumePoint | None:
    """Where to resume downloading the payload file that `slot` partly holds.

    None when the artifact cannot be resumed from the slot: its data member is
    compressed (no `artifact_offset`) or it has no chunk index.
    """
    if chunk_index is None or artifact_offset is None:
        return None
    descriptor = _open_slot(slot)
    try:
        hasher = _PrefixHasher(descriptor, chunk_index.chunk_size)
        chunks = chunk_index.count_matching_prefix(hasher)
    finally:
        os.close(descriptor)
    prefix = min(chunks * chunk_index.chunk_size, chunk_index.size)
    digest = hasher.whole if chunks == len(chunk_index.digests) else hasher.at_boundary
    log.debug(
        "slot %s holds %d of %d chunks of the image; a resume goes on at byte %d",
        slot,
        chunks,
        len(chunk_index.digests),
        artifact_offset + prefix,
    )
    return ResumePoint(
        artifact_offset, chunk_index.chunk_size, chunk_index.size, chunks, prefix, digest
    )


@dataclass(frozen=True)
class MemberResumePoint:
    """Where the download of a compressed image resumes: at the gzip member or zstd
    frame that starts `compressed` bytes into the data member (which starts at
    `member_offset` in the artifact) and yields the image from `image_offset` on; the
    slot supplies the image before that. `prefix` bytes of the slot were verified."""

    member_offset: int
    compressed: int
    image_offset: int
    prefix: int
    compression: Compression

    @property
    def resume_at(self) -> int:
        return self.member_offset + self.compressed


def probe_member(http: HttpSource, point: MemberResumePoint, chunk_index: ChunkIndex) -> str | None:
    """Why the compressed data at `point` is not where the image's chunk there starts;
    None when a fresh decoder started there yields exactly that signed chunk.

    It asks for the bytes from `point.resume_at` on in a request of its own and reads
    only as many as decoding one chunk takes. A wrong point fails here, before the
    install relies on it, so that it can start over instead of failing.
    """
    number = point.image_offset // chunk_index.chunk_size
    if point.image_offset % chunk_index.chunk_size or number >= len(chunk_index.digests):
        return f"byte {point.image_offset} of the image does not start a chunk"
    chunk = memoryview(bytearray(chunk_index.chunk_length(number)))
    probe = http.another()
    try:
        probe.skip_to(point.resume_at)
        # Enough for one chunk that does not compress at all; more is asked for if needed.
        probe.end_first_request_at(point.resume_at + len(chunk) + len(chunk) // 64 + 4096)
        decoder = open_decompressed(probe, point.compression, f"byte {point.resume_at}")
        count = read_into_fully(decoder, chunk)
        changes = probe.identity.differences(http.identity)
    except (ArtifactError, DownloadError) as error:
        return f"its compressed data at byte {point.resume_at} does not decode: {error}"
    finally:
        probe.close()
    if changes:
        return f"the server now serves another artifact: {', '.join(changes)}"
    if count < len(chunk) or hashlib.sha256(chunk[:count]).digest() != chunk_index.digests[number]:
        return (
            f"its compressed data at byte {point.resume_at} does not decode to chunk "
            f"{number} of the image"
        )
    return None


_ZEROS = bytes(1 << 20)


class SplicedSource:
    """The artifact as `http` serves it, except the image prefix the slot already holds.

    Until `splice(point)` or `splice_member(point)` is called this is `http` itself.

    `splice(point)` is for an uncompressed image: the bytes from `point.artifact_offset`
    to `point.resume_at` come from the slot and the download goes on at
    `point.resume_at` with a Range request.

    `splice_member(point)` is for a compressed one, spliced after decompression: the
    reader asks `open_data()` (a DataSplice) for the data member's decompressed stream
    and gets the inner tar header of the image, the slot's first `point.image_offset`
    bytes, then what a fresh decoder makes of the data member from `point.compressed`
    on, downloaded with a Range request from `point.resume_at`. The compressed bytes
    skipped are never downloaded: this source hands the outer archive zeros for them,
    which nothing reads but the skip. The reader verifies all of it alike.
    """

    def __init__(self, http: HttpSource, slot: Path) -> None:
        self.http = http
        self._slot = slot
        self._descriptor = -1
        self._point: ResumePoint | None = None
        self._member: MemberResumePoint | None = None
        self._hole: tuple[int, int] | None = None  # bytes not downloaded, read as zeros
        self._position = 0

    def splice(self, point: ResumePoint) -> None:
        """Take the image's first `point.prefix` bytes from the slot; call before reading them."""
        if self._position > point.artifact_offset:
            raise UsageError(
                f"already read {self._position} bytes, past the image at {point.artifact_offset}"
            )
        self._point = point
        if point.prefix:
            self._descriptor = _open_slot(self._slot)

    def splice_member(self, point: MemberResumePoint) -> None:
        """Resume a compressed image at `point`; call before the data member is reached."""
        if self._position > point.member_offset:
            raise UsageError(
                f"already read {self._position} bytes, past the data at {point.member_offset}"
            )
        self._member = point

    @property
    def member_point(self) -> MemberResumePoint | None:
        """The compressed splice planned, once the reader took it (None if it declined)."""
        return self._member

    def open_data(
        self, member: TarEntry, compression: Compression, compressed: Readable, payload: Payload
    ) -> Decompressor | None:
        """The data member's decompressed stream, spliced at the planned point (DataSplice)."""
        point = self._member
        if point is None or payload.index != 0:
            return None
        promise = payload.promise
        found = (member.data_offset, compression)
        if found != (point.member_offset, point.compression) or promise is None:
            log.warning(
                "not resuming the download of %s: its data is %s at byte %d, the resume "
                "record says %s at %d; starting over",
                shown_url(self.http.url),
                compression.value,
                member.data_offset,
                point.compression.value,
                point.member_offset,
            )
            self._member = None
            return None
        assert promise.chunked_file is not None
        name = promise.chunked_file
        header = member_header(name, promise.sizes[name], 0)
        self._hole = (point.member_offset, point.resume_at)
        self._descriptor = _open_slot(self._slot)
        return _MemberSplice(
            header, self._descriptor, self._slot, point, compression, compressed, member.name
        )

    def readinto(self, buffer: memoryview, /) -> int:
        point = self._point
        hole = self._hole
        if hole is not None and self._position < hole[1]:
            count = self._read_around(buffer, hole)
        elif point is None or not point.prefix:
            count = self.http.readinto(buffer)
        elif self._position < point.artifact_offset:
            count = self.http.readinto(buffer[: point.artifact_offset - self._position])
        elif self._position < point.resume_at:
            count = self._read_slot(buffer, point)
        else:
            count = self.http.readinto(buffer)
        self._position += count
        return count

    def _read_around(self, buffer: memoryview, hole: tuple[int, int]) -> int:
        start, end = hole
        if self._position < start:
            return self.http.readinto(buffer[: start - self._position])
        self.http.skip_to(end)
        count = min(len(buffer), end - self._position, len(_ZEROS))
        buffer[:count] = _ZEROS[:count]
        return count

    def _read_slot(self, buffer: memoryview, point: ResumePoint) -> int:
        self.http.skip_to(point.resume_at)
        offset = self._position - point.artifact_offset
        view = buffer[: point.resume_at - self._position]
        count = os.preadv(self._descriptor, [view], offset)
        if not count:
            raise DeviceError(f"slot {self._slot} ends at byte {offset} of its resume point")
        return count

    def close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1
        self.http.close()

    def __enter__(self) -> SplicedSource:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _MemberSplice(Decompressor):
    """A compressed data member's decompressed stream, resumed at `point`: the image's
    tar header, the slot's first `point.image_offset` bytes, then a fresh decoder's
    output from `point.compressed` on in `compressed` (the data member's bytes)."""

    def __init__(
        self,
        header: bytes,
        descriptor: int,
        slot: Path,
        point: MemberResumePoint,
        compression: Compression,
        compressed: Readable,
        what: str,
    ) -> None:
        super().__init__()
        self._header = header
        self._descriptor = descriptor
        self._slot = slot
        self._point = point
        self._compression = compression
        self._compressed = compressed
        self._what = what
        self._decoder: Decompressor | None = None
        self._position = 0
        self._image_end = len(header) + point.image_offset

    @property
    def boundaries(self) -> list[Boundary]:
        point = self._point
        found = [Boundary(point.compressed, self._image_end)]
        if self._decoder is not None:
            found += [
                Boundary(point.compressed + b.compressed, self._image_end + b.decompressed)
                for b in self._decoder.boundaries[1:]
            ]
        return found

    def readinto(self, buffer: memoryview, /) -> int:
        header = len(self._header)
        if self._position < header:
            count = min(len(buffer), header - self._position)
            buffer[:count] = self._header[self._position : self._position + count]
        elif self._position < self._image_end:
            offset = self._position - header
            view = buffer[: self._image_end - self._position]
            count = os.preadv(self._descriptor, [view], offset)
            if not count:
                raise DeviceError(f"slot {self._slot} ends at byte {offset} of its resume point")
        else:
            count = self._decoded().readinto(buffer) or 0
        self._position += count
        return count

    def _decoded(self) -> Decompressor:
        if self._decoder is None:
            skip_exactly(self._compressed, self._point.compressed, self._what)
            decoder = open_decompressed(self._compressed, self._compression, self._what)
            assert isinstance(decoder, Decompressor)
            self._decoder = decoder
        return self._decoder
