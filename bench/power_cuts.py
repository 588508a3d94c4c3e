#!/usr/bin/python3
"""Power cuts on booting QEMU machines: how many cuts the device survives, out of how many.

Runs the chains of tests/boot/powercut.py (machines whose power is cut at seeded moments
of install, reboot, commit and rollback, checked after every cut) for as many cuts as
asked; a machine that fails a cut is replaced by a fresh one, so the count is reached.
Prints `survived N of M cuts`, the counts per phase and firmware, the seed and the time
per cut; a line per cut with --verbose. Needs root, qemu-system-x86 and ovmf, like the
boot tests, and builds or reuses their cached converted image.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# After the sys.path entry above, which makes the checkout importable.
from tests.boot import harness, powercut


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=100, help="cuts in all (default 100)")
    parser.add_argument("--seed", type=int, help="the plan's seed (default: a new one, printed)")
    parser.add_argument("--chains", type=int, default=2, help="machines at once (default 2)")
    parser.add_argument(
        "--firmware", choices=[*harness.FIRMWARES, "both"], default="both",
        help="firmware of the machines (default both, in turn)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, help="keep the machines' logs here (default: removed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per cut, and logs")
    args = parser.parse_args()
    if args.cuts < 1 or args.chains < 1:
        parser.error("--cuts and --chains must be at least 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 31)
    firmwares = harness.FIRMWARES if args.firmware == "both" else (args.firmware,)
    print(f"seed {seed}: {args.cuts} cuts on {args.chains} machine(s) at once", flush=True)

    converted = harness.converted_image()
    work = args.work or Path(tempfile.mkdtemp(prefix="otad-power-cuts."))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        reports = powercut.run_chains(
            converted, work, seed, args.cuts, args.chains, firmwares, restart=True
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.verbose:
        for report in reports:
            for result in report.results:
                print(
                    f"{result.cut.name()} {result.firmware}: {result.delay:.1f} of "
                    f"{result.window:.0f} s -> {result.release or 'FAILED'} "
                    f"({result.seconds:.0f} s; last error: {result.last_error or 'none'})"
                )
    print(powercut.summary(reports, seed, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
