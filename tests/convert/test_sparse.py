"""Copying only the data ranges of a sparse file into a region of another."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from convert import sparse
from convert.errors import ImageError

MIB = 1 << 20


def _sparse_file(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with path.open("wb") as stream:
        stream.truncate(size)
        for offset, data in pieces.items():
            stream.seek(offset)
            stream.write(data)


def test_only_data_is_copied_to_the_offset_and_holes_stay_holes(tmp_path: Path) -> None:
    source, target = tmp_path / "fs", tmp_path / "disk"
    pieces = {0: b"A" * 4096, 5 * MIB: b"B" * (MIB + 4096), 15 * MIB: b"C" * 4096}
    _sparse_file(source, 16 * MIB, pieces)
    _sparse_file(target, 64 * MIB, {0: b"T" * 512})
    seen: list[int] = []

    copied = sparse.copy_data(source, target, 8 * MIB, 16 * MIB, seen.append)

    assert copied == sum(seen)
    assert copied == sparse.data_bytes(source)
    assert copied < 4 * MIB  # the 13 MiB of holes were not copied
    data = target.read_bytes()
    assert data[:512] == b"T" * 512  # outside the region: untouched
    assert data[8 * MIB : 24 * MIB] == source.read_bytes()
    assert data[24 * MIB :] == bytes(40 * MIB)
    assert os.stat(target).st_blocks * 512 < 8 * MIB  # still sparse


def test_data_bytes_counts_a_range_of_the_file(tmp_path: Path) -> None:
    source = tmp_path / "image"
    _sparse_file(source, 32 * MIB, {MIB: b"x" * MIB, 20 * MIB: b"y" * MIB})

    assert sparse.data_bytes(source, 0, 10 * MIB) == MIB
    assert sparse.data_bytes(source, 10 * MIB, 32 * MIB) == MIB
    assert sparse.data_bytes(source, 3 * MIB, 19 * MIB) == 0


def test_a_source_larger_than_its_place_is_refused(tmp_path: Path) -> None:
    source, target = tmp_path / "fs", tmp_path / "disk"
    _sparse_file(source, 2 * MIB, {0: b"x"})
    _sparse_file(target, 8 * MIB, {})

    with pytest.raises(ImageError, match="larger than its place"):
        sparse.copy_data(source, target, 0, MIB)
    assert target.read_bytes() == bytes(8 * MIB)
