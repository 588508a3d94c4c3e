"""Compressed data cut into members: where the writer starts them, what the readers report.

A compressed data archive of a chunk-indexed image is written as several gzip members,
xz streams or zstd frames; each starts on a chunk boundary of the image, and a fresh
decoder started at one yields the image from there (what a resumed download relies on).
"""

from __future__ import annotations

import io
import random
import subprocess
import threading
from pathlib import Path

import pytest

from otad.artifact import compression as compression_module
from otad.artifact.compression import (
    Boundary,
    CompressingWriter,
    Compression,
    Decompressor,
    open_decompressed,
)
from otad.artifact.reader import ArtifactReader, PayloadFile
from otad.artifact.streams import BytesSource, read_into_fully
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.errors import CompressionError, TruncatedArtifact, UsageError
from tests.conftest import require_tool

COMPRESSED = [Compression.GZIP, Compression.XZ, Compression.ZSTD]
CHUNK = 64 * 1024
TOOLS = {
    Compression.GZIP: ["gzip", "-dc"],
    Compression.XZ: ["xz", "-dc"],
    Compression.ZSTD: ["zstd", "-dc"],
}


def _data() -> bytes:
    """Random bytes, zeros and text: parts that compress badly, well and in between."""
    noise = random.Random(7).randbytes(300_000)
    text = b"".join(b"line %d of a text file\n" % n for n in range(20_000))
    return noise + bytes(200_000) + text


def _compress(data: bytes, compression: Compression, starts: list[int], piece: int) -> bytes:
    out = io.BytesIO()
    writer = CompressingWriter(out, compression)
    writer.start_members_at(starts)
    for offset in range(0, len(data), piece):
        writer.write(data[offset : offset + piece])
    writer.finish()
    return out.getvalue()


def _read_all(decoder: Decompressor | object, size: int) -> bytes:
    buffer = bytearray(size + 1)
    count = read_into_fully(decoder, memoryview(buffer))  # type: ignore[arg-type]
    return bytes(buffer[:count])


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize("piece", [1000, 1 << 20])
def test_members_start_where_asked_and_each_decodes_the_rest(
    compression: Compression, piece: int
) -> None:
    data = _data()
    starts = [512, 100_000, 300_000, 500_000]
    compressed = _compress(data, compression, starts, piece)

    decoder = open_decompressed(BytesSource(compressed), compression, "test")
    assert isinstance(decoder, Decompressor)
    assert _read_all(decoder, len(data)) == data
    boundaries = decoder.boundaries
    assert [b.decompressed for b in boundaries] == [0, *starts]
    for boundary in boundaries:
        fresh = open_decompressed(BytesSource(compressed[boundary.compressed :]), compression, "x")
        assert _read_all(fresh, len(data)) == data[boundary.decompressed :]


@pytest.mark.parametrize("compression", COMPRESSED)
def test_the_standard_tools_read_a_stream_of_members(compression: Compression) -> None:
    tool = require_tool(TOOLS[compression][0])
    data = _data()
    compressed = _compress(data, compression, [65536, 131072, 400_000], 50_000)
    result = subprocess.run(
        [tool, *TOOLS[compression][1:]], input=compressed, capture_output=True, check=True
    )
    assert result.stdout == data


@pytest.mark.parametrize("compression", COMPRESSED)
def test_one_member_reports_only_its_start(compression: Compression) -> None:
    data = _data()
    decoder = open_decompressed(
        BytesSource(_compress(data, compression, [], 4096)), compression, "t"
    )
    assert isinstance(decoder, Decompressor)
    assert _read_all(decoder, len(data)) == data
    assert decoder.boundaries == [Boundary(0, 0)]


