"""The strict tar reader against archives written by other tar writers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from otad.artifact import writer
from otad.artifact.streams import BytesSource
from otad.artifact.tarstream import EntryType, TarReader
from otad.artifact.tarwrite import TarWriter, member_header
from otad.errors import LimitExceeded, MalformedArtifact, TruncatedArtifact, UnsafePath
from tests.artifact.conftest import ArtifactFactory


def _tar(format: int, members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _entries(data: bytes) -> list[tuple[str, bytes]]:
    reader = TarReader(BytesSource(data), "test.tar")
    found = []
    while (entry := reader.next_entry()) is not None:
        assert entry.type is EntryType.FILE
        found.append((entry.name, reader.read_member(1 << 20)))
    reader.check_trailer()
    return found


LONG = "d/" * 80 + "long-name.bin"


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_python_tarfile_formats(format: int) -> None:
    members = {"version": b"{}", "data/0000/x": b"payload" * 100, "é-unicode": b"u"}
    if format != tarfile.USTAR_FORMAT:
        members[LONG] = b"long"

    assert _entries(_tar(format, members)) == list(members.items())


def test_gnu_base256_size_is_parsed() -> None:
    header = member_header("big", 9 << 30, 0)
    entry = TarReader(BytesSource(header), "big.tar").next_entry()

    assert len(header) == 512
    assert entry is not None
    assert entry.size == 9 << 30


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("/etc/passwd", "absolute"), ("../x", "'..'"), ("a/../../b", "'..'"), ("a//b", "empty")],
)
def test_unsafe_names(name: str, fragment: str) -> None:
    data = _tar(tarfile.GNU_FORMAT, {name: b"x"})

    with pytest.raises(UnsafePath, match=fragment):
        _entries(data)


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_links_and_devices_are_refused(kind: bytes) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("evil")
        info.type = kind
        info.linkname = "/etc/shadow"
        archive.addfile(info)

    with pytest.raises(MalformedArtifact, match="only regular files and directories"):
        _entries(out.getvalue())


def test_bad_checksum_and_truncation() -> None:
    data = bytearray(_tar(tarfile.GNU_FORMAT, {"a": b"x" * 700}))
    damaged = bytes(data[:10]) + b"Z" + bytes(data[11:])

    with pytest.raises(MalformedArtifact, match="checksum"):
        _entries(damaged)
    with pytest.raises(TruncatedArtifact, match="inside a tar header"):
        _entries(bytes(data[:100]))
    with pytest.raises(TruncatedArtifact, match="member a ends after 88 of 700 bytes"):
        _entries(bytes(data[:600]))
    with pytest.raises(TruncatedArtifact, match="end-of-archive"):
        _entries(bytes(data[:1536]))


def test_oversized_pax_header_is_refused() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "x" * 100_000}
        archive.addfile(info, io.BytesIO(b""))

    with pytest.raises(LimitExceeded, match="pax header"):
        _entries(out.getvalue())


def test_trailing_garbage_is_refused() -> None:
    data = _tar(tarfile.GNU_FORMAT, {"a": b"x"}) + b"garbage"

    with pytest.raises(MalformedArtifact, match="after the end-of-archive marker"):
        _entries(data)


def test_tar_writer_output_reads_back() -> None:
    out = io.BytesIO()
    tar = TarWriter(out, mtime=1234)
    tar.add_bytes("version", b"v")
    offset = tar.reserve()
    out.write(b"streamed later")
    tar.complete(offset, "data/0000.tar")
    tar.close()

    assert _entries(out.getvalue()) == [("version", b"v"), ("data/0000.tar", b"streamed later")]
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as archive:
        assert [(m.name, m.mtime, m.uid, m.mode) for m in archive] == [
            ("version", 1234, 0, 0o644),
            ("data/0000.tar", 1234, 0, 0o644),
        ]


def test_failed_write_leaves_no_file(
    make_rootfs_artifact: ArtifactFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_data", fail)
    target = tmp_path / "out.mender"

    with pytest.raises(OSError, match="No space"):
        make_rootfs_artifact(output=target)

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert not target.exists()


def test_endless_extended_records_are_bounded() -> None:
    out = io.BytesIO()
    record = b"30 comment=" + b"x" * 18 + b"\n"
    block = member_header("pax", len(record), 0)
    # Turn the plain header into a pax ('x') header with a valid checksum.
    header = bytearray(block)
    header[156:157] = b"x"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    for _ in range(40_000):
        out.write(bytes(header) + record + bytes(512 - len(record)))

    with pytest.raises(LimitExceeded, match="bytes of pax and long-name records"):
        _entries(out.getvalue())
