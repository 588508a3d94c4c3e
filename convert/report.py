"""The short report printed at the end: the new layout, what was changed, and how long
each phase took."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convert.layout import MIB, Plan
from convert.mbr import MbrPlan


@dataclass(frozen=True)
class Report:
    output: Path
    artifact: Path
    artifact_name: str
    signed: bool
    plan: Plan | MbrPlan
    changes: Sequence[str]
    timings: Sequence[tuple[str, float]] = ()  # (phase, seconds), in order


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
        f"image: {report.output} ({plan.disk_bytes // MIB} MiB, "
        f"{'MBR' if isinstance(plan, MbrPlan) else 'GPT'})",
        *(f"  {line.rstrip()}" for line in table),
        f"artifact: {report.artifact} ({report.artifact_name}, {signature}, holds slot A)",
        "changed:",
        *(f"  - {change}" for change in report.changes),
    ]
    if report.timings:
        total = sum(seconds for _, seconds in report.timings)
        lines.append(f"timings ({total:.1f} s in all):")
        lines += [f"  {title}: {seconds:.1f} s" for title, seconds in report.timings]
    return "\n".join(lines) + "\n"
