"""The ext4 filesystems (e2fsprogs): the root copied out of the stock image, the slots, data.

The stock root is copied into a work file with `e2image -ra`, checked with e2fsck and
resized to the slot size; that file is changed through a loop mount, becomes slot A
and the artifact's payload, and a copy of it with a new UUID becomes slot B.
"""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

from convert.errors import ImageError, TooSmall
from convert.layout import MIB, Partition
from otad.process import run

log = logging.getLogger(__name__)

TOOLS = ("e2image", "e2fsck", "resize2fs", "tune2fs", "dumpe2fs", "mkfs.ext4", "blkid", "dd")
HEADROOM = 64 * MIB  # free space a slot keeps beyond the root filesystem's minimum size


def probe_at(image: Path, offset: int) -> dict[str, str]:
    """What `blkid -p` finds at byte `offset` of `image` (TYPE, UUID, LABEL...); {} if
    nothing it knows."""
    result = run(["blkid", "-p", "-o", "export", "-O", str(offset), image], check=False)
    lines = result.stdout.decode("utf-8", "replace").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def extract_root(image: Path, root: Partition, target: Path) -> None:
    """Copy the ext4 filesystem of partition `root` of `image` into the file `target`."""
    found = probe_at(image, root.offset).get("TYPE", "")
    if found != "ext4":
        raise ImageError(
            f"{image}: partition {root.number} should hold the ext4 root filesystem, "
            f"found {found or 'no filesystem blkid knows'}"
        )
    result = run(["e2image", "-ra", "-o", str(root.offset), image, target], check=False)
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip()
        raise ImageError(f"{image}: cannot copy the root filesystem ({detail})")
    check(target, f"{image} partition {root.number}")


def check(filesystem: Path, what: str) -> None:
    """Run e2fsck -fy; ImageError when it leaves errors behind (exit 4 or more)."""
    result = run(["e2fsck", "-f", "-y", filesystem], check=False)
    if result.returncode >= 4:
        output = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
        last = output.splitlines()[-1] if output else "no output"
        raise ImageError(f"the root filesystem of {what} is corrupt: e2fsck: {last}")
    if result.returncode != 0:
        log.info("e2fsck repaired the root filesystem of %s", what)


def used_bytes(filesystem: Path) -> int:
    """Bytes in use in `filesystem`, plus HEADROOM: what a slot must at least hold."""
    header = run(["dumpe2fs", "-h", filesystem]).stdout.decode()
    fields = {
        name: re.search(rf"^{name}:\s+([0-9]+)", header, re.MULTILINE)
        for name in ("Block count", "Free blocks", "Block size")
    }
    if any(match is None for match in fields.values()):
        raise ImageError(f"dumpe2fs does not tell the size of {filesystem}")
    count, free, size = (int(match[1]) for match in fields.values() if match is not None)
    return (count - free) * size + HEADROOM


def resize(filesystem: Path, size: int) -> None:
    """Grow or shrink `filesystem` (a file) to exactly `size` bytes; TooSmall if it cannot."""
    current = filesystem.stat().st_size
    if size > current:
        with filesystem.open("r+b") as stream:
            stream.truncate(size)
    log.info("resizing the root filesystem to %d MiB", size // MIB)
    # resize2fs's own minimum (-P) is a cautious estimate, often a third above what is
    # used: below it, -f lets resize2fs try, and it fails cleanly if the data do not fit.
    result = run(["resize2fs", "-f", filesystem, f"{size // 1024}K"], check=False)
    if result.returncode != 0:
        output = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise TooSmall(
            f"the root filesystem does not fit a slot of {size // MIB} MiB "
            f"(resize2fs: {output[-1] if output else 'failed'}); pass a larger --storage-size"
        )
    with filesystem.open("r+b") as stream:
        stream.truncate(size)


def set_uuid(filesystem: Path, uuid: str) -> None:
    run(["tune2fs", "-U", uuid, filesystem])


def copy_sparse(source: Path, target: Path) -> None:
    """A copy of `source` at `target` that keeps its holes."""
    run(["cp", "--sparse=always", source, target])


def write_into(source: Path, image: Path, partition: Partition) -> None:
    """Write the whole of `source` into `partition` of `image`, leaving zero blocks as holes."""
    if source.stat().st_size > partition.bytes:
        raise ImageError(f"{source} is larger than partition {partition.number}")
    run(["dd", f"if={source}", f"of={image}", "bs=1M", f"seek={partition.offset}",
         "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])  # fmt: skip


def copy_partition(source: Path, part: Partition, image: Path, target: Partition) -> None:
    """Copy the raw bytes of partition `part` of `source` into partition `target` of `image`."""
    run(["dd", f"if={source}", f"of={image}", "bs=1M", f"skip={part.offset}",
         f"count={part.bytes}", f"seek={target.offset}", "iflag=skip_bytes,count_bytes",
         "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])  # fmt: skip


def make_data(image: Path, data: Partition, label: str, content: Path) -> None:
    """Format the data partition inside `image`, populated with the tree `content`."""
    log.info("formatting the data partition (%d MiB)", data.bytes // MIB)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-U", new_uuid(),
         "-E", f"offset={data.offset},nodiscard", "-d", content, image,
         f"{data.bytes // 1024}k"])  # fmt: skip


def new_uuid() -> str:
    return str(uuid.uuid4())


def filesystem_uuid_at(image: Path, offset: int) -> str:
    """The UUID (FAT: volume serial) of the filesystem at byte `offset` of `image`."""
    result = run(["blkid", "-p", "-o", "value", "-s", "UUID", "-O", str(offset), image])
    found = result.stdout.decode().strip()
    if not found:
        raise ImageError(f"{image}: the filesystem at byte {offset} has no UUID")
    return found
