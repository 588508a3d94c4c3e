"""The slot writer on a real partition: content, skipped blocks, read-back."""

from __future__ import annotations

import hashlib
import random

from otad.slotwriter import SlotWriter, read_back_sha256
from tests.engine.conftest import Disk

BLOCK = 1 << 20


def _image(seed: int, blocks: int) -> bytes:
    return random.Random(seed).randbytes(blocks * BLOCK - 123)


def _write(disk: Disk, data: bytes, block: int = BLOCK) -> SlotWriter:
    with SlotWriter(disk.partitions["b"], fsync_interval=2 * BLOCK) as writer:
        for start in range(0, len(data), block):
            writer.write(data[start : start + block])
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


def test_a_block_that_differs_only_after_its_first_page_is_rewritten(disk: Disk) -> None:
    first = _image(6, 4)  # the last block is BLOCK - 123 bytes: not a whole number of words
    _write(disk, first)
    second = bytearray(first)
    second[BLOCK + 4096] ^= 0xFF  # block 1: its first page (compared first) is the same
    second[-1] ^= 0xFF  # the last byte of the image, past its last whole 8-byte word

    writer = _write(disk, bytes(second))

    assert writer.written == BLOCK + (BLOCK - 123)
    assert writer.skipped == 2 * BLOCK
    with disk.partitions["b"].open("rb") as device:
        assert device.read(len(second)) == bytes(second)


def test_after_differing_blocks_it_probes_and_finds_matching_ones(disk: Disk) -> None:
    small = 64 * 1024
    old = random.Random(2).randbytes(300 * small)
    _write(disk, old, small)
    new = random.Random(3).randbytes(10 * small) + old[10 * small :]

    writer = _write(disk, new, small)

    # Blocks 0-3 are compared and differ; from then on only every 64th is compared
    # until one matches (block 67), after which every block is compared again.
    assert writer.written + writer.skipped == len(new)
    assert writer.skipped == (300 - 67) * small
    with disk.partitions["b"].open("rb") as device:
        assert device.read(len(new)) == new


def test_uses_direct_io_on_a_block_device(disk: Disk) -> None:
    writer = _write(disk, _image(4, 2))

    assert writer._direct


def test_synced_follows_the_fsync_watermarks_and_never_runs_ahead(disk: Disk) -> None:
    data = _image(5, 5)
    seen = []
    with SlotWriter(disk.partitions["b"], fsync_interval=2 * BLOCK) as writer:
        for start in range(0, len(data), BLOCK):
            writer.write(data[start : start + BLOCK])
            seen.append(writer.synced)
        writer.finish()

    # Only watermarks (after 2 and 4 MiB written and fsynced) or 0 before the first,
    # each no further than what had been handed to the writer.
    assert all(value in (0, 2 * BLOCK, 4 * BLOCK) for value in seen)
    assert all(value <= (index + 1) * BLOCK for index, value in enumerate(seen))
    assert seen == sorted(seen)
    assert writer.synced == len(data)


def test_blocks_handed_on_before_an_error_are_written(disk: Disk) -> None:
    # A download cut mid-install leaves the writer without finish(); the verified blocks
    # it was given (fewer than one write's worth here) must reach the slot all the same,
    # where a resumed download counts them.
    data = _image(7, 3)

    class Cut(Exception):
        pass

    try:
        with SlotWriter(disk.partitions["b"], fsync_interval=64 * BLOCK) as writer:
            for start in range(0, 2 * BLOCK, BLOCK // 4):
                writer.write(data[start : start + BLOCK // 4])
            raise Cut
    except Cut:
        pass

    assert writer.written == 2 * BLOCK
    with disk.partitions["b"].open("rb") as device:
        assert device.read(2 * BLOCK) == data[: 2 * BLOCK]