def test_member_starts_must_lie_ahead() -> None:
    writer = CompressingWriter(io.BytesIO(), Compression.GZIP)
    writer.write(b"x" * 100)
    with pytest.raises(UsageError, match="not ahead"):
        writer.start_members_at([50])


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("cut in a block", TruncatedArtifact, "compressed stream ends early"),
        ("no magic", CompressionError, "corrupt zstd data: no frame at byte"),
        ("garbage after", CompressionError, "corrupt zstd data"),
    ],
)
def test_a_damaged_zstd_stream_of_frames_is_refused(
    damage: str, error: type[Exception], message: str
) -> None:
    data = _data()
    compressed = _compress(data, Compression.ZSTD, [100_000, 300_000], 65536)
    if damage == "cut in a block":
        compressed = compressed[: len(compressed) // 2]
    elif damage == "no magic":
        compressed = b"\x00\x01\x02\x03" + compressed
    else:
        compressed += b"garbage"
    decoder = open_decompressed(BytesSource(compressed), Compression.ZSTD, "t")
    with pytest.raises(error, match=message):
        _read_all(decoder, len(data))


def test_skippable_zstd_frames_are_skipped() -> None:
    data = _data()
    compressed = _compress(data, Compression.ZSTD, [100_000], 65536)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    decoder = open_decompressed(BytesSource(skippable + compressed), Compression.ZSTD, "t")
    assert _read_all(decoder, len(data)) == data


class _Trickle:
    """A source that hands on at most a few bytes per read, as a slow network does."""

    def __init__(self, data: bytes, seed: int, most: int) -> None:
        self._source = BytesSource(data)
        self._random = random.Random(seed)
        self._most = most

    def readinto(self, buffer: memoryview, /) -> int:
        size = min(len(buffer), self._random.randint(1, self._most))
        return self._source.readinto(buffer[:size])


@pytest.mark.parametrize("most", [5, 300, 70_000])
@pytest.mark.parametrize("buffer", [101, 256 * 1024])
def test_zstd_decodes_the_same_whatever_the_source_hands_on_per_read(
    monkeypatch: pytest.MonkeyPatch, most: int, buffer: int
) -> None:
    # Frame and block headers then arrive split across reads and across the end of the
    # frame walker's buffer (a small one: often), which has to move the part it has.
    monkeypatch.setattr(compression_module, "_INPUT_SIZE", buffer)
    data = _data()
    starts = list(range(997, len(data), 997))  # many frames: many headers to split
    compressed = _compress(data, Compression.ZSTD, starts, 65536)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    whole = open_decompressed(BytesSource(compressed), Compression.ZSTD, "t")
    assert isinstance(whole, Decompressor)
    assert _read_all(whole, len(data)) == data
    decoder = open_decompressed(_Trickle(compressed, most, most), Compression.ZSTD, "t")
    assert isinstance(decoder, Decompressor)
    assert _read_all(decoder, len(data)) == data
    assert decoder.boundaries == whole.boundaries
    assert [b.decompressed for b in whole.boundaries] == [0, *starts]
    skipping = open_decompressed(_Trickle(skippable + compressed, most, 3), Compression.ZSTD, "t")
    assert _read_all(skipping, len(data)) == data


# -- artifacts -------------------------------------------------------------------------


def _write(tmp_path: Path, compression: Compression, member_chunks: int, size: int) -> Path:
    image = tmp_path / "rootfs.img"
    image.write_bytes(random.Random(size).randbytes(size // 2) + bytes(size - size // 2))
    spec = ArtifactSpec(
        name="release-1",
        device_types=("otad-test",),
        payload=rootfs_image(image, software_version="1", chunk_size=CHUNK),
        compression=compression,
        member_chunks=member_chunks,
    )
    return write_artifact(spec, tmp_path / "release-1.mender").path


def _read_payload(path: Path) -> PayloadFile:
    """The one payload file of `path`, read and verified to its end."""
    with path.open("rb") as stream:
        reader = ArtifactReader(stream)
        reader.read_header()
        (payload_file,) = list(reader.payload_files())  # each drained before the next
        reader.finish()
    return payload_file


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize(("member_chunks", "size"), [(4, 40 * CHUNK + 1000), (3, 12 * CHUNK)])
def test_the_writer_starts_members_on_chunk_boundaries_and_the_reader_finds_them(
    tmp_path: Path, compression: Compression, member_chunks: int, size: int
) -> None:
    path = _write(tmp_path, compression, member_chunks, size)
    image = (tmp_path / "rootfs.img").read_bytes()
    artifact = path.read_bytes()

    payload_file = _read_payload(path)
    assert payload_file.verified
    assert payload_file.artifact_offset is None
    member = payload_file.member_offset
    assert member is not None
    boundaries = payload_file.boundaries()
    step = member_chunks * CHUNK
    assert [b.decompressed for b in boundaries] == list(range(step, size, step))
    for boundary in boundaries:
        fresh = open_decompressed(
            BytesSource(artifact[member + boundary.compressed :]), compression, "x"
        )
        rest = bytearray(size - boundary.decompressed)
        assert read_into_fully(fresh, memoryview(rest)) == len(rest)
        assert rest == image[boundary.decompressed :]


@pytest.mark.parametrize("compression", COMPRESSED)
def test_one_member_when_asked_and_no_boundaries_found(
    tmp_path: Path, compression: Compression
) -> None:
    payload_file = _read_payload(_write(tmp_path, compression, 0, 20 * CHUNK))
    assert payload_file.member_offset is not None
    assert payload_file.boundaries() == []


def test_an_uncompressed_artifact_has_no_members(tmp_path: Path) -> None:
    payload_file = _read_payload(_write(tmp_path, Compression.NONE, 4, 20 * CHUNK))
    assert payload_file.artifact_offset is not None
    assert payload_file.member_offset is None
    assert payload_file.boundaries() == []


def test_members_cost_little(tmp_path: Path) -> None:
    """Members every 16 chunks of 64 KiB (1 MiB) of text-like data: under 1 % bigger.

    The default, 16 chunks of 1 MiB, costs far less; see the report in writer.py.
    """
    image = tmp_path / "rootfs.img"
    lines = b"".join(b"%08d some text that repeats with a counter\n" % n for n in range(200_000))
    image.write_bytes(lines)
    sizes = {}
    for chunks in (0, 16):
        spec = ArtifactSpec(
            name="release-1",
            device_types=("otad-test",),
            payload=rootfs_image(image, software_version="1", chunk_size=CHUNK),
            compression=Compression.GZIP,
            member_chunks=chunks,
        )
        sizes[chunks] = write_artifact(spec, tmp_path / f"m{chunks}.mender").size
    assert sizes[0] < sizes[16] < sizes[0] * 1.01


# -- members compressed on several threads ---------------------------------------------


def _artifact_bytes(tmp_path: Path, compression: Compression, threads: int) -> bytes:
    image = tmp_path / "rootfs.img"
    if not image.exists():  # noise, zero members and text: each kind of member
        image.write_bytes(
            random.Random(3).randbytes(9 * CHUNK)
            + bytes(20 * CHUNK)
            + b"".join(b"line %d\n" % n for n in range(100_000))
        )
    spec = ArtifactSpec(
        name="release-1",
        device_types=("otad-test",),
        payload=rootfs_image(image, software_version="1", chunk_size=CHUNK),
        compression=compression,
        member_chunks=4,
        threads=threads,
    )
    return write_artifact(spec, tmp_path / f"t{threads}.mender").path.read_bytes()


@pytest.mark.parametrize("compression", COMPRESSED)
def test_any_number_of_threads_writes_the_same_bytes(
    tmp_path: Path, compression: Compression
) -> None:
    one = _artifact_bytes(tmp_path, compression, 1)
    assert _artifact_bytes(tmp_path, compression, 2) == one
    assert _artifact_bytes(tmp_path, compression, 3) == one
    assert _read_payload(tmp_path / "t3.mender").verified


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize("piece", [1000, 300_000])
def test_members_too_long_to_gather_are_streamed(
    compression: Compression, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member longer than the bound goes through one encoder, in order with the rest."""
    monkeypatch.setattr(compression_module, "MAX_BUFFERED_MEMBER", 150_000)
    data = _data()
    starts = [100_000, 200_000, 500_000, 520_000]  # members of 100 k, 300 k, 20 k...
    serial = _compress(data, compression, starts, piece)
    out = io.BytesIO()
    with CompressingWriter(out, compression, threads=2) as writer:
        writer.start_members_at(starts)
        for offset in range(0, len(data), piece):
            writer.write(data[offset : offset + piece])
        writer.finish()
    assert out.getvalue() == serial
    decoder = open_decompressed(BytesSource(serial), compression, "t")
    assert isinstance(decoder, Decompressor)
    assert _read_all(decoder, len(data)) == data
    assert [b.decompressed for b in decoder.boundaries] == [0, *starts]


def _leave_early() -> None:
    with CompressingWriter(io.BytesIO(), Compression.ZSTD, threads=2) as writer:
        writer.start_members_at(range(1000, 100_000, 1000))
        writer.write(random.Random(1).randbytes(50_000))
        raise RuntimeError("source failed")


def test_a_writer_left_early_stops_its_threads() -> None:
    def compressing() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("compress")]

    before = compressing()
    with pytest.raises(RuntimeError, match="source failed"):
        _leave_early()
    assert compressing() == before
