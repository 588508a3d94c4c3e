"""Benchmark: how fast otad reads and verifies a rootfs artifact, against shell baselines.

For each compression (none, gzip, zstd) the same run times, interleaved:

- otad through the library (a child process calling `verify_artifact`),
- otad through the command line (`python3 -m otad.cli.artifact validate`),
- the baseline: `sha256sum PAYLOAD` for none, `gzip -dc DATA | sha256sum` and
  `zstd -dc DATA | sha256sum` for the others, where DATA is the data member extracted
  from the very artifact otad reads,
- a reference: the same with `openssl dgst -sha256` in place of `sha256sum`.

Throughput is uncompressed payload bytes per second of wall time, startup included.
The payload is a real ext4 image built with `mkfs.ext4 -d`; it and the artifacts are
cached outside the clone. Run with Debian's interpreter: `/usr/bin/python3`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("bench.artifact_read")

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
TIME = "/usr/bin/time"
DEFAULT_CACHE = Path(os.environ.get("OTAD_BENCH_CACHE", "/var/cache/otad-bench"))
COMPRESSIONS = ("none", "gzip", "zstd")
TARGET_RATIO = 0.90
MIB = 1 << 20
PAYLOAD_NAME = "rootfs.ext4"
TOOLS = ("mkfs.ext4", "sha256sum", "openssl", "gzip", "zstd", TIME)

# Bump when the generator below changes what it writes: it is part of the cache key.
GENERATOR_VERSION = 1
# The modules that decide which bytes an artifact holds; their source keys the
# artifact cache, so a reader-only change does not rebuild the artifacts.
WRITER_SOURCES = (
    "otad/artifact/writer.py",
    "otad/artifact/compression.py",
    "otad/artifact/chunks.py",
    "otad/artifact/headers.py",
    "otad/artifact/tarwrite.py",
    "otad/artifact/signing.py",
    "otad/artifact/release.py",
    "otad/cli/artifact.py",
)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclass(frozen=True)
class PayloadParameters:
    """What the generated root filesystem holds, as fractions of the image size.

    The rest of the image is ext4 metadata and free space (zeros, as after mkfs).
    """

    size: int
    seed: int = 20240601
    text: float = 0.35  # configuration, documentation, scripts: compresses about 3:1
    binary: float = 0.25  # executables and libraries: low-entropy bytes, about 2:1
    random: float = 0.10  # media and already-compressed files: incompressible
    generator: int = GENERATOR_VERSION

    @property
    def key(self) -> str:
        encoded = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]


@dataclass(frozen=True)
class Command:
    """One timed command line (a pipeline when it has several stages)."""

    case: str
    role: str  # "lib", "cli", "baseline" or "openssl"
    label: str
    stages: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Measurement:
    seconds: float
    max_rss_kib: int  # the largest stage's peak resident set
    output: str


@dataclass
class Results:
    measurements: dict[tuple[str, str], list[Measurement]] = field(default_factory=dict)

    def add(self, command: Command, measurement: Measurement) -> None:
        self.measurements.setdefault((command.case, command.role), []).append(measurement)

    def median_seconds(self, case: str, role: str) -> float:
        return statistics.median(m.seconds for m in self.measurements[(case, role)])

    def max_rss(self, case: str, role: str) -> int:
        return max(m.max_rss_kib for m in self.measurements[(case, role)])


# -- running processes -----------------------------------------------------------------


def _environment() -> dict[str, str]:
    env = dict(os.environ, LC_ALL="C", PYTHONPATH=str(REPO))
    env.pop("PYTHONHOME", None)
    return env


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run one untimed command; return its stdout or raise BenchError with its stderr."""
    log.debug("running %s", shlex.join(argv))
    completed = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env or _environment(),
        check=False,
    )
    if completed.returncode != 0:
        raise BenchError(
            f"{shlex.join(argv)} exited {completed.returncode}: {completed.stderr.strip()}"
        )
    return completed.stdout


