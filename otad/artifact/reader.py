"""The streaming artifact reader: verify a Mender Artifact v3 in one forward pass.

Order of trust, which is the order of the archive:

1. `version` and `manifest` are read as raw bytes (both small and bounded);
2. `manifest.sig` is checked against the trusted keys before anything is parsed;
3. `version` and then `header.tar*` are checked against the manifest's SHA-256 and only
   then parsed, so no unverified JSON is ever interpreted;
4. payload files stream out of `data/NNNN.tar*`. A file that the signed chunk index
   covers is checked chunk by chunk, each chunk before the caller sees it; any other
   file is hashed while it streams and its last block is held back until its SHA-256
   matched the manifest's.

The chunk index (otad/artifact/chunks.py) sits in the signed header and pins the file's
exact size and every byte of it, so for such a file the manifest's whole-file SHA-256
adds no assurance and is not computed: hashing every byte once instead of twice is most
of what a rootfs install costs in CPU. Mender clients, which ignore the index, check the
whole-file digest as usual.

The reader never writes anything: it hands verified blocks to its caller. Only when
`finish()` returns has every file the manifest lists arrived intact; a caller activates
nothing before that.

For a download resumed from the slot, a `DataSplice` may supply a data member's
decompressed stream instead (part of it from the slot, the rest decoded from the middle
of the compressed member); the reader checks what it supplies exactly as it checks a
fresh stream. `PayloadFile.boundaries()` says where such a resume can start.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from otad.artifact.chunks import PREFIX, ChunkIndex, PayloadPromise, parse_promise
from otad.artifact.compression import (
    Boundary,
    Compression,
    Decompressor,
    open_decompressed,
    split_suffix,
)
from otad.artifact.headers import (
    FormatVersion,
    HeaderInfo,
    Manifest,
    MetaDataValue,
    TypeInfo,
    is_state_script_name,
    parse_meta_data,
)
from otad.artifact.release import software_version
from otad.artifact.signing import MAX_SIGNATURE_SIZE, Verifier, verify_manifest
from otad.artifact.streams import (
    BLOCK_SIZE,
    BytesSource,
    Prefetcher,
    Readable,
    read_into_fully,
)
from otad.artifact.tarstream import EntryType, TarEntry, TarReader
from otad.errors import (
    ArtifactError,
    ChecksumMismatch,
    ChunkMismatch,
    LimitExceeded,
    MalformedArtifact,
    MemberOrderError,
    MissingMember,
    MissingSignature,
    TruncatedArtifact,
    UnexpectedMember,
    UnsafePath,
    UnsupportedFeature,
    UsageError,
)

_DATA_MEMBER = re.compile(r"data/([0-9]{4})\.tar(\.gz|\.xz|\.zst)?")
_TYPE_INFO = re.compile(r"headers/([0-9]{4})/type-info")
_META_DATA = re.compile(r"headers/([0-9]{4})/meta-data")
_HEADER_DIRECTORIES = re.compile(r"scripts|headers|headers/[0-9]{4}")
MAX_PAYLOADS = 64


@dataclass(frozen=True)
class VerifyPolicy:
    """Which keys are trusted and whether a signature is required.

    With keys, a signature is required unless `require_signature` is set to False;
    without keys the signature cannot be checked and the reader reports it unchecked.
    """

    keys: tuple[Verifier, ...] = ()
    require_signature: bool | None = None

    def __post_init__(self) -> None:
        if self.require_signature and not self.keys:
            raise UsageError("a signature is required but no trusted key was given")

    @property
    def is_signature_required(self) -> bool:
        return bool(self.keys) if self.require_signature is None else self.require_signature


@dataclass(frozen=True)
class Limits:
    """Sane bounds on what a reader accepts, in bytes."""

    version: int = 4096
    manifest: int = 1 << 20
    header: int = 16 << 20
    header_file: int = 8 << 20
    # Bound on all payload files of an artifact whose header promises no sizes
    # (artifacts from other tools); an installer passes its slot size.
    payload: int = 1 << 40


class SignatureStatus(enum.Enum):
    VERIFIED = "verified"
    UNCHECKED = "unchecked"
    UNSIGNED = "unsigned"


@dataclass(frozen=True)
class Payload:
    """One entry of header-info's payloads with its type-info and meta-data."""

    index: int
    type_info: TypeInfo
    meta_data: Mapping[str, MetaDataValue]
    promise: PayloadPromise | None
    files: Mapping[str, str]  # file name -> SHA-256 hex, from the manifest

    @property
    def type(self) -> str | None:
        return self.type_info.type

    @property
    def chunk_index(self) -> ChunkIndex | None:
        return self.promise.chunk_index if self.promise else None

    @property
    def software_version(self) -> str | None:
        return software_version(self.type_info)

    @property
    def user_meta_data(self) -> dict[str, MetaDataValue]:
        """Meta-data without otad's own keys: what an update module should see."""
        return {key: value for key, value in self.meta_data.items() if not key.startswith(PREFIX)}


