"""Broken and hostile artifacts: each is refused with the error that names the fault.

Every case builds one defect (a cut, a flipped byte, a member out of place, a dangerous
name, a size beyond a bound) and checks three things: the exact class from otad.errors,
a message saying what was expected or found, and that the reader left its input, and
everything beside it, as it was. Malformed artifacts are packed by hand so that every
check before the one under test passes: the manifest lists correct SHA-256 sums and,
where a key is trusted, the signature verifies.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import random
import re
import tarfile
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import pytest
import zstandard

import otad.artifact.reader as reader_module
from otad.artifact.chunks import ChunkHasher, promise_to_meta_data
from otad.artifact.compression import CompressingWriter, Compression, open_decompressed
from otad.artifact.headers import (
    FormatVersion,
    HeaderInfo,
    Manifest,
    TypeInfo,
    compact_json,
)
from otad.artifact.reader import ArtifactHeader, ArtifactReader, Limits, PayloadFile, VerifyPolicy
from otad.artifact.signing import MAX_SIGNATURE_SIZE, Signer
from otad.artifact.streams import BLOCK_SIZE, Readable
from otad.artifact.tarstream import MAX_EXTENDED_HEADER, MAX_TRAILING_ZEROS
from otad.artifact.writer import rootfs_image
from otad.errors import (
    BadSignature,
    ChecksumMismatch,
    ChunkMismatch,
    CompressionError,
    LimitExceeded,
    MalformedArtifact,
    MemberOrderError,
    MissingMember,
    MissingSignature,
    OtadError,
    TruncatedArtifact,
    UnexpectedMember,
    UnknownFormat,
    UnsafePath,
    UnsupportedFeature,
)
from tests.artifact.conftest import ArtifactFactory, KeyPair, make_payload

BLOCK = 512
CHUNK = 4096
ROOTFS = "rootfs.ext4"
VERSION = FormatVersion().serialize()
# The prefetcher runs ahead of the consumer by at most its queue (4 blocks), the block
# the consumer holds and the one it is filling.
READ_AHEAD = 6 * BLOCK_SIZE
BOMB = 16 << 20
COMPRESSED = [Compression.GZIP, Compression.XZ, Compression.ZSTD]

E = TypeVar("E", bound=OtadError)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload_bytes(size: int, seed: int = 7) -> bytes:
    generator = random.Random(seed)
    return generator.randbytes(size // 2) + bytes(size - size // 2)


PAYLOAD = payload_bytes(12000)  # three chunks of CHUNK bytes, the last one short


# -- packing tar archives by hand ----------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A tar member written by hand: any name, tar type, declared size and data."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    size: int | None = None  # the declared size, where it must differ from len(data)
    linkname: str = ""

    def header(self) -> bytes:
        info = tarfile.TarInfo(self.name)
        info.size = len(self.data) if self.size is None else self.size
        info.type = self.type
        info.linkname = self.linkname
        info.mode = 0o644
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def pax_records(records: Mapping[str, str]) -> bytes:
    """Pax records, each `<length> <key>=<value>\\n` with the length counting itself."""
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + 1
        while length != len(body) + len(str(length)):
            length = len(body) + len(str(length))
        out += str(length).encode() + body
    return out


def pax(records: Mapping[str, str]) -> Member:
    return Member("././@PaxHeader", pax_records(records), tarfile.XHDTYPE)


def tar_bytes(members: Iterable[Member], trailer: bytes = bytes(2 * BLOCK)) -> bytes:
    out = bytearray()
    for member in members:
        out += member.header() + member.data + bytes(-len(member.data) % BLOCK)
    return bytes(out + trailer)


def compress(data: bytes, compression: Compression) -> bytes:
    out = io.BytesIO()
    writer = CompressingWriter(out, compression)
    writer.write(data)
    writer.finish()
    return out.getvalue()


def decompress(data: bytes, compression: Compression) -> bytes:
    if compression is Compression.GZIP:
        return gzip.decompress(data)
    if compression is Compression.XZ:
        return lzma.decompress(data)
    if compression is Compression.ZSTD:
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


def read_members(raw: bytes) -> list[Member]:
    """The regular members of a well-formed tar archive, with their data."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for info in tar:
            stream = tar.extractfile(info)
            assert stream is not None
            members.append(Member(info.name, stream.read()))
    return members


# -- artifacts packed by hand --------------------------------------------------------


@dataclass(frozen=True, repr=False)  # the default repr would print every byte
class Parts:
    """The pieces of a one-payload artifact, packed by `outer_members`.

    The defaults give a valid, unsigned rootfs-image artifact with otad's size promise
    and chunk index. Each field replaces one piece; the manifest always lists the true
    SHA-256 of version, the header member as stored and every file in `files`.
    """

    files: Mapping[str, bytes] = field(default_factory=lambda: {ROOTFS: PAYLOAD})
    payload_type: str = "rootfs-image"
    compression: Compression = Compression.GZIP
    promise: bool = True
    chunk_size: int | None = CHUNK
    version: bytes = VERSION
    header: tuple[Member, ...] | None = None  # instead of the standard header members
    header_extra: tuple[Member, ...] = ()
    header_trailer: bytes = bytes(2 * BLOCK)
    header_raw: bytes | None = None  # the stored (compressed) header member itself
    data: tuple[Member, ...] | None = None  # instead of one member per file
    data_trailer: bytes = bytes(2 * BLOCK)
    data_raw: bytes | None = None
    extra_checksums: Mapping[str, str] = field(default_factory=dict)
    signer: Signer | None = None

    @property
    def header_name(self) -> str:
        return f"header.tar{self.compression.suffix}"

    @property
    def data_name(self) -> str:
        return f"data/0000.tar{self.compression.suffix}"


def standard_header(parts: Parts) -> list[Member]:
    info = HeaderInfo((parts.payload_type,), "release-1", compatible_devices=("qemux86-64",))
    type_info = TypeInfo(parts.payload_type, {"rootfs-image.version": "release-1"})
    members = [
        Member("header-info", info.serialize()),
        Member("headers/0000/type-info", type_info.serialize()),
    ]
    if parts.promise:
        index = None
        if parts.chunk_size:
            hasher = ChunkHasher(parts.chunk_size)
            hasher.update(next(iter(parts.files.values())))
            index = hasher.finish()
        sizes = {name: len(data) for name, data in parts.files.items()}
        meta = promise_to_meta_data(sizes, index)
        members.append(Member("headers/0000/meta-data", compact_json(meta)))
    return members