def measure(command: Command) -> Measurement:
    """Run `command` once; wall time from the first fork to the last exit, peak RSS.

    Each stage runs under `/usr/bin/time -f %M`: Linux carries a process's peak RSS
    across exec, so a child forked straight from this interpreter would report at least
    the interpreter's size; forked from time(1) it reports its own.
    """
    env = _environment()
    with tempfile.TemporaryDirectory(prefix="otad-bench-rss-") as scratch:
        reports = [Path(scratch) / f"stage{index}" for index in range(len(command.stages))]
        processes: list[subprocess.Popen[bytes]] = []
        upstream: int | None = subprocess.DEVNULL
        start = time.perf_counter()
        for stage, rss_report in zip(command.stages, reports, strict=True):
            timed = (TIME, "-f", "%M", "-o", str(rss_report), *stage)
            process = subprocess.Popen(
                timed, stdin=upstream, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
            )
            if processes and (previous := processes[-1].stdout) is not None:
                previous.close()  # the next stage holds the pipe now
            processes.append(process)
            assert process.stdout is not None
            upstream = process.stdout.fileno()
        output, last_errors = processes[-1].communicate()
        statuses = [process.wait() for process in processes]
        seconds = time.perf_counter() - start
        errors = [p.stderr.read().decode(errors="replace") for p in processes[:-1] if p.stderr]
        errors.append(last_errors.decode(errors="replace"))
        if any(statuses):
            pipeline = " | ".join(shlex.join(stage) for stage in command.stages)
            raise BenchError(f"{pipeline} exited {statuses}: {' '.join(errors).strip()}")
        peak = max(int(rss_report.read_text().split()[-1]) for rss_report in reports)
    for process in processes:
        if process.stderr is not None:
            process.stderr.close()
    return Measurement(seconds, peak, output.decode(errors="replace"))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextmanager
