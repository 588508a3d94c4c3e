"""otad's extension to the signed header: payload sizes and a chunk-hash index.

Mender Artifact v3 signs each payload file's SHA-256, which can only be checked once the
whole file has arrived. otad adds, inside `headers/NNNN/meta-data` (which is covered by
the signature through the manifest's checksum of header.tar), keys that mender-artifact
and Mender clients carry along without interpreting:

    "otad.files":      ["rootfs.ext4"]   payload file names, in order
    "otad.sizes":      [1073741824]      their exact sizes in bytes
    "otad.chunk_size": 1048576           chunk length of the index (rootfs payloads)
    "otad.chunks":     ["<sha256 hex>", ...]   SHA-256 of each chunk of the first file

The sizes bound decompression: a reader never accepts more bytes than the signed header
promises. The chunk index lets an installer verify each chunk before writing it, skip
chunks the target already holds, and resume an interrupted transfer from the last good
chunk. The key prefix `otad.` is reserved in meta-data.

Resuming a compressed transfer also needs places where decoding can start again: the
writer cuts a compressed data archive into gzip members (xz streams, zstd frames) that
start on chunk boundaries of the first file (otad/artifact/writer.py). Those places are
not in the header and need no signature: decoding from a wrong one cannot yield chunks
that match the index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from otad.artifact.headers import MetaDataValue
from otad.artifact.streams import Readable, read_into_fully
from otad.errors import LimitExceeded, MalformedArtifact

PREFIX = "otad."
KEY_FILES = "otad.files"
KEY_SIZES = "otad.sizes"
KEY_CHUNK_SIZE = "otad.chunk_size"
KEY_CHUNKS = "otad.chunks"

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20
# JSON numbers are read as doubles by Go; sizes beyond 2**53 would be rounded.
MAX_EXACT_SIZE = (1 << 53) - 1


@dataclass(frozen=True)
class ChunkIndex:
    """SHA-256 of each fixed-size chunk of one payload file (the last may be shorter)."""

    chunk_size: int
    size: int
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        expected = -(-self.size // self.chunk_size)
        if len(self.digests) != expected:
            raise MalformedArtifact(
                f"chunk index has {len(self.digests)} entries, "
                f"a {self.size}-byte file in {self.chunk_size}-byte chunks needs {expected}"
            )

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def count_matching_prefix(self, target: Readable) -> int:
        """How many leading chunks `target` (for example a slot) already holds.

        An installer uses this to resume after an interruption, or to skip writing
        chunks that are already right.
        """
        buffer = memoryview(bytearray(self.chunk_size))
        for index, digest in enumerate(self.digests):
            length = self.chunk_length(index)
            if read_into_fully(target, buffer[:length]) < length:
                return index
            if hashlib.sha256(buffer[:length]).digest() != digest:
                return index
        return len(self.digests)


class ChunkHasher:
    """Builds a ChunkIndex from data fed in pieces of any size."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self._digests: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0
        self._size = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._size += len(view)
        while view:
            take = min(len(view), self.chunk_size - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self._digests.append(self._current.digest())
                self._current = hashlib.sha256()
                self._filled = 0

    def finish(self) -> ChunkIndex:
        digests = list(self._digests)
        if self._filled:
            digests.append(self._current.digest())
        return ChunkIndex(self.chunk_size, self._size, tuple(digests))


def check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % MIN_CHUNK_SIZE:
        raise LimitExceeded(
            f"chunk size {chunk_size}: expected a multiple of {MIN_CHUNK_SIZE} "
            f"between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )


@dataclass(frozen=True)
class PayloadPromise:
    """What the signed header promises about one payload's files."""

    sizes: Mapping[str, int]
    chunk_index: ChunkIndex | None
    chunked_file: str | None


def _int_value(value: object, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EXACT_SIZE:
        raise MalformedArtifact(f"{where}: expected a byte count, found {value!r}")
    return value


def parse_promise(meta: Mapping[str, MetaDataValue], member: str) -> PayloadPromise | None:
    """Read otad's keys from a payload's meta-data; None when the artifact has none."""
    if KEY_FILES not in meta and KEY_SIZES not in meta:
        if KEY_CHUNKS in meta or KEY_CHUNK_SIZE in meta:
            raise MalformedArtifact(f"{member}: chunk index without {KEY_FILES}/{KEY_SIZES}")
        return None
    files, sizes = meta.get(KEY_FILES), meta.get(KEY_SIZES)
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise MalformedArtifact(f"{member}: {KEY_FILES} must be a list of names")
    if not isinstance(sizes, list) or len(sizes) != len(files):
        raise MalformedArtifact(f"{member}: {KEY_SIZES} must list one size per file")
    promised = {
        str(name): _int_value(size, f"{member}: {KEY_SIZES}")
        for name, size in zip(files, sizes, strict=True)
    }
    if len(promised) != len(files):
        raise MalformedArtifact(f"{member}: {KEY_FILES} lists a name twice")
    chunks = meta.get(KEY_CHUNKS)
    if chunks is None:
        return PayloadPromise(promised, None, None)
    chunk_size = _int_value(meta.get(KEY_CHUNK_SIZE), f"{member}: {KEY_CHUNK_SIZE}")
    check_chunk_size(chunk_size)
    if not isinstance(chunks, list) or not files:
        raise MalformedArtifact(f"{member}: {KEY_CHUNKS} must be a list of SHA-256 digests")
    try:
        digests = tuple(bytes.fromhex(str(item)) for item in chunks)
    except ValueError:
        raise MalformedArtifact(f"{member}: {KEY_CHUNKS} holds a value that is not hex") from None
    if any(len(digest) != 32 for digest in digests):
        raise MalformedArtifact(f"{member}: {KEY_CHUNKS} holds a value that is not SHA-256")
    first = str(files[0])
    return PayloadPromise(promised, ChunkIndex(chunk_size, promised[first], digests), first)


def promise_to_meta_data(
    sizes: Mapping[str, int], chunk_index: ChunkIndex | None
) -> dict[str, MetaDataValue]:
    """The meta-data keys that record `sizes` and, for the first file, `chunk_index`."""
    meta: dict[str, MetaDataValue] = {
        KEY_FILES: list(sizes),
        KEY_SIZES: list(sizes.values()),
    }
    if chunk_index is not None:
        meta[KEY_CHUNK_SIZE] = chunk_index.chunk_size
        meta[KEY_CHUNKS] = [digest.hex() for digest in chunk_index.digests]
    return meta
