"""The swap partition of an MBR input, kept in the A/B layout with its UUID and label.

Both slots share it, like the data partition. It is made anew with mkswap rather than
copied (its content is worthless after a shutdown), with the input's UUID and label, so
that an fstab line `UUID=... none swap` and the initramfs's RESUME setting, which both
slots carry from the input, still name it. It sits between slot B and the data
partition, which stays last so that it can grow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from convert import filesystems
from convert.layout import MIB, Partition
from otad.process import run

log = logging.getLogger(__name__)

TOOLS = ("mkswap", "blkid", "dd")


@dataclass(frozen=True)
class SwapIdentity:
    uuid: str | None
    label: str | None


def read_identity(image: Path, partition: Partition) -> SwapIdentity:
    """The UUID and label of the swap area in `partition` of `image` (None when absent)."""
    fields = filesystems.probe_at(image, partition.offset)
    if fields.get("TYPE") != "swap":
        log.warning(
            "partition %d of %s has no swap signature: the new swap area gets a new UUID, "
            "and an fstab line naming the old one will not find it",
            partition.number,
            image,
        )
        return SwapIdentity(None, None)
    return SwapIdentity(fields.get("UUID"), fields.get("LABEL"))


def make_swap(identity: SwapIdentity, disk: Path, partition: Partition, work: Path) -> None:
    """A fresh swap area over the whole of `partition` of `disk`, with `identity`."""
    # TODO: rewrite fstab's swap line when it names the swap by device path or MBR
    # PARTUUID rather than UUID= or LABEL=, when such an input turns up (the Debian
    # installer writes UUID=).
    area = work / "swap.img"
    with area.open("xb") as stream:
        stream.truncate(partition.bytes)
    argv: list[str | Path] = ["mkswap"]
    if identity.uuid:
        argv += ["-U", identity.uuid]
    if identity.label:
        argv += ["-L", identity.label]
    run([*argv, area])
    # mkswap writes only its header page and the new disk is zeros elsewhere: one MiB does.
    run(["dd", f"if={area}", f"of={disk}", "bs=1M", "count=1", f"seek={partition.offset}",
         "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])  # fmt: skip
    area.unlink()
    log.info("swap partition %d: %d MiB, UUID %s", partition.number,
             partition.bytes // MIB, identity.uuid or "new")  # fmt: skip
