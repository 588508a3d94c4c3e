"""The slot writer on a real partition: content, skipped blocks, read-back."""

from __future__ import annotations

import hashlib
import random

from otad.slotwriter import SlotWriter, read_back_sha256
from tests.engine.conftest import Disk

BLOCK = 1 << 20


def _image(seed: int, blocks: int) -> bytes:
    return random.Random(seed).randbytes(blocks * BLOCK - 123)


def _write(disk: Disk, data: bytes) -> SlotWriter:
    with SlotWriter(disk.partitions["b"], fsync_interval=2 * BLOCK) as writer:
        for start in range(0, len(data), BLOCK):
            writer.write(data[start : start + BLOCK])
        writer.finish()
    return writer


def test_writes_exact_content(disk: Disk) -> None:
    data = _image(1, 5)

    writer = _write(disk, data)

    assert writer.written == len(data)
    with disk.partitions["b"].open("rb") as device:
        assert device.read(len(data)) == data
    assert read_back_sha256(disk.partitions["b"], len(data)) == hashlib.sha256(data).hexdigest()


def test_rewrite_skips_blocks_already_right(disk: Disk) -> None:
    first = _image(1, 6)
    _write(disk, first)
    second = bytearray(first)
    second[3 * BLOCK + 10] ^= 0xFF

    writer = _write(disk, bytes(second))

    assert writer.written == BLOCK
    assert writer.skipped == len(first) - BLOCK
    with disk.partitions["b"].open("rb") as device:
        assert device.read(len(second)) == bytes(second)