def header_member(parts: Parts) -> bytes:
    if parts.header_raw is not None:
        return parts.header_raw
    members = list(parts.header) if parts.header is not None else standard_header(parts)
    archive = tar_bytes([*members, *parts.header_extra], parts.header_trailer)
    return compress(archive, parts.compression)


def data_member(parts: Parts) -> bytes:
    if parts.data_raw is not None:
        return parts.data_raw
    members = parts.data
    if members is None:
        members = tuple(Member(name, data) for name, data in parts.files.items())
    return compress(tar_bytes(members, parts.data_trailer), parts.compression)


def manifest_bytes(parts: Parts, header: bytes) -> bytes:
    checksums = {"version": sha256(parts.version), parts.header_name: sha256(header)}
    checksums |= {f"data/0000/{name}": sha256(data) for name, data in parts.files.items()}
    checksums |= parts.extra_checksums
    return Manifest(checksums).serialize()


def outer_members(parts: Parts) -> list[Member]:
    """version, manifest, manifest.sig (when signed), header.tar*, data/0000.tar*."""
    header = header_member(parts)
    manifest = manifest_bytes(parts, header)
    members = [Member("version", parts.version), Member("manifest", manifest)]
    if parts.signer is not None:
        members.append(Member("manifest.sig", parts.signer.sign(manifest)))
    members.append(Member(parts.header_name, header))
    members.append(Member(parts.data_name, data_member(parts)))
    return members


def write(directory: Path, members: Iterable[Member], tail: bytes = b"") -> Path:
    path = directory / "hand-built.mender"
    path.write_bytes(tar_bytes(members) + tail)
    return path


def pack(directory: Path, parts: Parts, tail: bytes = b"") -> Path:
    return write(directory, outer_members(parts), tail)


# -- reading, and checking that nothing changed ------------------------------------


@dataclass
class Received:
    """Every block the reader handed to its consumer, in order."""

    blocks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.blocks)


def consume(
    path: Path, policy: VerifyPolicy | None, limits: Limits | None, received: Received
) -> ArtifactHeader:
    """Read as an installer does: the header, every block of every file, then finish."""
    with path.open("rb") as stream:
        reader = ArtifactReader(stream, policy, limits)
        reader.read_header()
        files = cast(Generator[PayloadFile, None, None], reader.payload_files())
        try:
            for payload_file in files:
                for block in payload_file.blocks():
                    received.blocks.append(bytes(block))
        finally:
            files.close()
        return reader.finish()


