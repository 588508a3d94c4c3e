"""The chunk index: building, its meta-data form, and matching a target's prefix."""

from __future__ import annotations

import hashlib
import io
import random

import pytest

from otad.artifact.chunks import (
    ChunkHasher,
    ChunkIndex,
    parse_promise,
    promise_to_meta_data,
)
from otad.artifact.headers import MetaDataValue, compact_json, parse_meta_data
from otad.errors import LimitExceeded, MalformedArtifact

CHUNK = 4096


def _data(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
@pytest.mark.parametrize("piece", [1, 1000, CHUNK, 3 * CHUNK])
def test_hasher_matches_direct_hashes(size: int, piece: int) -> None:
    data = _data(size)
    hasher = ChunkHasher(CHUNK)
    for start in range(0, size, piece):
        hasher.update(data[start : start + piece])

    index = hasher.finish()

    expected = tuple(
        hashlib.sha256(data[start : start + CHUNK]).digest() for start in range(0, size, CHUNK)
    )
    assert index == ChunkIndex(CHUNK, size, expected)


def test_meta_data_round_trip() -> None:
    data = _data(3 * CHUNK + 5)
    hasher = ChunkHasher(CHUNK)
    hasher.update(data)
    index = hasher.finish()
    meta = promise_to_meta_data({"rootfs.ext4": len(data)}, index)

    promise = parse_promise(parse_meta_data(compact_json(meta)), "meta-data")

    assert promise is not None
    assert promise.sizes == {"rootfs.ext4": len(data)}
    assert promise.chunk_index == index
    assert promise.chunked_file == "rootfs.ext4"


def test_artifact_without_promise() -> None:
    assert parse_promise({"dest_dir": "/opt"}, "meta-data") is None


@pytest.mark.parametrize(
    ("meta", "error", "fragment"),
    [
        ({"otad.chunks": ["00"]}, MalformedArtifact, "without otad.files"),
        ({"otad.files": ["a"], "otad.sizes": [1, 2]}, MalformedArtifact, "one size per file"),
        ({"otad.files": ["a"], "otad.sizes": [-1]}, MalformedArtifact, "byte count"),
        ({"otad.files": ["a", "a"], "otad.sizes": [1, 1]}, MalformedArtifact, "twice"),
        (
            {"otad.files": ["a"], "otad.sizes": [10], "otad.chunk_size": 100, "otad.chunks": []},
            LimitExceeded,
            "chunk size 100",
        ),
        (
            {
                "otad.files": ["a"],
                "otad.sizes": [10],
                "otad.chunk_size": 4096,
                "otad.chunks": ["zz"],
            },
            MalformedArtifact,
            "not hex",
        ),
        (
            {"otad.files": ["a"], "otad.sizes": [10], "otad.chunk_size": 4096, "otad.chunks": []},
            MalformedArtifact,
            "needs 1",
        ),
    ],
)
def test_promise_refusals(
    meta: dict[str, MetaDataValue], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        parse_promise(meta, "meta-data")


@pytest.mark.parametrize(("damaged_chunk", "expected"), [(None, 4), (0, 0), (2, 2), (3, 3)])
def test_count_matching_prefix(damaged_chunk: int | None, expected: int) -> None:
    data = bytearray(_data(3 * CHUNK + 100))
    hasher = ChunkHasher(CHUNK)
    hasher.update(data)
    index = hasher.finish()
    if damaged_chunk is not None:
        data[damaged_chunk * CHUNK] ^= 0xFF

    assert index.count_matching_prefix(io.BytesIO(bytes(data))) == expected


def test_count_matching_prefix_of_a_short_target() -> None:
    data = _data(3 * CHUNK)
    hasher = ChunkHasher(CHUNK)
    hasher.update(data)

    assert hasher.finish().count_matching_prefix(io.BytesIO(data[: 2 * CHUNK + 1])) == 2
