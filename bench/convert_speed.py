"""Benchmark: otad-convert on a 2 GiB stock-like image, against copying that image.

In one run, interleaved (a copy, then each conversion, then the next copy...):

- `cp --sparse=always INPUT COPY`, the least any tool that produces a new image of the
  input does;
- `otad-convert INPUT -o OUTPUT` with one small --deb, once per artifact compression
  (gzip, the default, and zstd), timed from fork to exit; the phase timings its report
  prints give the package installation, which is reported apart and left out of the
  ratio, since it depends on the packages and not on the converter.

The input is the converter tests' cached Debian 12 cloud-like image (tests/convert/
stock.py), grown to --size with its root filesystem, and filled with generated content
(bench/artifact_read.py's generator: text, binary-like and random files) to about two
thirds, so that there is real data to copy and compress. It is cached under
${OTAD_BENCH_CACHE:-/var/cache/otad-bench}, keyed by the stock image and the
parameters. Figures are medians; the exit status stays 0 whatever they are. Run as
root with /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from artifact_read import (  # noqa: E402  (the sibling module, through sys.path)
    DEFAULT_CACHE,
    MIB,
    PYTHON,
    BenchError,
    PayloadParameters,
    building,
    drop_caches,
    parse_size,
    read_once,
    write_tree,
)

from tests.convert import stock  # noqa: E402

TARGET_RATIO = 2.0  # conversion (without package installation) / copy, at most
FILL_FRACTION = 0.30  # of --size: generated content added to the stock root
PACKAGE_PHASE = "installing packages"
BUILDER_VERSION = 1
_TIMING = re.compile(r"^  (.+): ([0-9.]+) s$")


@dataclass
class Runs:
    """Wall seconds of every run of a case, and the phase seconds of conversions."""

    seconds: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)


def sh(*argv: str | Path, stdin: bytes | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, check=False,
        env={**os.environ, "LC_ALL": "C"},
    )  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))}: {result.stderr.decode().strip()}")
    return result.stdout.decode()


# -- the input: the stock image, grown and filled -------------------------------------


def input_key(stock_image: Path, size: int) -> str:
    parts = [stock_image.name, size, FILL_FRACTION, BUILDER_VERSION]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def ensure_input(cache: Path, size: int) -> Path:
    """The cached input image of `size` bytes, built on first use."""
    source = stock.cache_dir() / f"stock-{stock.image_key()}.img"
    if not source.exists():  # built and renamed into place under the cache's lock
        source = stock.stock_image()
    final = cache / f"convert-input-{input_key(source, size)}"
    image = final / "stock-2g.img"
    if image.exists():
        return image
    print(f"building the input image in {final} (once)", flush=True)
    with building(final) as scratch:
        _build_input(source, scratch / image.name, size, scratch)
    return image


def _build_input(source: Path, image: Path, size: int, scratch: Path) -> None:
    sh("cp", "--sparse=always", source, image)
    if image.stat().st_size > size:
        raise BenchError(f"--size {size} is smaller than the stock image {source}")
    os.truncate(image, size)
    sh("sfdisk", "--quiet", "--relocate", "gpt-bak-std", image)
    sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "-N", "1", image, stdin=b", +")
    table = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    root = next(p for p in table["partitions"] if p["node"].endswith("img1"))
    device = sh("losetup", "--find", "--show", "--offset", str(root["start"] * 512),
                "--sizelimit", str(root["size"] * 512), image).strip()  # fmt: skip
    try:
        sh("e2fsck", "-f", "-y", device)
        sh("resize2fs", device)
        mountpoint = scratch / "root"
        mountpoint.mkdir()
        sh("mount", device, mountpoint)
        try:
            # PayloadParameters' file kinds add up to 0.70 of its size.
            tree = mountpoint / "usr/share/otad-bench"
            write_tree(tree, PayloadParameters(size=int(size * FILL_FRACTION / 0.70)))
        finally:
            sh("umount", mountpoint)
        mountpoint.rmdir()
    finally:
        sh("losetup", "--detach", device)


def build_deb(directory: Path) -> Path:
    tree = directory / "deb-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share/doc/otad-bench").mkdir(parents=True)
    (tree / "usr/share/doc/otad-bench/hello").write_text("hello\n")
    (tree / "DEBIAN/control").write_text(
        "Package: otad-bench\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: otad <otad@example.org>\nDescription: otad-convert benchmark package\n"
    )
    deb = directory / "otad-bench.deb"
    sh("dpkg-deb", "--root-owner-group", "--build", tree, deb)
    return deb


# -- the runs ----------------------------------------------------------------------------


def time_copy(image: Path, scratch: Path) -> float:
    target = scratch / "copy.img"
    started = time.monotonic()
    sh("cp", "--sparse=always", image, target)
    seconds = time.monotonic() - started
    target.unlink()
    return seconds


def time_conversion(
    image: Path, scratch: Path, compression: str, storage: str, deb: Path, key: Path
) -> tuple[float, dict[str, float]]:
    output = scratch / "device.img"
    argv = [PYTHON, "-m", "convert.cli", str(image), "-o", str(output), "--quiet",
            "--storage-size", storage, "--artifact-compression", compression,
            "--deb", str(deb), "--key", str(key)]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"otad-convert failed: {result.stderr.strip()[-2000:]}")
    phases = {}
    in_timings = False
    for line in result.stdout.splitlines():
        if line.startswith("timings"):
            in_timings = True
        elif in_timings and (match := _TIMING.match(line)):
            phases[match[1]] = float(match[2])
    output.unlink()
    output.with_suffix(".mender").unlink()
    return seconds, phases


def run_benchmark(
    image: Path,
    scratch: Path,
    compressions: Sequence[str],
    runs: int,
    storage: str,
    cold: bool = False,
) -> dict[str, Runs]:
    """Interleaved runs; `cold` drops the page cache before each copy and conversion, so
    that both read the input from the disk (as after a download or a reboot)."""
    results = {"copy": Runs(), **{f"convert {c}": Runs() for c in compressions}}
    deb = build_deb(scratch)
    key = scratch / "release.key"
    sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-out", key)  # fmt: skip
    read_once(image)
    for number in range(1, runs + 1):
        if cold:
            drop_caches()
        results["copy"].seconds.append(time_copy(image, scratch))
        for compression in compressions:
            if cold:
                drop_caches()
            seconds, phases = time_conversion(image, scratch, compression, storage, deb, key)
            case = results[f"convert {compression}"]
            case.seconds.append(seconds)
            for phase, value in phases.items():
                case.phases.setdefault(phase, []).append(value)
        print(f"run {number} of {runs} done", flush=True)
    return results


def report(results: dict[str, Runs], image: Path, runs: int) -> None:
    size = image.stat().st_size
    data = int(sh("du", "--block-size=1", image).split()[0])
    copy = statistics.median(results["copy"].seconds)
    print(f"\ninput: {image} ({size // MIB} MiB, {data // MIB} MiB of data); median of {runs}")
    print(f"{'case':<22} {'seconds':>8} {'MiB/s':>7} {'packages s':>11} {'ratio':>6}  target")
    print(f"{'cp --sparse=always':<22} {copy:8.1f} {size / MIB / copy:7.0f} {'':>11} {1.0:6.2f}")
    for case, measured in results.items():
        if case == "copy":
            continue
        total = statistics.median(measured.seconds)
        packages = statistics.median(measured.phases.get(PACKAGE_PHASE, [0.0]))
        without = total - packages
        ratio = without / copy
        verdict = "MET" if ratio <= TARGET_RATIO else "MISSED"
        print(
            f"{case:<22} {total:8.1f} {size / MIB / without:7.0f} {packages:11.1f} "
            f"{ratio:6.2f}  <= {TARGET_RATIO:.1f}: {verdict}"
        )
    for case, measured in results.items():
        if measured.phases:
            print(f"\nphases of {case} (median seconds):")
            for phase, values in measured.phases.items():
                print(f"  {phase:<48} {statistics.median(values):6.1f}")
    print(
        "\nMiB/s is the input's size over wall time; ratio is the conversion without package "
        "installation over the copy."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="input image size (default 2G)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    parser.add_argument("--compression", action="append", choices=("gzip", "zstd", "none"),
                        help="artifact compressions to run (default gzip and zstd)")  # fmt: skip
    parser.add_argument("--storage-size", help="of the output (default: twice --size + 512M)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where inputs live")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before every copy and conversion "
                             "(default: the input is in the page cache)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("convert_speed.py: needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    storage = args.storage_size or f"{2 * size // MIB + 512}M"
    compressions = args.compression or ["gzip", "zstd"]
    try:
        image = ensure_input(args.cache, size)
        scratch = Path(tempfile.mkdtemp(dir=args.cache, prefix=".convert-speed-"))
        try:
            results = run_benchmark(
                image, scratch, compressions, args.runs, storage, args.drop_caches
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except BenchError as error:
        print(f"convert_speed.py: {error}", file=sys.stderr)
        return 1
    print("page cache: dropped before every run" if args.drop_caches else "page cache: warm")
    report(results, image, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