def snapshot(directory: Path) -> dict[str, str]:
    """SHA-256 of every file below `directory`: the reader must leave all of it alone."""
    return {
        str(path.relative_to(directory)): sha256(path.read_bytes())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def refuse(
    path: Path,
    error: type[E],
    match: str,
    *,
    policy: VerifyPolicy | None = None,
    limits: Limits | None = None,
    received: Received | None = None,
) -> E:
    """Read `path`, expecting exactly `error` with a message matching `match`."""
    before = snapshot(path.parent)

    with pytest.raises(error, match=match) as caught:
        consume(path, policy, limits, received or Received())

    assert caught.type is error, f"{caught.type.__name__} raised: {caught.value}"
    assert snapshot(path.parent) == before
    return caught.value


def trusting(key: KeyPair) -> VerifyPolicy:
    return VerifyPolicy((key.verifier,))


# -- the hand-built artifact is valid, so each failure below is the one under test --


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("tail", [b"", bytes(10 * 1024)], ids=["no-padding", "record-padding"])
def test_hand_built_artifact_is_valid(
    tmp_path: Path, keys: dict[str, KeyPair], compression: Compression, tail: bytes
) -> None:
    parts = Parts(compression=compression, signer=keys["ecdsa"].signer)
    path = pack(tmp_path, parts, tail)
    received = Received()

    header = consume(path, trusting(keys["ecdsa"]), None, received)

    assert header.name == "release-1"
    assert header.payloads[0].chunk_index is not None
    assert received.data == PAYLOAD
    assert len(received.blocks) == 3


# -- truncation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """Where one outer member lies in the artifact."""

    name: str
    start: int
    data: int
    size: int


def outer_layout(path: Path) -> tuple[list[Extent], int]:
    """The outer members' extents and the offset of the end-of-archive marker."""
    with tarfile.open(path, mode="r:") as tar:
        extents = [Extent(info.name, info.offset, info.offset_data, info.size) for info in tar]
    last = extents[-1]
    return extents, last.data + last.size + -last.size % BLOCK


CUT_PLACES = ["start", "in-header", "data", "in-data", "last-byte"]
OUTER_ROLES = ["version", "manifest", "manifest.sig", "header.tar", "data/0000.tar"]
CUTS = [(role, place) for role in OUTER_ROLES for place in CUT_PLACES] + [
    ("end-of-archive", "start"),
    ("end-of-archive", "in-header"),
]


def cut_point(extents: Sequence[Extent], end: int, role: str, place: str) -> tuple[int, str]:
    """The offset to cut at and the message the cut must produce."""
    if role == "end-of-archive":
        extent = Extent(role, end, end + BLOCK, 0)
    else:
        (extent,) = [
            e
            for e in extents
            if e.name == role or (role.endswith(".tar") and e.name.startswith(role))
        ]
    if place == "start":
        return extent.start, "^artifact ends without an end-of-archive marker$"
    if place == "in-header":
        return extent.start + 100, "^artifact ends inside a tar header$"
    offsets = {"data": 0, "in-data": extent.size // 2, "last-byte": extent.size - 1}
    return extent.data + offsets[place], rf"^artifact member {re.escape(extent.name)} ends "


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.GZIP, Compression.ZSTD])
@pytest.mark.parametrize(("role", "place"), CUTS)
def test_truncated_artifact(
    make_rootfs_artifact: ArtifactFactory,
    rootfs_file: Path,
    keys: dict[str, KeyPair],
    tmp_path: Path,
    compression: Compression,
    role: str,
    place: str,
) -> None:
    key = keys["ecdsa"]
    whole = make_rootfs_artifact(compression=compression, signer=key.signer)
    extents, end = outer_layout(whole)
    assert [e.name.split(".tar")[0] for e in extents] == [
        "version",
        "manifest",
        "manifest.sig",
        "header",
        "data/0000",
    ]
    cut, message = cut_point(extents, end, role, place)
    path = tmp_path / "cut.mender"
    path.write_bytes(whole.read_bytes()[:cut])
    received = Received()

    refuse(path, TruncatedArtifact, message, policy=trusting(key), received=received)

    # Verified chunks may have been handed on before the cut; each was intact.
    assert received.data == rootfs_file.read_bytes()[: len(received.data)]


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize("level", ["compressed stream", "archive inside"])
def test_truncated_inside_the_data_member(
    tmp_path: Path, compression: Compression, level: str
) -> None:
    parts = Parts(compression=compression)
    if level == "compressed stream":
        stored = data_member(parts)
        parts = dataclasses.replace(parts, data_raw=stored[: len(stored) // 2])
        # zstd frames are walked block by block, so a cut frame is found as a cut.
        message = rf"data/0000\.tar{compression.suffix}: compressed stream ends early"
    else:
        archive = tar_bytes([Member(ROOTFS, PAYLOAD)])
        cut = archive[: BLOCK + 5000]
        parts = dataclasses.replace(parts, data_raw=compress(cut, compression))
        message = rf"data/0000\.tar\.\w+ member {ROOTFS} ends 7000 bytes before its declared end"
    path = pack(tmp_path, parts)

    refuse(path, TruncatedArtifact, message)


# -- tampering -----------------------------------------------------------------------


def extent_of(path: Path, name: str) -> Extent:
    """The extent of member `name`, or of the one member named `name` plus a suffix."""
    extents, _ = outer_layout(path)
    (extent,) = [e for e in extents if e.name == name or e.name.startswith(f"{name}.")]
    return extent


def flip_manifest_digest(path: Path, line: str) -> None:
    """Change the first hex digit of the manifest's digest for `line`, in place."""
    raw = bytearray(path.read_bytes())
    manifest = next(e for e in outer_layout(path)[0] if e.name == "manifest")
    digest = raw.index(f"  {line}\n".encode(), manifest.data) - 64
    raw[digest : digest + 1] = b"1" if raw[digest : digest + 1] == b"0" else b"0"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("signed", "line", "error", "message", "blocks"),
    [
        pytest.param(
            True,
            "version",
            BadSignature,
            r"does not verify with any trusted key \(.*ecdsa\.pub\)",
            0,
            id="signed",
        ),
        pytest.param(
            False,
            "version",
            ChecksumMismatch,
            "^checksum of version is [0-9a-f]{64}, the manifest says [0-9a-f]{64}$",
            0,
            id="version-line",
        ),
        pytest.param(
            False,
            "header.tar.gz",
            ChecksumMismatch,
            r"^checksum of header\.tar\.gz is",
            0,
            id="header-line",
        ),
    ],
)
def test_tampered_manifest(
    make_rootfs_artifact: ArtifactFactory,
    keys: dict[str, KeyPair],
    signed: bool,
    line: str,
    error: type[OtadError],
    message: str,
    blocks: int,
) -> None:
    key = keys["ecdsa"]
    path = make_rootfs_artifact(signer=key.signer if signed else None)
    flip_manifest_digest(path, line)
    received = Received()

    refuse(path, error, message, policy=trusting(key) if signed else None, received=received)

    assert len(received.blocks) == blocks


def test_manifest_line_of_an_unindexed_payload_file(
    make_rootfs_artifact: ArtifactFactory, rootfs_file: Path
) -> None:
    # Without a chunk index the manifest's digest is the only check of the file: its
    # last block is held back until the whole file matched, which it no longer does.
    payload = rootfs_image(rootfs_file, software_version="release-1", chunk_size=None)
    path = make_rootfs_artifact(payload=payload)
    flip_manifest_digest(path, f"data/0000/{ROOTFS}")
    received = Received()

    refuse(path, ChecksumMismatch, rf"^checksum of data/0000/{ROOTFS} is", received=received)

    assert received.blocks == []


def test_manifest_line_of_an_indexed_payload_file(
    make_rootfs_artifact: ArtifactFactory, rootfs_file: Path
) -> None:
    # With a chunk index (in header.tar, whose digest the manifest carries) the chunks
    # are the check and pin every byte, so the whole-file digest is not computed: a
    # line that disagrees with them changes nothing that is delivered. Only an unsigned
    # artifact can carry such a line; a signed one fails its signature first.
    path = make_rootfs_artifact()
    flip_manifest_digest(path, f"data/0000/{ROOTFS}")
    received = Received()

    consume(path, None, None, received)

    assert received.data == rootfs_file.read_bytes()


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_tampered_header_tar(
    make_rootfs_artifact: ArtifactFactory,
    keys: dict[str, KeyPair],
    compression: Compression,
    signed: bool,
) -> None:
    key = keys["ed25519"]
    path = make_rootfs_artifact(compression=compression, signer=key.signer if signed else None)
    header = extent_of(path, "header.tar")
    raw = bytearray(path.read_bytes())
    listed = sha256(raw[header.data : header.data + header.size])
    raw[header.data + header.size // 2] ^= 0x01
    path.write_bytes(bytes(raw))

    error = refuse(
        path,
        ChecksumMismatch,
        rf"^checksum of {re.escape(header.name)} is [0-9a-f]{{64}}, the manifest says {listed}$",
        policy=trusting(key) if signed else None,
    )

    assert (error.name, error.expected) == (header.name, listed)


def repack_data(path: Path, compression: Compression, edit: Callable[[bytes], bytes]) -> None:
    """Rewrite the data member's archive through `edit`, keeping the signed members."""
    members = read_members(path.read_bytes())
    data = members[-1]
    archive = edit(decompress(data.data, compression))
    members[-1] = Member(data.name, compress(archive, compression))
    path.write_bytes(tar_bytes(members))


def flip_payload_byte(position: int) -> Callable[[bytes], bytes]:
    def edit(archive: bytes) -> bytes:
        changed = bytearray(archive)
        changed[BLOCK + position] ^= 0x80  # the first member's data follows its header
        return bytes(changed)

    return edit


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("chunk", [0, 2, 4])
def test_tampered_payload_with_chunk_index(
    make_rootfs_artifact: ArtifactFactory,
    rootfs_file: Path,
    keys: dict[str, KeyPair],
    compression: Compression,
    chunk: int,
) -> None:
    key = keys["ecdsa"]
    chunk_size = 64 * 1024
    original = rootfs_file.read_bytes()
    path = make_rootfs_artifact(compression=compression, signer=key.signer)
    repack_data(path, compression, flip_payload_byte(chunk * chunk_size + 99))
    bad = bytearray(original[chunk * chunk_size : (chunk + 1) * chunk_size])
    bad[99] ^= 0x80
    received = Received()

    error = refuse(
        path,
        ChunkMismatch,
        rf"^chunk {chunk} of {ROOTFS} has checksum [0-9a-f]{{64}}, the signed chunk index says",
        policy=trusting(key),
        received=received,
    )

    good = original[chunk * chunk_size : (chunk + 1) * chunk_size]
    assert (error.name, error.index) == (ROOTFS, chunk)
    assert (error.expected, error.found) == (sha256(good), sha256(bytes(bad)))
    # The bad chunk never reached the consumer: only the good chunks before it did.
    assert received.blocks == [
        original[number * chunk_size : (number + 1) * chunk_size] for number in range(chunk)
    ]


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.GZIP, Compression.ZSTD])
@pytest.mark.parametrize("block", [0, 2])
def test_tampered_payload_without_chunk_index(
    make_rootfs_artifact: ArtifactFactory,
    tmp_path: Path,
    compression: Compression,
    block: int,
) -> None:
    big = make_payload(tmp_path / "big.ext4", 2 * BLOCK_SIZE + 300_000)
    original = big.read_bytes()
    payload = rootfs_image(big, software_version="1", chunk_size=None)
    path = make_rootfs_artifact(compression=compression, payload=payload)
    repack_data(path, compression, flip_payload_byte(block * BLOCK_SIZE + 7))
    received = Received()

    error = refuse(
        path, ChecksumMismatch, r"^checksum of data/0000/big\.ext4 is", received=received
    )

    assert error.expected == sha256(original)
    # Without an index only the whole file can be checked: the final block is held back.
    assert len(received.blocks) == 2
    assert (received.data == original[: 2 * BLOCK_SIZE]) is (block == 2)


