"""Power cuts during install, reboot, commit and rollback, on booting QEMU machines (TCG).

Two machines run at once, one per firmware path, each on one disk overlay that takes a
chain of cuts (tests/boot/powercut.py says what a cut is and what is checked after it).
OTAD_POWERCUT_SEED (default 1), OTAD_POWERCUT_CUTS (default 20) and
OTAD_POWERCUT_CHAINS (default 2) change the run; every failure names the seed, the chain
and the cut. bench/power_cuts.py runs hundreds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.boot import harness, powercut


def setting(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def test_the_plan_is_seeded_and_cuts_every_phase_in_each_round() -> None:
    plan = powercut.plan(7, 0, 12)

    assert plan == powercut.plan(7, 0, 12)
    assert powercut.plan(7, 0, 5) == plan[:5]
    assert plan != powercut.plan(7, 1, 12) != powercut.plan(8, 0, 12)
    assert [cut.index for cut in plan] == list(range(12))
    for start in range(0, 12, len(powercut.PHASES)):
        phases = [cut.phase for cut in plan[start : start + len(powercut.PHASES)]]
        assert sorted(phases) == sorted(powercut.PHASES)
    assert all(0 <= cut.fraction < 1 for cut in plan)


@pytest.mark.boot
@pytest.mark.slow
def test_every_power_cut_leaves_a_machine_that_boots_a_good_release_and_updates(
    converted: harness.Converted, tmp_path: Path
) -> None:
    seed = setting("OTAD_POWERCUT_SEED", 1)
    cuts = setting("OTAD_POWERCUT_CUTS", 20)
    chains = setting("OTAD_POWERCUT_CHAINS", 2)
    started = time.monotonic()

    reports = powercut.run_chains(converted, tmp_path, seed, cuts, chains)

    text = powercut.summary(reports, seed, time.monotonic() - started)
    print(text)
    results = [result for report in reports for result in report.results]
    assert all(result.survived for result in results), text
    assert not any(report.error for report in reports), text
    assert len(results) == cuts, text
    assert all(report.final_update for report in reports), text