@dataclass(frozen=True)
class ArtifactHeader:
    """Everything known, and verified, before the first payload byte arrives."""

    header_info: HeaderInfo
    payloads: tuple[Payload, ...]
    scripts: Mapping[str, bytes]
    signature: SignatureStatus
    signed_by: Verifier | None
    manifest: Manifest
    header_member: str

    @property
    def name(self) -> str:
        return self.header_info.artifact_name

    @property
    def compatible_devices(self) -> tuple[str, ...]:
        return self.header_info.compatible_devices


@dataclass
class PayloadFile:
    """One payload file as it streams; iterate `blocks()` to receive its data.

    Each block is a view into a buffer the reader reuses: consume it before asking for
    the next. `artifact_offset` is where the file's bytes start in the artifact when
    its data archive is uncompressed (what a ranged download resumes from), else None;
    `member_offset` is where its compressed data archive starts in the artifact, else
    None.
    """

    payload: Payload
    name: str
    size: int
    checksum: str
    artifact_offset: int | None
    chunk_index: ChunkIndex | None
    _source: Readable = field(repr=False)
    verified: bool = False
    _iterator: Iterator[memoryview] | None = field(default=None, repr=False)
    member_offset: int | None = None
    _decoder: Decompressor | None = field(default=None, repr=False)
    _stream_offset: int = 0  # where the file starts in the decompressed data archive

    def boundaries(self) -> list[Boundary]:
        """The compressed members read so far that start inside the file on a chunk
        boundary: their offset in the compressed data archive and in the file.

        A fresh decoder started at such a member's offset yields the file from that
        byte on. Safe to call from another thread while the file is being read.
        """
        if self._decoder is None or self.chunk_index is None:
            return []
        chunk_size = self.chunk_index.chunk_size
        found = []
        for boundary in list(self._decoder.boundaries):
            offset = boundary.decompressed - self._stream_offset
            if 0 < offset < self.size and offset % chunk_size == 0:
                found.append(Boundary(boundary.compressed, offset))
        return found

    def blocks(self) -> Iterator[memoryview]:
        if self._iterator is None:
            self._iterator = self._verified_blocks()
        return self._iterator

    def drain(self) -> None:
        """Read and verify whatever the caller did not consume."""
        for _ in self.blocks():
            pass

    def _verified_blocks(self) -> Iterator[memoryview]:
        index = self.chunk_index
        if index is None:
            yield from self._hashed_blocks()
            return
        if index.size != self.size:
            raise MalformedArtifact(
                f"the chunk index of {self.name} covers {index.size} bytes, "
                f"the file holds {self.size}"
            )
        yield from self._chunked_blocks(index)

    def _hashed_blocks(self) -> Iterator[memoryview]:
        """Blocks of a file without a chunk index: the whole-file SHA-256 is the check."""
        whole = hashlib.sha256()
        buffer = memoryview(bytearray(min(BLOCK_SIZE, self.size) or 1))
        remaining = self.size
        while remaining:
            view = self._read_block(buffer, min(BLOCK_SIZE, remaining))
            whole.update(view)
            remaining -= len(view)
            if not remaining:
                self._check_whole(whole)
            yield view
        if not self.size:
            self._check_whole(whole)

    def _chunked_blocks(self, index: ChunkIndex) -> Iterator[memoryview]:
        """Blocks of a file the signed chunk index covers, one chunk each, each checked.

        Two buffers alternate so that the next chunk is read and decompressed while the
        chunk-hash thread checks the previous one (hashlib releases the GIL).
        """
        buffers = [memoryview(bytearray(index.chunk_size)) for _ in range(2)]
        with ThreadPoolExecutor(1, thread_name_prefix="otad-chunk-hash") as pool:
            pending: tuple[int, memoryview, Future[bytes]] | None = None
            for number in range(len(index.digests)):
                view = self._read_block(buffers[number % 2], index.chunk_length(number))
                hashing = pool.submit(_digest, view)
                if pending is not None:
                    yield self._checked(index, *pending)
                pending = (number, view, hashing)
            if pending is not None:
                last = self._checked(index, *pending)
                self.verified = True
                yield last
        self.verified = True

    def _read_block(self, buffer: memoryview, length: int) -> memoryview:
        view = buffer[:length]
        if read_into_fully(self._source, view) < length:
            raise TruncatedArtifact(f"payload file {self.name} ends early")
        return view

    def _checked(
        self, index: ChunkIndex, number: int, view: memoryview, hashing: Future[bytes]
    ) -> memoryview:
        self._check_chunk(index, number, hashing.result())
        return view

    def _check_chunk(self, index: ChunkIndex, number: int, found: bytes) -> None:
        if found != index.digests[number]:
            raise ChunkMismatch(self.name, number, index.digests[number].hex(), found.hex())

    def _check_whole(self, whole: hashlib._Hash) -> None:
        found = whole.hexdigest()
        if found != self.checksum:
            raise ChecksumMismatch(
                f"data/{self.payload.index:04}/{self.name}", self.checksum, found
            )
        self.verified = True