# -- signatures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed_by", "trusted", "signature", "error", "message"),
    [
        ("other", ("ecdsa",), None, BadSignature, r"does not verify with any trusted key \("),
        ("rsa", ("ecdsa", "ed25519"), None, BadSignature, r"ecdsa\.pub, .*ed25519\.pub\)$"),
        ("ed25519", ("rsa",), None, BadSignature, "does not verify with any trusted key"),
        (None, ("ecdsa",), None, MissingSignature, "not signed, but a trusted signature is"),
        ("ecdsa", ("ecdsa",), b"!!! not base64 !!!", BadSignature, "is not valid base64"),
        ("ecdsa", ("ecdsa",), b"QUJDRA=", BadSignature, "is not valid base64"),
        ("ecdsa", ("ecdsa",), b"QUJD\x00RA==", BadSignature, "is not valid base64"),
        ("ecdsa", ("ecdsa",), b"A" * 88, BadSignature, "does not verify"),
        ("rsa", ("rsa",), b"", BadSignature, "does not verify"),
        ("ed25519", ("ed25519",), b"AAAA", BadSignature, "does not verify"),
    ],
)
def test_signature_refused(
    tmp_path: Path,
    keys: dict[str, KeyPair],
    signed_by: str | None,
    trusted: tuple[str, ...],
    signature: bytes | None,
    error: type[OtadError],
    message: str,
) -> None:
    signer = keys[signed_by].signer if signed_by else None
    members = outer_members(Parts(signer=signer))
    if signature is not None:
        members[2] = Member("manifest.sig", signature)
    path = write(tmp_path, members)
    policy = VerifyPolicy(tuple(keys[name].verifier for name in trusted))

    refuse(path, error, message, policy=policy)


# -- the version member ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "error", "message"),
    [
        ({"format": "mender", "version": 2}, UnknownFormat, "version 2, only 3 is read"),
        ({"format": "mender", "version": 4}, UnknownFormat, "version 4, only 3 is read"),
        ({"format": "mender", "version": "3"}, UnknownFormat, "version '3', only 3 is read"),
        ({"format": "mender"}, UnknownFormat, "version None, only 3 is read"),
        ({"format": "tar", "version": 3}, UnknownFormat, "format is 'tar', expected 'mender'"),
        ({"version": 3}, UnknownFormat, "format is None, expected 'mender'"),
        (b"mender 3", MalformedArtifact, "^version is not valid JSON"),
        (b"\xff\xfe", MalformedArtifact, "^version is not valid JSON"),
        ([3], MalformedArtifact, "^version must hold a JSON object, found list"),
    ],
)
def test_version_refused(
    tmp_path: Path,
    keys: dict[str, KeyPair],
    version: object,
    error: type[OtadError],
    message: str,
) -> None:
    raw = version if isinstance(version, bytes) else json.dumps(version).encode()
    parts = Parts(version=raw, signer=keys["ecdsa"].signer)

    refuse(pack(tmp_path, parts), error, message, policy=trusting(keys["ecdsa"]))


# -- the outer members -----------------------------------------------------------------

Arrangement = Sequence[str | Member]


def arrange(members: Sequence[Member], order: Arrangement) -> list[Member]:
    """Members of a signed artifact in `order`: roles name existing ones, Members are new."""
    roles = dict(zip(["version", "manifest", "sig", "header", "data"], members, strict=True))
    return [roles[item] if isinstance(item, str) else item for item in order]


STANDARD = ("version", "manifest", "sig", "header", "data")
README = Member("README", b"hello\n")


