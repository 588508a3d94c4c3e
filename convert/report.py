"""The short report printed at the end: the new layout and what was changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convert.layout import MIB, Plan


@dataclass(frozen=True)
class Report:
    output: Path
    artifact: Path
    artifact_name: str
    signed: bool
    plan: Plan
    changes: Sequence[str]


def render(report: Report) -> str:
    plan = report.plan
    rows = [
        ("#", "name", "start MiB", "size MiB", "PARTUUID"),
        *(
            (
                str(p.number),
                p.name or "",
                str(p.start * 512 // MIB),
                str(p.bytes // MIB),
                p.uuid or "",
            )
            for p in plan.partitions
        ),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    table = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    signature = "signed" if report.signed else "unsigned"
    lines = [
        f"image: {report.output} ({plan.disk_bytes // MIB} MiB, GPT)",
        *(f"  {line.rstrip()}" for line in table),
        f"artifact: {report.artifact} ({report.artifact_name}, {signature}, holds slot A)",
        "changed:",
        *(f"  - {change}" for change in report.changes),
    ]
    return "\n".join(lines) + "\n"