def _digest(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


class _Bounded:
    """A Readable that refuses to yield more than `limit` bytes in total."""

    def __init__(self, source: Readable, limit: int, what: str) -> None:
        self._source = source
        self._left = limit
        self._limit = limit
        self._what = what

    def readinto(self, buffer: memoryview, /) -> int:
        count = self._source.readinto(buffer[: self._left + 1]) or 0
        if count > self._left:
            raise LimitExceeded(f"{self._what} decompresses to more than {self._limit} bytes")
        self._left -= count
        return count


class _HeaderParts:
    """Collects the members of header.tar after header-info, enforcing their order:
    state scripts first, then each payload's type-info and optional meta-data."""

    def __init__(self, member: str, payload_count: int) -> None:
        self.member = member
        self.payload_count = payload_count
        self.scripts: dict[str, bytes] = {}
        self.type_infos: list[TypeInfo] = []
        self.metas: list[dict[str, MetaDataValue]] = []
        self._meta_seen: set[int] = set()

    def add(self, name: str, data: bytes) -> None:
        member = self.member
        if name.startswith("scripts/"):
            if self.type_infos:
                raise MemberOrderError(f"{member}: script {name!r} after the headers")
            self._add_script(name, data)
        elif match := _TYPE_INFO.fullmatch(name):
            index = int(match.group(1))
            if index != len(self.type_infos) or index >= self.payload_count:
                raise MemberOrderError(f"{member}: {name} out of order or without a payload")
            self.type_infos.append(TypeInfo.parse(data, f"{member}: {name}"))
            self.metas.append({})
        elif match := _META_DATA.fullmatch(name):
            index = int(match.group(1))
            if index != len(self.type_infos) - 1 or index in self._meta_seen:
                raise MemberOrderError(f"{member}: {name} repeated or without its type-info")
            self._meta_seen.add(index)
            self.metas[index] = parse_meta_data(data, f"{member}: {name}")
        else:
            raise UnexpectedMember(f"{member}: unexpected member {name!r}")

    def _add_script(self, name: str, data: bytes) -> None:
        script = name.removeprefix("scripts/")
        if "/" in script or not is_state_script_name(script):
            raise UnexpectedMember(f"{self.member}: {name!r} is not a state script name")
        if script in self.scripts:
            raise MalformedArtifact(f"{self.member}: script {script} appears twice")
        self.scripts[script] = data


class DataSplice(Protocol):
    """Supplies the decompressed stream of a compressed data member (a resume)."""

    def open_data(
        self, member: TarEntry, compression: Compression, compressed: Readable, payload: Payload
    ) -> Decompressor | None:
        """The decompressed stream of `member`, read from `compressed` (its bytes);
        None to have the reader decompress it as usual."""


class ArtifactReader:
    """Reads one artifact from `source`, front to back, verifying as it goes.

    Use as: `header = reader.read_header()`, then `for file in reader.payload_files()`
    (iterating `file.blocks()`), then `reader.finish()`. `splice`, when given, may
    supply compressed data members' decompressed streams (see DataSplice).
    """

    def __init__(
        self,
        source: Readable,
        policy: VerifyPolicy | None = None,
        limits: Limits | None = None,
        splice: DataSplice | None = None,
    ) -> None:
        self._splice = splice
        self._outer = TarReader(source, "artifact")
        self._policy = policy or VerifyPolicy()
        self._limits = limits or Limits()
        self._header: ArtifactHeader | None = None
        self._pending: TarEntry | None = None
        self._seen: set[str] = set()
        self._payload_bytes = 0
        self._done = False

    # -- the members before the data ------------------------------------------------

    def _next_outer(self, expected: str) -> TarEntry:
        entry = self._outer.next_entry()
        if entry is None:
            raise MissingMember(f"artifact ends where {expected} was expected")
        return entry

    def _expect(self, name: str, entry: TarEntry | None = None) -> TarEntry:
        entry = entry or self._next_outer(name)
        if entry.name != name:
            raise MemberOrderError(f"artifact member {entry.name!r} found where {name} belongs")
        if entry.type is not EntryType.FILE:
            raise MalformedArtifact(f"artifact member {name} is not a regular file")
        return entry

    def read_header(self) -> ArtifactHeader:
        """Read and verify everything up to the first data member."""
        if self._header is not None:
            return self._header
        self._expect("version")
        raw_version = self._outer.read_member(self._limits.version)
        self._expect("manifest")
        raw_manifest = self._outer.read_member(self._limits.manifest)
        entry = self._next_outer("header.tar")
        raw_signature = None
        if entry.name == "manifest.sig":
            raw_signature = self._outer.read_member(MAX_SIGNATURE_SIZE)
            entry = self._next_outer("header.tar")
        if entry.name == "manifest-augment":
            raise UnsupportedFeature(
                "artifact has manifest-augment (an augmented or delta artifact); "
                "otad accepts only fully signed artifacts"
            )
        status, signer = self._check_signature(raw_manifest, raw_signature)
        manifest = Manifest.parse(raw_manifest)
        self._check_member("version", raw_version, manifest)
        FormatVersion.parse(raw_version)

        header_compression = split_suffix(entry.name, "header.tar")
        if header_compression is None or entry.type is not EntryType.FILE:
            raise MemberOrderError(f"artifact member {entry.name!r} found where header.tar belongs")
        raw_header = self._outer.read_member(self._limits.header)
        self._check_member(entry.name, raw_header, manifest)
        info, payloads, scripts = self._parse_header_tar(
            raw_header, header_compression, entry.name, manifest
        )
        self._check_manifest_names(manifest, entry.name, len(payloads))
        self._pending = self._outer.next_entry()
        self._header = ArtifactHeader(info, payloads, scripts, status, signer, manifest, entry.name)
        return self._header

    def _check_signature(
        self, manifest: bytes, signature: bytes | None
    ) -> tuple[SignatureStatus, Verifier | None]:
        if signature is None:
            if self._policy.is_signature_required:
                raise MissingSignature(
                    "artifact is not signed, but a trusted signature is required"
                )
            return SignatureStatus.UNSIGNED, None
        if not self._policy.keys:
            return SignatureStatus.UNCHECKED, None
        return SignatureStatus.VERIFIED, verify_manifest(manifest, signature, self._policy.keys)

    @staticmethod
    def _check_member(name: str, data: bytes, manifest: Manifest) -> None:
        expected = manifest.checksums.get(name)
        if expected is None:
            raise MissingMember(f"manifest does not list {name}")
        found = hashlib.sha256(data).hexdigest()
        if found != expected:
            raise ChecksumMismatch(name, expected, found)

    @staticmethod
    def _check_manifest_names(manifest: Manifest, header_member: str, payloads: int) -> None:
        for name in manifest.checksums:
            if name in ("version", header_member):
                continue
            match = re.fullmatch(r"data/([0-9]{4})/([^/]+)", name)
            if match is None or int(match.group(1)) >= payloads:
                raise UnexpectedMember(f"manifest lists {name!r}, which no payload can hold")

    def _parse_header_tar(
        self, raw: bytes, compression: Compression, member: str, manifest: Manifest
    ) -> tuple[HeaderInfo, tuple[Payload, ...], dict[str, bytes]]:
        source = _Bounded(
            open_decompressed(BytesSource(raw), compression, member), self._limits.header, member
        )
        tar = TarReader(source, member)
        first = tar.next_entry()
        if first is None or first.name != "header-info" or first.type is not EntryType.FILE:
            found = first.name if first else "the end of the archive"
            raise MemberOrderError(f"{member}: first member is {found!r}, expected header-info")
        info = HeaderInfo.parse(tar.read_member(self._limits.header_file))
        if len(info.payload_types) > MAX_PAYLOADS:
            raise LimitExceeded(f"header-info lists {len(info.payload_types)} payloads")
        parts = _HeaderParts(member, len(info.payload_types))
        while (entry := tar.next_entry()) is not None:
            if entry.type is EntryType.DIRECTORY:
                if not _HEADER_DIRECTORIES.fullmatch(entry.name):
                    raise UnexpectedMember(f"{member}: unexpected directory {entry.name!r}")
                continue
            parts.add(entry.name, tar.read_member(self._limits.header_file))
        tar.check_trailer()
        if len(parts.type_infos) != len(info.payload_types):
            raise MissingMember(
                f"{member}: header-info lists {len(info.payload_types)} payloads, "
                f"type-info found for {len(parts.type_infos)}"
            )
        payloads = tuple(
            self._make_payload(index, info, type_info, meta, manifest, member)
            for index, (type_info, meta) in enumerate(
                zip(parts.type_infos, parts.metas, strict=True)
            )
        )
        return info, payloads, parts.scripts

    @staticmethod
    def _make_payload(
        index: int,
        info: HeaderInfo,
        type_info: TypeInfo,
        meta: dict[str, MetaDataValue],
        manifest: Manifest,
        member: str,
    ) -> Payload:
        declared = info.payload_types[index]
        declared = "rootfs-image" if declared == "" else declared
        if type_info.type != declared:
            raise MalformedArtifact(
                f"{member}: payload {index} is {declared!r} in header-info "
                f"but {type_info.type!r} in its type-info"
            )
        if type_info.type is None and meta:
            raise MalformedArtifact(f"{member}: an empty payload must not carry meta-data")
        prefix = f"data/{index:04}/"
        files = {
            name.removeprefix(prefix): digest
            for name, digest in manifest.checksums.items()
            if name.startswith(prefix)
        }
        promise = parse_promise(meta, f"{member}: headers/{index:04}/meta-data")
        if promise is not None and set(promise.sizes) != set(files):
            raise MalformedArtifact(
                f"{member}: payload {index} promises files {sorted(promise.sizes)} "
                f"but the manifest lists {sorted(files)}"
            )
        return Payload(index, type_info, meta, promise, files)

    # -- the data --------------------------------------------------------------------

    def payload_files(self) -> Iterator[PayloadFile]:
        """Yield each payload file in archive order; each is verified as it is read."""
        header = self.read_header()
        next_index = 0
        entry = self._pending
        while entry is not None:
            match = _DATA_MEMBER.fullmatch(entry.name)
            if entry.type is EntryType.DIRECTORY and entry.name == "data":
                pass
            elif match is None or entry.type is not EntryType.FILE:
                raise self._misplaced(entry.name)
            else:
                index = int(match.group(1))
                if index != next_index or index >= len(header.payloads):
                    raise MemberOrderError(
                        f"artifact member {entry.name} out of order or without a payload"
                    )
                next_index += 1
                compression = split_suffix(entry.name, f"data/{index:04}.tar")
                assert compression is not None
                yield from self._read_data_member(entry, header.payloads[index], compression)
            entry = self._outer.next_entry()
        self._pending = None
        self._outer.check_trailer()
        self._done = True

    @staticmethod
    def _misplaced(name: str) -> ArtifactError:
        if name.startswith("header-augment"):
            return UnsupportedFeature(
                "artifact has header-augment (an augmented or delta artifact); "
                "otad accepts only fully signed artifacts"
            )
        if name in ("version", "manifest", "manifest.sig") or name.startswith("header.tar"):
            return MemberOrderError(f"artifact member {name} appears again after the header")
        return UnexpectedMember(f"artifact member {name!r} is not part of the format")

    def _read_data_member(
        self, entry: TarEntry, payload: Payload, compression: Compression
    ) -> Iterator[PayloadFile]:
        member = entry.name
        decompressed: Readable | None = None
        if self._splice is not None and compression is not Compression.NONE:
            decompressed = self._splice.open_data(entry, compression, self._outer, payload)
        if decompressed is None:
            decompressed = open_decompressed(self._outer, compression, member)
        decoder = decompressed if isinstance(decompressed, Decompressor) else None
        prefetcher = Prefetcher(decompressed)
        try:
            inner = TarReader(prefetcher, member)
            while (file_entry := inner.next_entry()) is not None:
                payload_file = self._open_payload_file(
                    file_entry, entry, payload, compression, inner, decoder
                )
                yield payload_file
                payload_file.drain()
                self._seen.add(f"data/{payload.index:04}/{payload_file.name}")
            inner.check_trailer()
        finally:
            prefetcher.close()

    def _open_payload_file(
        self,
        file_entry: TarEntry,
        outer_entry: TarEntry,
        payload: Payload,
        compression: Compression,
        inner: TarReader,
        decoder: Decompressor | None,
    ) -> PayloadFile:
        member = outer_entry.name
        name = file_entry.name
        if file_entry.type is not EntryType.FILE or "/" in name:
            raise UnsafePath(f"{member}: {name!r} is not a plain file at the top of the archive")
        checksum = payload.files.get(name)
        key = f"data/{payload.index:04}/{name}"
        if checksum is None:
            raise UnexpectedMember(f"{member} holds {name!r}, which the manifest does not list")
        if key in self._seen:
            raise MalformedArtifact(f"{member} holds {name!r} twice")
        promised = payload.promise.sizes.get(name) if payload.promise else None
        if promised is not None and file_entry.size != promised:
            raise LimitExceeded(
                f"{key} is {file_entry.size} bytes, the signed header promises {promised}"
            )
        if promised is None:
            self._payload_bytes += file_entry.size
            if self._payload_bytes > self._limits.payload:
                raise LimitExceeded(
                    f"payload files add up to {self._payload_bytes} bytes, "
                    f"more than the limit of {self._limits.payload}"
                )
        offset = None
        if compression is Compression.NONE:
            offset = outer_entry.data_offset + file_entry.data_offset
        chunked = payload.promise is not None and payload.promise.chunked_file == name
        return PayloadFile(
            payload=payload,
            name=name,
            size=file_entry.size,
            checksum=checksum,
            artifact_offset=offset,
            chunk_index=payload.chunk_index if chunked else None,
            _source=inner,
            member_offset=None if decoder is None else outer_entry.data_offset,
            _decoder=decoder,
            _stream_offset=file_entry.data_offset,
        )

    def finish(self) -> ArtifactHeader:
        """Read to the end and check that every listed file arrived; return the header."""
        header = self.read_header()
        if not self._done:
            for payload_file in self.payload_files():
                payload_file.drain()
        for name in header.manifest.checksums:
            if name.startswith("data/") and name not in self._seen:
                raise MissingMember(f"manifest lists {name}, but the artifact does not hold it")
        return header


def verify_artifact(
    source: Readable, policy: VerifyPolicy | None = None, limits: Limits | None = None
) -> tuple[ArtifactHeader, list[PayloadFile]]:
    """Read and verify a whole artifact, discarding payload data.

    Returns the header and the payload files (name, size, checksum), all verified.
    """
    reader = ArtifactReader(source, policy, limits)
    reader.read_header()
    files = []
    for payload_file in reader.payload_files():
        payload_file.drain()
        files.append(payload_file)
    return reader.finish(), files