@pytest.mark.parametrize(
    ("order", "error", "message"),
    [
        pytest.param(
            ("manifest", "version", "sig", "header", "data"),
            MemberOrderError,
            "^artifact member 'manifest' found where version belongs$",
            id="manifest-first",
        ),
        pytest.param(
            ("manifest", "sig", "header", "data"),
            MemberOrderError,
            "'manifest' found where version belongs",
            id="no-version",
        ),
        pytest.param(
            ("version", "sig", "header", "data"),
            MemberOrderError,
            "'manifest.sig' found where manifest belongs",
            id="no-manifest",
        ),
        pytest.param(
            ("version", "sig", "manifest", "header", "data"),
            MemberOrderError,
            "'manifest.sig' found where manifest belongs",
            id="signature-before-manifest",
        ),
        pytest.param(
            ("version", "manifest", "sig", "data"),
            MemberOrderError,
            r"'data/0000\.tar\.gz' found where header\.tar belongs",
            id="no-header",
        ),
        pytest.param(
            ("version", "manifest", "sig", "data", "header"),
            MemberOrderError,
            r"'data/0000\.tar\.gz' found where header\.tar belongs",
            id="data-before-header",
        ),
        pytest.param(
            ("version", "manifest", "sig"),
            MissingMember,
            "^artifact ends where header.tar was expected$",
            id="ends-after-signature",
        ),
        pytest.param((), MissingMember, "^artifact ends where version was expected$", id="empty"),
        pytest.param(
            ("version", "version", "manifest", "sig", "header", "data"),
            MemberOrderError,
            "'version' found where manifest belongs",
            id="version-twice",
        ),
        pytest.param(
            ("version", "manifest", "sig", "sig", "header", "data"),
            MemberOrderError,
            r"'manifest\.sig' found where header\.tar belongs",
            id="signature-twice",
        ),
        pytest.param(
            (*STANDARD[:4], "manifest", "data"),
            MemberOrderError,
            "^artifact member manifest appears again after the header$",
            id="manifest-again",
        ),
        pytest.param(
            (*STANDARD[:4], "header", "data"),
            MemberOrderError,
            r"^artifact member header\.tar\.gz appears again after the header$",
            id="header-twice",
        ),
        pytest.param(
            (*STANDARD, "version"),
            MemberOrderError,
            "^artifact member version appears again after the header$",
            id="version-at-the-end",
        ),
        pytest.param(
            (*STANDARD, "data"),
            MemberOrderError,
            r"^artifact member data/0000\.tar\.gz out of order or without a payload$",
            id="data-twice",
        ),
        pytest.param(
            (*STANDARD[:4], Member("data/0001.tar.gz")),
            MemberOrderError,
            r"data/0001\.tar\.gz out of order or without a payload",
            id="data-numbered-wrong",
        ),
        pytest.param(
            (*STANDARD, Member("data/0001.tar.gz")),
            MemberOrderError,
            r"data/0001\.tar\.gz out of order or without a payload",
            id="data-without-payload",
        ),
        pytest.param(
            (*STANDARD, README),
            UnexpectedMember,
            "^artifact member 'README' is not part of the format$",
            id="unknown-at-the-end",
        ),
        pytest.param(
            ("version", "manifest", "sig", README, "header", "data"),
            MemberOrderError,
            r"^artifact member 'README' found where header\.tar belongs$",
            id="unknown-before-header",
        ),
        pytest.param(
            (*STANDARD[:3], Member("header.tar.bz2"), "data"),
            MemberOrderError,
            r"'header\.tar\.bz2' found where header\.tar belongs",
            id="header-unknown-compression",
        ),
        pytest.param(
            (*STANDARD[:4], Member("data/0000.tar.bz2")),
            UnexpectedMember,
            r"'data/0000\.tar\.bz2' is not part of the format",
            id="data-unknown-compression",
        ),
        pytest.param(
            (*STANDARD[:3], Member("manifest-augment", b"0" * 64 + b"  x\n"), "header", "data"),
            UnsupportedFeature,
            "^artifact has manifest-augment .*otad accepts only fully signed artifacts$",
            id="manifest-augment",
        ),
        pytest.param(
            (*STANDARD[:4], Member("header-augment.tar.gz"), "data"),
            UnsupportedFeature,
            "^artifact has header-augment .*otad accepts only fully signed artifacts$",
            id="header-augment",
        ),
        pytest.param(
            (*STANDARD, Member("header-augment")),
            UnsupportedFeature,
            "artifact has header-augment",
            id="header-augment-at-the-end",
        ),
        pytest.param(
            (Member("version", type=tarfile.DIRTYPE), *STANDARD[1:]),
            MalformedArtifact,
            "^artifact member version is not a regular file$",
            id="version-is-a-directory",
        ),
    ],
)
def test_outer_members_refused(
    tmp_path: Path,
    keys: dict[str, KeyPair],
    order: Arrangement,
    error: type[OtadError],
    message: str,
) -> None:
    members = outer_members(Parts(signer=keys["ecdsa"].signer))
    path = write(tmp_path, arrange(members, order))

    refuse(path, error, message, policy=trusting(keys["ecdsa"]))


# -- what the manifest, the header and the data archive hold -------------------------


TYPE_INFO = Member("headers/0000/type-info", b'{"type":"rootfs-image"}')
HEADER_INFO = Member(
    "header-info",
    b'{"payloads":[{"type":"rootfs-image"}],"artifact_provides":{"artifact_name":"a"},'
    b'"artifact_depends":{"device_type":["qemux86-64"]}}',
)


def header_info(payloads: object) -> Member:
    value = {
        "payloads": payloads,
        "artifact_provides": {"artifact_name": "a"},
        "artifact_depends": {"device_type": ["qemux86-64"]},
    }
    return Member("header-info", json.dumps(value).encode())


