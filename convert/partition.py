"""Writing the A/B partition table with sfdisk."""

from __future__ import annotations

import logging
from pathlib import Path

from convert.layout import Plan
from otad.process import run

log = logging.getLogger(__name__)


def render_script(plan: Plan) -> str:
    """The sfdisk script of `plan`: every partition with its place, type, PARTUUID and name."""
    lines = ["label: gpt", "unit: sectors", ""]
    for partition in plan.partitions:
        lines.append(
            f"{partition.number}: start={partition.start}, size={partition.size}, "
            f'type={partition.type}, uuid={partition.uuid}, name="{partition.name}"'
        )
    return "\n".join(lines) + "\n"


def create_disk(image: Path, plan: Plan) -> None:
    """Create the sparse file `image` of the planned size and write the table into it."""
    with image.open("xb") as stream:
        stream.truncate(plan.disk_bytes)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        input=render_script(plan).encode())  # fmt: skip
    run(["sfdisk", "--verify", "--quiet", image])
    log.info("wrote the A/B partition table (%d MiB disk)", plan.disk_bytes >> 20)