def building(directory: Path) -> Iterator[Path]:
    """A scratch directory that becomes `directory` only if the block completes."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    scratch.rename(directory)


def read_once(path: Path) -> None:
    """Pull `path` into the page cache."""
    buffer = memoryview(bytearray(4 * MIB))
    with path.open("rb", buffering=0) as stream:
        while stream.readinto(buffer):
            pass


# -- the payload: a real ext4 image ----------------------------------------------------


def _text_lines(rng: random.Random) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [26 - index for index in range(len(letters))]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(3000)]
    lines = []
    for number in range(40000):
        body = " ".join(rng.choices(words, k=rng.randint(2, 12)))
        style = number % 4
        if style == 0:
            lines.append(f"{body.split()[0]}={rng.randint(0, 65535)}")
        elif style == 1:
            lines.append(f"# {body}")
        else:
            lines.append(f"    {body};")
    return lines


def _binary_table(rng: random.Random) -> bytes:
    """A byte map that skews uniform random bytes towards what object code looks like."""
    common = [0x00] * 90 + [0xFF] * 20 + [0x48, 0x89, 0x8B, 0xE8, 0x0F, 0x24, 0x45] * 6
    table = common + [rng.randrange(256) for _ in range(256 - len(common))]
    return bytes(table[:256])


def _file_sizes(rng: random.Random, budget: int, low: int, high: int) -> list[int]:
    sizes = []
    while budget > 0:
        size = min(budget, int(low * (high / low) ** rng.random()))
        sizes.append(size)
        budget -= size
    return sizes


def write_tree(root: Path, parameters: PayloadParameters) -> None:
    """Fill `root` with a deterministic directory tree shaped like a root filesystem."""
    rng = random.Random(parameters.seed)
    lines = _text_lines(rng)
    table = _binary_table(rng)
    size = parameters.size
    kinds = (
        ("text", "usr/share/doc", parameters.text, 512, 2 * MIB),
        ("binary", "usr/lib/x86_64-linux-gnu", parameters.binary, 4096, 8 * MIB),
        ("random", "usr/share/media", parameters.random, 64 * 1024, 16 * MIB),
    )
    for kind, base, fraction, low, high in kinds:
        for number, file_size in enumerate(_file_sizes(rng, int(size * fraction), low, high)):
            directory = root / base / f"{number // 200:03}"
            directory.mkdir(parents=True, exist_ok=True)
            if kind == "text":
                count = file_size // 40 + 1
                data = "\n".join(rng.choices(lines, k=count)).encode()[:file_size]
            elif kind == "binary":
                data = rng.randbytes(file_size).translate(table)
            else:
                data = rng.randbytes(file_size)
            path = directory / f"{kind}{number:05}"
            path.write_bytes(data)
            os.utime(path, (0, 0))
    for empty in ("etc", "home", "tmp", "var/log", "usr/bin"):
        (root / empty).mkdir(parents=True, exist_ok=True)


def build_ext4(tree: Path, image: Path, size: int, seed: int) -> None:
    """mkfs.ext4 -d the tree into an image of `size` bytes, then make the file dense."""
    uuid = f"{seed:08x}-0000-4000-8000-{seed:012x}"
    sparse = image.with_suffix(".sparse")
    with sparse.open("wb") as stream:
        stream.truncate(size)
    env = dict(_environment(), SOURCE_DATE_EPOCH="0")
    run(
        [
            "mkfs.ext4", "-q", "-F", "-b", "4096", "-i", "16384", "-I", "256",
            "-L", "rootfs", "-U", uuid, "-E", f"hash_seed={uuid},root_owner=0:0",
            "-d", str(tree), str(sparse),
        ],
        env,
    )  # fmt: skip
    # Written out in full so that reading it costs what reading the artifact costs.
    buffer = memoryview(bytearray(4 * MIB))
    with sparse.open("rb", buffering=0) as source, image.open("wb") as target:
        while count := source.readinto(buffer):
            target.write(buffer[:count])
    sparse.unlink()


def ensure_payload(cache: Path, parameters: PayloadParameters) -> Path:
    """The cached ext4 image for `parameters`, built on first use."""
    directory = cache / f"payload-{parameters.key}"
    image = directory / PAYLOAD_NAME
    if image.exists():
        log.info("payload: cached %s", image)
        return image
    log.info("payload: building a %d MiB ext4 image in %s", parameters.size // MIB, directory)
    started = time.monotonic()
    with building(directory) as work:
        write_tree(work / "tree", parameters)
        build_ext4(work / "tree", work / PAYLOAD_NAME, parameters.size, parameters.seed)
        shutil.rmtree(work / "tree")
        (work / "parameters.json").write_text(json.dumps(asdict(parameters), indent=2) + "\n")
    log.info("payload: built in %.0f s", time.monotonic() - started)
    return image


# -- the artifacts ---------------------------------------------------------------------


def writer_key(parameters: PayloadParameters) -> str:
    digest = hashlib.sha256(parameters.key.encode())
    for name in WRITER_SOURCES:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return digest.hexdigest()[:16]


def _otad_cli(*arguments: str) -> tuple[str, ...]:
    return (PYTHON, "-m", "otad.cli.artifact", *arguments)


def extract_data_member(artifact: Path, target: Path) -> None:
    """Copy data/0000.tar* out of `artifact` byte for byte."""
    with tarfile.open(artifact, "r:") as archive:
        for member in archive:
            if re.fullmatch(r"data/0000\.tar(\.gz|\.zst)?", member.name):
                source = archive.extractfile(member)
                assert source is not None
                with target.open("wb") as out:
                    shutil.copyfileobj(source, out, 4 * MIB)
                return
    raise BenchError(f"{artifact} holds no data/0000.tar* member")


def ensure_artifacts(cache: Path, payload: Path, parameters: PayloadParameters) -> Path:
    """The directory with signing.key.pub, ARTIFACT.mender and DATA files per compression."""
    directory = cache / f"artifacts-{writer_key(parameters)}"
    if (directory / "complete").exists():
        log.info("artifacts: cached in %s", directory)
        return directory
    with building(directory) as work:
        key = work / "signing.key"
        run(_otad_cli("genkey", "-o", str(key), "--type", "ecdsa"))
        for compression in COMPRESSIONS:
            started = time.monotonic()
            artifact = work / f"{compression}.mender"
            run(
                _otad_cli(
                    "write", "rootfs-image", "-n", f"bench-{compression}", "-t", "bench-device",
                    "-f", str(payload), "-o", str(artifact), "-k", str(key),
                    "--compression", compression,
                )
            )  # fmt: skip
            if compression != "none":
                extract_data_member(artifact, work / f"{compression}.data")
            log.info(
                "artifacts: wrote %s (%d MiB) in %.0f s",
                artifact.name,
                artifact.stat().st_size // MIB,
                time.monotonic() - started,
            )
        (work / "complete").touch()
    return directory


# -- the benchmark ---------------------------------------------------------------------


def commands_for(case: str, payload: Path, artifacts: Path) -> list[Command]:
    artifact = str(artifacts / f"{case}.mender")
    key = str(artifacts / "signing.key.pub")
    child = (PYTHON, str(Path(__file__).resolve()), "--child-verify", artifact, key)
    validate = _otad_cli("validate", artifact, "-k", key)
    if case == "none":
        baseline: tuple[tuple[str, ...], ...] = (("sha256sum", str(payload)),)
        reference: tuple[tuple[str, ...], ...] = (("openssl", "dgst", "-sha256", str(payload)),)
        label = "sha256sum PAYLOAD"
    else:
        decompress = (case, "-dc", str(artifacts / f"{case}.data"))
        baseline = (decompress, ("sha256sum",))
        reference = (decompress, ("openssl", "dgst", "-sha256"))
        label = f"{case} -dc DATA | sha256sum"
    return [
        Command(case, "lib", "verify_artifact", (child,)),
        Command(case, "cli", "otad-artifact validate", (validate,)),
        Command(case, "baseline", label, baseline),
        Command(case, "openssl", label.replace("sha256sum", "openssl dgst -sha256"), reference),
    ]


def check_outputs(results: Results, case: str) -> None:
    """The baselines of one case must agree on the digest; otad must report success."""
    digests = {
        match.group(0)
        for role in ("baseline", "openssl")
        for m in results.measurements[(case, role)]
        if (match := re.search(r"\b[0-9a-f]{64}\b", m.output))
    }
    if len(digests) != 1:
        raise BenchError(f"{case}: baselines disagree on the SHA-256: {sorted(digests)}")
    for m in results.measurements[(case, "cli")]:
        if "valid," not in m.output or "signature verified" not in m.output:
            raise BenchError(f"{case}: otad-artifact validate said {m.output!r}")
    for m in results.measurements[(case, "lib")]:
        if json.loads(m.output)["signature"] != "verified":
            raise BenchError(f"{case}: verify_artifact said {m.output!r}")


def run_benchmark(commands: list[Command], runs: int, is_dropping: bool) -> Results:
    results = Results()
    for number in range(1, runs + 1):
        for command in commands:
            if is_dropping:
                drop_caches()
            measurement = measure(command)
            results.add(command, measurement)
            log.info(
                "run %d/%d %-4s %-8s %6.2f s %8d KiB",
                number,
                runs,
                command.case,
                command.role,
                measurement.seconds,
                measurement.max_rss_kib,
            )
    return results


def report(results: Results, commands: list[Command], size: int, runs: int, cache: str) -> bool:
    """Print the table; True when every otad figure meets the target."""
    labels = {(c.case, c.role): c.label for c in commands}

    def speed(case: str, role: str) -> float:
        return size / MIB / results.median_seconds(case, role)

    rows = []
    is_met = True
    for case in COMPRESSIONS:
        for role in ("lib", "cli"):
            otad, base, ref = speed(case, role), speed(case, "baseline"), speed(case, "openssl")
            ratio = otad / base
            is_met = is_met and ratio >= TARGET_RATIO
            rows.append(
                f"{case:<5} {role:<4} {otad:>10.0f} {labels[(case, 'baseline')]:<27} "
                f"{base:>8.0f} {ratio:>6.2f} {'MET' if ratio >= TARGET_RATIO else 'MISSED':<7}"
                f"{results.max_rss(case, role):>10} {ref:>9.0f} {otad / ref:>6.2f}"
            )
    print(f"payload: ext4 image, {size // MIB} MiB; {runs} interleaved runs; median MiB/s")
    print(f"page cache: {cache}; wall time per process, interpreter start included")
    print(
        f"{'case':<5} {'otad':<4} {'otad MiB/s':>10} {'baseline':<27} {'MiB/s':>8} "
        f"{'ratio':>6} {'target':<7}{'RSS KiB':>10} {'openssl':>9} {'ratio':>6}"
    )
    print("\n".join(rows))
    for case in COMPRESSIONS:
        inner = statistics.median(
            json.loads(m.output)["seconds"] for m in results.measurements[(case, "lib")]
        )
        print(
            f"{case}: verify_artifact alone {size / MIB / inner:.0f} MiB/s "
            f"(in-process, without interpreter start and imports); "
            f"baseline peak RSS {results.max_rss(case, 'baseline')} KiB"
        )
    print(f"target: ratio >= {TARGET_RATIO:.2f} (otad/baseline): {'MET' if is_met else 'MISSED'}")
    return is_met


def verify_child(artifact: Path, key: Path) -> int:
    """The library runner: verify one artifact in this process and print JSON."""
    # Imported here: only the child runs with the clone on PYTHONPATH.
    from otad.artifact.reader import VerifyPolicy, verify_artifact
    from otad.artifact.signing import load_verifier

    policy = VerifyPolicy((load_verifier(key),))
    started = time.perf_counter()
    with artifact.open("rb") as stream:
        header, files = verify_artifact(stream, policy)
    seconds = time.perf_counter() - started
    total = sum(payload_file.size for payload_file in files)
    print(json.dumps({"seconds": seconds, "bytes": total, "signature": header.signature.value}))
    return 0


def parse_size(text: str) -> int:
    match = re.fullmatch(r"([0-9]+)\s*([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 256M or 1G")
    factor = {"": 1, "K": 1 << 10, "M": MIB, "G": 1 << 30}[match.group(2).upper()]
    size = int(match.group(1)) * factor
    if size < 32 * MIB or size % (4096):
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a 4 KiB multiple >= 32M")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="payload (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}"
    )
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="echo 3 > /proc/sys/vm/drop_caches before every run (root); default: warm cache",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log commands")
    parser.add_argument("--child-verify", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child_verify:
        return verify_child(*args.child_verify)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise BenchError(f"missing tools: {', '.join(missing)} (apt-get install them)")
        if args.runs < 1:
            raise BenchError(f"--runs {args.runs}: expected at least 1")
        parameters = PayloadParameters(size=args.size)
        payload = ensure_payload(args.cache, parameters)
        artifacts = ensure_artifacts(args.cache, payload, parameters)
        commands = [c for case in COMPRESSIONS for c in commands_for(case, payload, artifacts)]
        if args.drop_caches:
            cache = "dropped before every run"
        else:
            cache = "warm (every file read once before timing)"
            for path in [payload, *sorted(artifacts.glob("*.mender")), *artifacts.glob("*.data")]:
                read_once(path)
        results = run_benchmark(commands, args.runs, args.drop_caches)
        for case in COMPRESSIONS:
            check_outputs(results, case)
    except (BenchError, OSError) as error:
        print(f"artifact_read: {error}", file=sys.stderr)
        return 1
    report(results, commands, args.size, args.runs, cache)
    return 0  # a benchmark reports a missed target, it does not fail on it


if __name__ == "__main__":
    sys.exit(main())