@pytest.mark.parametrize(
    ("parts", "error", "message"),
    [
        pytest.param(
            Parts(header=(TYPE_INFO, HEADER_INFO)),
            MemberOrderError,
            "^header.tar.gz: first member is 'headers/0000/type-info', expected header-info$",
            id="header-info-not-first",
        ),
        pytest.param(
            Parts(header=()),
            MemberOrderError,
            "first member is 'the end of the archive', expected header-info",
            id="empty-header",
        ),
        pytest.param(
            Parts(header=(HEADER_INFO,), promise=False),
            MissingMember,
            "header-info lists 1 payloads, type-info found for 0",
            id="no-type-info",
        ),
        pytest.param(
            Parts(header=(HEADER_INFO, TYPE_INFO, TYPE_INFO), promise=False),
            MemberOrderError,
            "headers/0000/type-info out of order or without a payload",
            id="type-info-twice",
        ),
        pytest.param(
            Parts(header=(HEADER_INFO, Member("headers/0000/meta-data", b"{}"), TYPE_INFO)),
            MemberOrderError,
            "headers/0000/meta-data repeated or without its type-info",
            id="meta-data-first",
        ),
        pytest.param(
            Parts(header_extra=(Member("scripts/ArtifactInstall_Enter_00", b"#!/bin/sh\n"),)),
            MemberOrderError,
            "script 'scripts/ArtifactInstall_Enter_00' after the headers",
            id="script-after-headers",
        ),
        pytest.param(
            Parts(header_extra=(Member("headers/0000/files", b"[]"),)),
            UnexpectedMember,
            "^header.tar.gz: unexpected member 'headers/0000/files'$",
            id="unknown-header-member",
        ),
        pytest.param(
            Parts(header_extra=(Member("etc", type=tarfile.DIRTYPE),)),
            UnexpectedMember,
            "unexpected directory 'etc'",
            id="unknown-header-directory",
        ),
        pytest.param(
            Parts(header=(HEADER_INFO, Member(TYPE_INFO.name, b'{"type":"directory"}'))),
            MalformedArtifact,
            "payload 0 is 'rootfs-image' in header-info but 'directory' in its type-info",
            id="type-differs",
        ),
        pytest.param(
            Parts(header=(HEADER_INFO, Member(TYPE_INFO.name, b'{"type":'))),
            MalformedArtifact,
            "headers/0000/type-info is not valid JSON",
            id="type-info-not-json",
        ),
        pytest.param(
            Parts(header=(header_info([{}]), TYPE_INFO)),
            MalformedArtifact,
            r"^header-info: payload entry \{\} has no type$",
            id="payload-without-type",
        ),
        pytest.param(
            Parts(header=(header_info([{"type": "rootfs-image"}] * 65),)),
            LimitExceeded,
            "^header-info lists 65 payloads$",
            id="too-many-payloads",
        ),
        pytest.param(
            Parts(data=(Member(ROOTFS, PAYLOAD), Member("stray", b"x"))),
            UnexpectedMember,
            r"^data/0000\.tar\.gz holds 'stray', which the manifest does not list$",
            id="file-not-in-manifest",
        ),
        pytest.param(
            Parts(data=(Member(ROOTFS, PAYLOAD), Member(ROOTFS, PAYLOAD))),
            MalformedArtifact,
            f"holds '{ROOTFS}' twice",
            id="file-twice",
        ),
        pytest.param(
            Parts(data=()),
            MissingMember,
            f"^manifest lists data/0000/{ROOTFS}, but the artifact does not hold it$",
            id="file-missing",
        ),
        pytest.param(
            Parts(extra_checksums={"bogus": "0" * 64}),
            UnexpectedMember,
            "^manifest lists 'bogus', which no payload can hold$",
            id="manifest-lists-unknown",
        ),
        pytest.param(
            Parts(extra_checksums={"data/0001/x": "0" * 64}),
            UnexpectedMember,
            "manifest lists 'data/0001/x', which no payload can hold",
            id="manifest-lists-second-payload",
        ),
        pytest.param(
            Parts(extra_checksums={"data/0000/extra": "0" * 64}),
            MalformedArtifact,
            r"payload 0 promises files \['rootfs.ext4'\] but the manifest lists \['extra', ",
            id="manifest-beyond-promise",
        ),
        pytest.param(
            Parts(data=(Member(f"sub/{ROOTFS}", PAYLOAD),)),
            UnsafePath,
            f"'sub/{ROOTFS}' is not a plain file at the top of the archive",
            id="file-in-subdirectory",
        ),
        pytest.param(
            Parts(data=(Member("sub", type=tarfile.DIRTYPE), Member(ROOTFS, PAYLOAD))),
            UnsafePath,
            "'sub' is not a plain file at the top of the archive",
            id="directory-in-data",
        ),
        pytest.param(
            Parts(data=(Member(ROOTFS, PAYLOAD[:-1]),)),
            LimitExceeded,
            f"^data/0000/{ROOTFS} is 11999 bytes, the signed header promises 12000$",
            id="file-smaller-than-promised",
        ),
    ],
)
def test_contents_refused(
    tmp_path: Path, parts: Parts, error: type[OtadError], message: str
) -> None:
    refuse(pack(tmp_path, parts), error, message)


# -- dangerous names and member types --------------------------------------------------


def place(where: str, member: Member, *, pax_path: str | None = None) -> list[Member]:
    """A valid artifact's outer members with `member` put into the archive `where`."""
    added = [pax({"path": pax_path}), member] if pax_path else [member]
    if where == "outer":
        return [*added, *outer_members(Parts())]
    if where == "header":
        return outer_members(Parts(header_extra=tuple(added)))
    return outer_members(Parts(data=(*added, Member(ROOTFS, PAYLOAD))))


WHAT = {"outer": "artifact", "header": r"header\.tar\.gz", "data": r"data/0000\.tar\.gz"}
CLIMBING = "has an empty, '.' or '..' component"


@pytest.mark.parametrize("where", ["outer", "header", "data"])
@pytest.mark.parametrize("carrier", ["tar-name", "pax-path"])
@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../x", CLIMBING),
        ("/etc/passwd", "absolute member name '/etc/passwd', expected a relative one"),
        ("a/../../b", CLIMBING),
        ("./version", CLIMBING),
        ("a//b", CLIMBING),
        ("d/" * 60 + "../../etc/shadow", CLIMBING),  # a GNU long name, beyond 100 bytes
    ],
)
def test_unsafe_names_refused(
    tmp_path: Path, where: str, carrier: str, name: str, fragment: str
) -> None:
    if carrier == "tar-name":
        members = place(where, Member(name, b"{}"))
    else:
        members = place(where, Member("harmless", b"{}"), pax_path=name)

    error = refuse(write(tmp_path, members), UnsafePath, f"^{WHAT[where]}: ")

    assert fragment in str(error)
    assert repr(name) in str(error)


@pytest.mark.parametrize("where", ["outer", "header", "data"])
@pytest.mark.parametrize(
    "kind",
    [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE],
    ids=["symlink", "hardlink", "char-device", "block-device", "fifo"],
)
def test_links_and_devices_refused(tmp_path: Path, where: str, kind: bytes) -> None:
    name = {"outer": "version", "header": "headers/0000/meta-data", "data": ROOTFS}[where]
    members = place(where, Member(name, type=kind, linkname="/dev/mmcblk0"))

    refuse(
        write(tmp_path, members),
        MalformedArtifact,
        rf"^{WHAT[where]}: member '{name}' has tar type {re.escape(repr(kind))}; "
        "only regular files and directories are allowed$",
    )


