"""Mutated artifacts make the reader fail with an otad error, or yield the listed bytes.

A property test over valid artifacts of every compression and payload kind, signed and
unsigned. Bytes are flipped, overwritten, inserted, deleted or cut off, in the artifact
itself and inside its members: decompressed archives and the files in them are repacked,
and the manifest and signature made to match again, so that mutations reach the parsers
behind the checksums. Whatever the reader makes of the result, it either refuses it with
an OtadError (never a ValueError, KeyError, zlib.error and the like) or hands out files
whose SHA-256 are the ones its manifest lists.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from otad.artifact.compression import Compression, split_suffix
from otad.artifact.headers import Manifest
from otad.artifact.reader import (
    ArtifactHeader,
    ArtifactReader,
    Limits,
    PayloadFile,
    SignatureStatus,
    VerifyPolicy,
)
from otad.artifact.signing import Signer
from otad.artifact.writer import (
    ArtifactSpec,
    PayloadSpec,
    bootstrap,
    module_image,
    rootfs_image,
    write_artifact,
)
from otad.errors import OtadError
from tests.artifact.conftest import KeyPair, make_payload
from tests.artifact.test_bad_input import (
    BLOCK,
    Member,
    compress,
    decompress,
    read_members,
    tar_bytes,
)

LIMITS = Limits(header=256 * 1024, header_file=64 * 1024, payload=1 << 20)
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True, repr=False)
class Base:
    """A valid artifact taken apart: its outer members and what it must yield."""

    name: str
    raw: bytes
    members: tuple[Member, ...]
    compression: Compression
    signer: Signer | None
    policy: VerifyPolicy
    files: Mapping[str, bytes]  # manifest name -> content

    def __repr__(self) -> str:
        return f"Base({self.name})"

    def index(self, name: str) -> int:
        """Where member `name` is, or the one member whose name starts with `name`."""
        names = [member.name for member in self.members]
        if name in names:
            return names.index(name)
        (position,) = [i for i, member in enumerate(names) if member.startswith(name)]
        return position

    def repack(self, replaced: Mapping[int, bytes], *, relist: bool, resign: bool) -> bytes:
        """The artifact with members replaced. With `relist` the manifest lists the new
        checksums of version and header.tar; with `resign` it is signed again."""
        members = list(self.members)
        for position, data in replaced.items():
            members[position] = replace(members[position], data=data)
        if relist:
            manifest_at = self.index("manifest")
            checksums = dict(Manifest.parse(members[manifest_at].data).checksums)
            for member in members:
                if member.name in checksums:
                    checksums[member.name] = hashlib.sha256(member.data).hexdigest()
            members[manifest_at] = Member("manifest", Manifest(checksums).serialize())
        return tar_bytes(self.signed(members) if resign else members)

    def signed(self, members: list[Member]) -> list[Member]:
        if self.signer is None:
            return members
        manifest = members[self.index("manifest")].data
        signature = self.signer.sign(manifest)
        return [replace(m, data=signature) if m.name == "manifest.sig" else m for m in members]


def make_base(
    directory: Path,
    name: str,
    payload: PayloadSpec,
    compression: Compression,
    key: KeyPair | None,
    scripts: tuple[Path, ...] = (),
) -> Base:
    spec = ArtifactSpec(
        name=name,
        device_types=("qemux86-64",),
        payload=payload,
        compression=compression,
        signer=key.signer if key else None,
        scripts=scripts,
    )
    raw = write_artifact(spec, directory / f"{name}.mender").path.read_bytes()
    files = {f"data/0000/{path.name}": path.read_bytes() for path in payload.files}
    policy = VerifyPolicy((key.verifier,)) if key else VerifyPolicy()
    signer = key.signer if key else None
    members = tuple(read_members(raw))
    return Base(name, raw, members, compression, signer, policy, files)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]) -> dict[str, Base]:
    """Small artifacts of each compression and payload kind, some of them signed."""
    directory = tmp_path_factory.mktemp("fuzz")
    rootfs = make_payload(directory / "rootfs.ext4", 10_000)
    script = directory / "ArtifactInstall_Enter_10"
    script.write_bytes(b"#!/bin/sh\nexit 0\n")
    module_files = [
        make_payload(directory / "app.tar", 3000, seed=2),
        make_payload(directory / "empty", 0),
    ]
    chunked = rootfs_image(rootfs, software_version="1.0", chunk_size=4096)
    unchunked = rootfs_image(rootfs, software_version="1.0", chunk_size=None)
    module = module_image(
        "directory", module_files, software_version="2", meta_data={"dest_dir": "/opt"}
    )
    built = [
        make_base(directory, "rootfs-gzip", chunked, Compression.GZIP, keys["ecdsa"]),
        make_base(directory, "rootfs-zstd", chunked, Compression.ZSTD, None, (script,)),
        make_base(directory, "rootfs-none", unchunked, Compression.NONE, keys["ed25519"]),
        make_base(directory, "module-xz", module, Compression.XZ, None),
        make_base(directory, "bootstrap", bootstrap(), Compression.GZIP, keys["ecdsa"]),
    ]
    return {base.name: base for base in built}


BASE_NAMES = ["rootfs-gzip", "rootfs-zstd", "rootfs-none", "module-xz", "bootstrap"]


# -- mutations -----------------------------------------------------------------------


@dataclass(frozen=True)
class ByteEdit:
    """Flip, overwrite, insert, delete or cut off at `position` (which wraps around)."""

    kind: str
    position: int
    length: int
    data: bytes

    def apply(self, target: bytes) -> bytes:
        at = self.position % (len(target) + 1)
        if self.kind == "flip":
            changed = bytearray(target)
            if at < len(changed):
                changed[at] ^= self.data[0] or 0x01
            return bytes(changed)
        if self.kind == "overwrite":
            return target[:at] + self.data + target[at + len(self.data) :]
        if self.kind == "insert":
            return target[:at] + self.data + target[at:]
        if self.kind == "delete":
            return target[:at] + target[at + self.length :]
        return target[:at]


@dataclass(frozen=True)
class TarFieldEdit:
    """Set one field of one tar header in the target (the checksum is repaired later)."""

    header: int
    offset: int
    value: bytes

    def apply(self, target: bytes) -> bytes:
        headers = [
            start
            for start in range(0, len(target) - BLOCK + 1, BLOCK)
            if target[start + 257 : start + 262] == b"ustar"
        ]
        if not headers:
            return target
        at = headers[self.header % len(headers)] + self.offset
        return target[:at] + self.value + target[at + len(self.value) :]


_JSON_KEY = re.compile(rb'"([^"\\]*)"\s*:')
_JSON_VALUE = re.compile(rb':\s*("(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|true|false|null|\[\]|\{\})')


@dataclass(frozen=True)
class JsonEdit:
    """Rename one key, or replace one scalar value, of the JSON text in the target."""

    kind: str
    number: int
    value: bytes

    def apply(self, target: bytes) -> bytes:
        pattern = _JSON_KEY if self.kind == "key" else _JSON_VALUE
        found = list(pattern.finditer(target))
        if not found:
            return target
        match = found[self.number % len(found)]
        start, end = match.span(1)
        value = target[start:end] + b"_" if self.kind == "key" else self.value
        return target[:start] + value + target[end:]


Edit = ByteEdit | TarFieldEdit | JsonEdit

# Values for the tar header fields that decide what a member is: its name, size, type,
# format magic and name prefix.
TAR_FIELDS = {
    0: [b"../x\0", b"/etc/passwd\0", b"a//b\0", b"version\0", b"manifest\0", b"\0"],
    124: [
        b"-0000000001\0",
        b"-1",
        b"0000_000035\0",
        b" 3 5\0",
        b"77777777777\0",
        b"\x80" + bytes(10) + b"\x01",
        b"\xff" * 12,
        b"\0",
        b"1",
    ],
    156: [b"1", b"2", b"3", b"5", b"6", b"7", b"g", b"x", b"K", b"L", b"S", b"\0"],
    257: [b"\0" * 6, b"ustar\x0000"],
    345: [b"..\0", b"/\0", b"x\0"],
}
JSON_VALUES = [
    b"null",
    b"true",
    b"0",
    b"-1",
    b"1.5",
    b"1e999",
    b"NaN",
    b'""',
    b'"x"',
    b'"../x"',
    b"[]",
    b"{}",
    b'["x"]',
    b"[1]",
    b"[null]",
    b'{"a":1}',
]
byte_edits = st.builds(
    ByteEdit,
    kind=st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]),
    position=st.integers(0, 1 << 20),
    length=st.integers(1, 2 * BLOCK),
    data=st.binary(min_size=1, max_size=16),
)
tar_field_edits = st.sampled_from(sorted(TAR_FIELDS)).flatmap(
    lambda offset: st.builds(
        TarFieldEdit, st.integers(0, 15), st.just(offset), st.sampled_from(TAR_FIELDS[offset])
    )
)
json_edits = st.builds(
    JsonEdit, st.sampled_from(["key", "value"]), st.integers(0, 63), st.sampled_from(JSON_VALUES)
)
edit_lists = st.lists(st.one_of(byte_edits, tar_field_edits, json_edits), min_size=1, max_size=3)
json_edit_lists = st.lists(st.one_of(json_edits, byte_edits), min_size=1, max_size=3)


def repair_tar_checksums(data: bytes) -> bytes:
    """Recompute the checksum of every block that looks like a tar header.

    Without this nearly every mutation of a tar header stops at the checksum check,
    and the parsing behind it is never reached.
    """
    repaired = bytearray(data)
    for start in range(0, len(repaired) - BLOCK + 1, BLOCK):
        block = repaired[start : start + BLOCK]
        if block[257:262] == b"ustar":
            block[148:156] = b" " * 8
            block[148:156] = b"%06o\0 " % sum(block)
            repaired[start : start + BLOCK] = block
    return bytes(repaired)


def mutate(data: bytes, edits: list[Edit]) -> bytes:
    for edit in edits:
        data = edit.apply(data)
    return repair_tar_checksums(data)


def mutate_member(base: Base, name: str, edits: list[Edit], relist: bool = True) -> bytes:
    """Mutate the stored bytes of member `name`; with `relist` the manifest and its
    signature are made to match again."""
    position = base.index(name)
    mutated = mutate(base.members[position].data, edits)
    return base.repack({position: mutated}, relist=relist, resign=relist)


def mutate_archive(base: Base, name: str, edits: list[Edit], relist: bool = True) -> bytes:
    """Mutate the decompressed archive in member `name` and compress it again."""
    position = base.index(name)
    archive = mutate(decompress(base.members[position].data, base.compression), edits)
    mutated = compress(archive, base.compression)
    return base.repack({position: mutated}, relist=relist, resign=relist)


def mutate_manifest(base: Base, edits: list[Edit]) -> bytes:
    """Mutate the manifest text and sign it again, so that its parser is reached."""
    position = base.index("manifest")
    mutated = mutate(base.members[position].data, edits)
    return base.repack({position: mutated}, relist=False, resign=True)


def mutate_header_file(base: Base, choice: int, edits: list[Edit]) -> bytes:
    """Mutate one file inside header.tar and pack it again with the right sizes."""
    position = base.index("header.tar")
    files = read_members(decompress(base.members[position].data, base.compression))
    chosen = choice % len(files)
    files[chosen] = replace(files[chosen], data=mutate(files[chosen].data, edits))
    mutated = compress(tar_bytes(files), base.compression)
    return base.repack({position: mutated}, relist=True, resign=True)


OUTER_TARGETS: dict[str, Callable[[Base, list[Edit], int], bytes]] = {
    "artifact": lambda base, edits, _: mutate(base.raw, edits),
    "stored header": lambda base, edits, _: mutate_member(base, "header.tar", edits),
    "stored data": lambda base, edits, _: mutate_member(base, "data/", edits, False),
    "signature": lambda base, edits, _: mutate_member(base, "manifest.sig", edits, False)
    if base.signer
    else mutate(base.raw, edits),
}
ARCHIVE_TARGETS: dict[str, Callable[[Base, list[Edit], int], bytes]] = {
    "manifest": lambda base, edits, _: mutate_manifest(base, edits),
    "header archive": lambda base, edits, _: mutate_archive(base, "header.tar", edits),
    "data archive": lambda base, edits, _: mutate_archive(base, "data/", edits, False),
}
# The members that hold JSON; edits that keep it JSON reach the checks of its fields.
JSON_TARGETS: dict[str, Callable[[Base, list[Edit], int], bytes]] = {
    "version": lambda base, edits, _: mutate_member(base, "version", edits),
    "header file": lambda base, edits, choice: mutate_header_file(base, choice, edits),
}
# Targets whose mutations keep the original, signed manifest: what passes must be the
# original payload.
KEEPS_MANIFEST = {"artifact", "stored data", "signature", "data archive"}


# -- reading -------------------------------------------------------------------------


def read_everything(data: bytes, policy: VerifyPolicy) -> tuple[ArtifactHeader, dict[str, bytes]]:
    """Read as an installer does: header, every block of every file, then finish."""
    reader = ArtifactReader(io.BytesIO(data), policy, LIMITS)
    reader.read_header()
    received: dict[str, bytearray] = {}
    files = cast(Generator[PayloadFile, None, None], reader.payload_files())
    try:
        for payload_file in files:
            sink = received.setdefault(
                f"data/{payload_file.payload.index:04}/{payload_file.name}", bytearray()
            )
            for block in payload_file.blocks():
                sink += block
    finally:
        files.close()
    return reader.finish(), {name: bytes(content) for name, content in received.items()}


def check_reader(base: Base, target: str, data: bytes) -> None:
    """The property: an OtadError, or exactly the files the manifest lists."""
    try:
        header, received = read_everything(data, base.policy)
    except OtadError as error:
        event(f"refused: {type(error).__name__}")
        return
    except Exception as error:
        raise AssertionError(
            f"{base.name}, {target}: the reader raised {type(error).__name__}, "
            f"not an OtadError: {error}"
        ) from error

    event("accepted")
    listed = {n: d for n, d in header.manifest.checksums.items() if n.startswith("data/")}
    found = {name: hashlib.sha256(content).hexdigest() for name, content in received.items()}
    assert found == listed
    if target in KEEPS_MANIFEST and header.signature is SignatureStatus.VERIFIED:
        assert received == base.files


@pytest.mark.parametrize("name", BASE_NAMES)
def test_base_reads_back(bases: dict[str, Base], name: str) -> None:
    base = bases[name]

    header, received = read_everything(base.raw, base.policy)

    expected = SignatureStatus.VERIFIED if base.signer else SignatureStatus.UNSIGNED
    assert header.signature is expected
    assert received == base.files
    assert split_suffix(base.members[-1].name, "data/0000.tar") is base.compression


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(BASE_NAMES),
    target=st.sampled_from(sorted(OUTER_TARGETS)),
    edits=edit_lists,
)
def test_mutated_artifact(
    bases: dict[str, Base], name: str, target: str, edits: list[Edit]
) -> None:
    base = bases[name]

    check_reader(base, target, OUTER_TARGETS[target](base, edits, 0))


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(BASE_NAMES),
    target=st.sampled_from(sorted(ARCHIVE_TARGETS)),
    edits=edit_lists,
)
def test_mutated_archives(
    bases: dict[str, Base], name: str, target: str, edits: list[Edit]
) -> None:
    base = bases[name]

    check_reader(base, target, ARCHIVE_TARGETS[target](base, edits, 0))


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(BASE_NAMES),
    target=st.sampled_from(sorted(JSON_TARGETS)),
    edits=json_edit_lists,
    choice=st.integers(0, 7),
)
def test_mutated_json_members(
    bases: dict[str, Base], name: str, target: str, edits: list[Edit], choice: int
) -> None:
    base = bases[name]

    check_reader(base, target, JSON_TARGETS[target](base, edits, choice))