def with_header_field(block: bytes, start: int, value: bytes) -> bytes:
    """`block` with the field at `start` replaced and the header checksum made right."""
    changed = bytearray(block)
    changed[start : start + len(value)] = value
    changed[148:156] = b" " * 8
    changed[148:156] = b"%06o\0 " % sum(changed)
    return bytes(changed)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        pytest.param(
            lambda block: block[:148] + b"0000001\0" + block[156:],
            MalformedArtifact,
            "^artifact: bad tar header checksum at byte 0$",
            id="bad-checksum",
        ),
        pytest.param(
            lambda block: with_header_field(block, 124, b"-0000000001\0"),
            MalformedArtifact,
            r"tar size field is not an octal number: b'-0000000001'",
            id="negative-size",
        ),
        pytest.param(
            lambda block: with_header_field(block, 124, b"0000_000035\0"),
            MalformedArtifact,
            r"tar size field is not an octal number: b'0000_000035'",
            id="size-with-underscore",
        ),
        pytest.param(
            lambda block: with_header_field(block, 124, b"000000000x5\0"),
            MalformedArtifact,
            "tar size field is not an octal number",
            id="size-not-octal",
        ),
        pytest.param(
            lambda block: with_header_field(block, 124, b"\xff" * 12),
            MalformedArtifact,
            "tar size field is negative",
            id="negative-base-256-size",
        ),
    ],
)
def test_bad_tar_header_refused(
    tmp_path: Path, edit: Callable[[bytes], bytes], error: type[OtadError], message: str
) -> None:
    raw = tar_bytes(outer_members(Parts()))
    path = tmp_path / "bad-header.mender"
    path.write_bytes(edit(raw[:BLOCK]) + raw[BLOCK:])

    refuse(path, error, message)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (b"3 size=-1\n", "malformed pax record"),
        (pax_records({"size": "-1"}), r"pax size '-1'"),
        (pax_records({"size": "1_0"}), r"pax size '1_0'"),
        (pax_records({"size": " 12"}), r"pax size ' 12'"),
        (pax_records({"size": "\u0661\u0662"}), r"pax size"),  # Arabic-Indic digits
        (b"size=1\n", "pax record without a length"),
        (b"x1 size=1\n", "pax record length is not a number"),
        (b"12 size=1\n", "malformed pax record at byte 0"),
    ],
)
@pytest.mark.parametrize("where", ["outer", "data"])
def test_bad_pax_records_refused(tmp_path: Path, records: bytes, message: str, where: str) -> None:
    header = Member("././@PaxHeader", records, tarfile.XHDTYPE)
    if where == "outer":
        members = [header, *outer_members(Parts())]
    else:
        members = outer_members(Parts(data=(header, Member(ROOTFS, PAYLOAD))))

    refuse(write(tmp_path, members), MalformedArtifact, f"^{WHAT[where]}: {message}")


# -- sizes beyond their bounds ---------------------------------------------------------


def with_signature(members: list[Member], signature: bytes) -> list[Member]:
    """Unsigned outer members with `signature` put in as manifest.sig."""
    return [*members[:2], Member("manifest.sig", signature), *members[2:]]


BIG_PAX = pax({"comment": "x" * (MAX_EXTENDED_HEADER + 10)})
BIG_PAX_SIZE = len(BIG_PAX.data)
LONG_NAME = Member("././@LongLink", b"n" * (MAX_EXTENDED_HEADER + 1), tarfile.GNUTYPE_LONGNAME)
BIG_SCRIPT = Member("scripts/ArtifactInstall_Enter_00", bytes(1 << 20))


@pytest.mark.parametrize(
    ("members", "limits", "message"),
    [
        pytest.param(
            outer_members(Parts(compression=Compression.NONE)),
            Limits(header=2048),
            r"^artifact member header\.tar is \d+ bytes, at most 2048 allowed$",
            id="header-tar",
        ),
        pytest.param(
            outer_members(Parts(header=(HEADER_INFO, BIG_SCRIPT, TYPE_INFO), promise=False)),
            Limits(header=16384),
            r"^header\.tar\.gz decompresses to more than 16384 bytes$",
            id="header-tar-decompressed",
        ),
        pytest.param(
            outer_members(
                Parts(header=(HEADER_INFO, Member(TYPE_INFO.name, TYPE_INFO.data + b" " * 300)))
            ),
            Limits(header_file=256),
            r"header\.tar\.gz member headers/0000/type-info is \d+ bytes, at most 256 allowed",
            id="header-file",
        ),
        pytest.param(
            outer_members(Parts(version=VERSION + b" " * (5000 - len(VERSION)))),
            Limits(),
            "^artifact member version is 5000 bytes, at most 4096 allowed$",
            id="version",
        ),
        pytest.param(
            outer_members(Parts()),
            Limits(manifest=128),
            r"^artifact member manifest is \d+ bytes, at most 128 allowed$",
            id="manifest",
        ),
        pytest.param(
            with_signature(outer_members(Parts()), b"A" * (MAX_SIGNATURE_SIZE + 4)),
            Limits(),
            rf"^artifact member manifest\.sig is {MAX_SIGNATURE_SIZE + 4} bytes, at most",
            id="signature",
        ),
        pytest.param(
            [BIG_PAX, *outer_members(Parts())],
            Limits(),
            rf"^artifact: pax header of {BIG_PAX_SIZE} bytes, at most {MAX_EXTENDED_HEADER}",
            id="outer-pax",
        ),
        pytest.param(
            outer_members(Parts(header_extra=(BIG_PAX, TYPE_INFO))),
            Limits(),
            rf"^header\.tar\.gz: pax header of {BIG_PAX_SIZE} bytes",
            id="header-pax",
        ),
        pytest.param(
            outer_members(Parts(data=(BIG_PAX, Member(ROOTFS, PAYLOAD)))),
            Limits(),
            rf"^data/0000\.tar\.gz: pax header of {BIG_PAX_SIZE} bytes",
            id="data-pax",
        ),
        pytest.param(
            [LONG_NAME, *outer_members(Parts())],
            Limits(),
            rf"^artifact: GNU long name of {MAX_EXTENDED_HEADER + 1} bytes, at most",
            id="outer-long-name",
        ),
        pytest.param(
            outer_members(Parts(data=(Member(ROOTFS, PAYLOAD),), data_trailer=bytes(2 << 20))),
            Limits(),
            rf"^data/0000\.tar\.gz: more than {MAX_TRAILING_ZEROS} bytes of padding after",
            id="data-padding",
        ),
    ],
)
def test_limits_exceeded(
    tmp_path: Path, members: list[Member], limits: Limits, message: str
) -> None:
    refuse(write(tmp_path, members), LimitExceeded, message, limits=limits)


@pytest.fixture
def decompressed(monkeypatch: pytest.MonkeyPatch) -> dict[str, CountingReadable]:
    """How many decompressed bytes the reader pulled from each member, by member name."""
    opened: dict[str, CountingReadable] = {}

    def counting_open(source: Readable, compression: Compression, what: str) -> Readable:
        counter = CountingReadable(open_decompressed(source, compression, what))
        opened[what] = counter
        return counter

    monkeypatch.setattr(reader_module, "open_decompressed", counting_open)
    return opened


class CountingReadable:
    def __init__(self, source: Readable) -> None:
        self._source = source
        self.count = 0

    def readinto(self, buffer: memoryview, /) -> int:
        count = self._source.readinto(buffer) or 0
        self.count += count
        return count


def bomb_member(declared: str) -> tuple[Member, ...]:
    """A data archive whose one file holds BOMB zeros, its size declared as `declared`."""
    zeros = bytes(BOMB)
    if declared == "tar-size":
        return (Member(ROOTFS, zeros),)
    if declared == "pax-size":
        # The plain size field matches the promise; the pax record overriding it does not.
        return (pax({"size": str(BOMB)}), Member(ROOTFS, zeros, size=len(PAYLOAD)))
    return (Member(ROOTFS, zeros, size=1 << 36),)  # stored in GNU base-256


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize(
    ("declared", "size"),
    [("tar-size", BOMB), ("pax-size", BOMB), ("base-256", 1 << 36)],
)
def test_decompression_bomb_beyond_the_promise(
    tmp_path: Path,
    keys: dict[str, KeyPair],
    decompressed: dict[str, CountingReadable],
    compression: Compression,
    declared: str,
    size: int,
) -> None:
    key = keys["ecdsa"]
    parts = Parts(compression=compression, data=bomb_member(declared), signer=key.signer)
    path = pack(tmp_path, parts)
    assert path.stat().st_size < BOMB // 8
    received = Received()

    refuse(
        path,
        LimitExceeded,
        f"^data/0000/{ROOTFS} is {size} bytes, the signed header promises {len(PAYLOAD)}$",
        policy=trusting(key),
        received=received,
    )

    assert received.blocks == []
    assert decompressed[parts.data_name].count <= READ_AHEAD < BOMB


def test_decompression_bomb_after_the_promised_file(
    tmp_path: Path, decompressed: dict[str, CountingReadable]
) -> None:
    parts = Parts(compression=Compression.ZSTD, data_trailer=bytes(BOMB))
    received = Received()

    refuse(
        pack(tmp_path, parts),
        LimitExceeded,
        rf"^data/0000\.tar\.zst: more than {MAX_TRAILING_ZEROS} bytes of padding after the end$",
        received=received,
    )

    assert received.data == PAYLOAD
    pulled = decompressed[parts.data_name].count
    assert pulled <= BLOCK + len(PAYLOAD) + MAX_TRAILING_ZEROS + READ_AHEAD < BOMB


@pytest.mark.parametrize("compression", COMPRESSED)
def test_payload_limit_bounds_artifacts_without_a_promise(
    tmp_path: Path, decompressed: dict[str, CountingReadable], compression: Compression
) -> None:
    files = {"image.bin": bytes(BOMB)}
    parts = Parts(files=files, payload_type="raw", compression=compression, promise=False)
    received = Received()

    refuse(
        pack(tmp_path, parts),
        LimitExceeded,
        f"^payload files add up to {BOMB} bytes, more than the limit of {1 << 20}$",
        limits=Limits(payload=1 << 20),
        received=received,
    )

    assert received.blocks == []
    assert decompressed[parts.data_name].count <= READ_AHEAD < BOMB


def test_payload_limit_counts_all_files(tmp_path: Path) -> None:
    files = {"a.bin": payload_bytes(6000, 1), "b.bin": payload_bytes(6000, 2)}
    parts = Parts(files=files, payload_type="raw", promise=False)
    received = Received()

    refuse(
        pack(tmp_path, parts),
        LimitExceeded,
        "^payload files add up to 12000 bytes, more than the limit of 10000$",
        limits=Limits(payload=10000),
        received=received,
    )

    assert received.data == files["a.bin"]


# -- what follows the end ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "tail", "error", "message"),
    [
        pytest.param(
            Parts(),
            b"garbage",
            MalformedArtifact,
            r"^artifact: data after the end-of-archive marker at byte \d+$",
            id="after-artifact",
        ),
        pytest.param(
            Parts(),
            bytes(10240) + b"\x01",
            MalformedArtifact,
            "^artifact: data after the end-of-archive marker",
            id="after-artifact-padding",
        ),
        pytest.param(
            Parts(),
            bytes(MAX_TRAILING_ZEROS + 128 * 1024),
            LimitExceeded,
            f"^artifact: more than {MAX_TRAILING_ZEROS} bytes of padding after the end$",
            id="endless-padding",
        ),
        pytest.param(
            Parts(data_trailer=bytes(2 * BLOCK) + b"garbage"),
            b"",
            MalformedArtifact,
            r"^data/0000\.tar\.gz: data after the end-of-archive marker",
            id="after-data-archive",
        ),
        pytest.param(
            Parts(header_trailer=bytes(2 * BLOCK) + b"garbage"),
            b"",
            MalformedArtifact,
            r"^header\.tar\.gz: data after the end-of-archive marker",
            id="after-header-archive",
        ),
        pytest.param(
            Parts(data_raw=data_member(Parts()) + b"garbage"),
            b"",
            CompressionError,
            r"^data/0000\.tar\.gz: corrupt gzip data",
            id="after-gzip-stream",
        ),
        pytest.param(
            Parts(
                compression=Compression.XZ,
                data_raw=data_member(Parts(compression=Compression.XZ)) + b"garbage" * 4,
            ),
            b"",
            CompressionError,
            r"^data/0000\.tar\.xz: corrupt xz data",
            id="after-xz-stream",
        ),
        pytest.param(
            Parts(
                compression=Compression.ZSTD,
                data_raw=data_member(Parts(compression=Compression.ZSTD)) + b"garbage",
            ),
            b"",
            CompressionError,
            r"^data/0000\.tar\.zst: corrupt zstd data",
            id="after-zstd-stream",
        ),
    ],
)
def test_trailing_data_refused(
    tmp_path: Path, parts: Parts, tail: bytes, error: type[OtadError], message: str
) -> None:
    refuse(pack(tmp_path, parts, tail), error, message)


def corrupt_magic(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize("member", ["header", "data"])
def test_corrupt_compression_refused(tmp_path: Path, compression: Compression, member: str) -> None:
    parts = Parts(compression=compression)
    if member == "header":
        parts = dataclasses.replace(parts, header_raw=corrupt_magic(header_member(parts)))
        name = parts.header_name
    else:
        parts = dataclasses.replace(parts, data_raw=corrupt_magic(data_member(parts)))
        name = parts.data_name

    refuse(
        pack(tmp_path, parts),
        CompressionError,
        rf"^{re.escape(name)}: corrupt {compression.value} data: ",
    )


@pytest.mark.parametrize(
    ("named", "stored"), [(Compression.GZIP, Compression.ZSTD), (Compression.ZSTD, Compression.XZ)]
)
def test_compression_other_than_named_refused(
    tmp_path: Path, named: Compression, stored: Compression
) -> None:
    header = tar_bytes(standard_header(Parts()))
    parts = Parts(compression=named, header_raw=compress(header, stored))

    refuse(pack(tmp_path, parts), CompressionError, f"corrupt {named.value} data")
