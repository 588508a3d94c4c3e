"""Benchmark: otad installing a rootfs artifact, against the updaters users would pick.

In one run, on the same ext4 payload (bench/artifact_read.py's cached generator) and the
same slot (partition 2 of a sparse disk image on a loop device), interleaved:

- otad through the engine (a driver process per install) with compression none, gzip
  and zstd, and once more re-installing the same zstd artifact onto the slot it just
  wrote, where skipping identical blocks applies;
- Debian's mender-client 3.4 (`mender install`, standalone), rauc 1.8 (`rauc install`
  of plain bundles; verity when the kernel has device-mapper) and swupdate 2022.12
  (raw handler), each writing the same slot;
- the limits: dd into the slot, sha256sum of the payload, and gzip/zstd -dc | sha256sum.

Before every install the slot is discarded (`blkdiscard -f`: it reads back as zeros),
so no tool finds blocks it could skip. Throughput is uncompressed payload bytes per
second of wall time, process start included; peak RSS comes from /usr/bin/time -f %M.
Run as root with Debian's interpreter: `/usr/bin/python3`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The sibling module, found through the sys.path entry above.
from artifact_read import (
    DEFAULT_CACHE,
    MIB,
    PYTHON,
    TIME,
    BenchError,
    Command,
    Measurement,
    PayloadParameters,
    building,
    drop_caches,
    ensure_artifacts,
    ensure_payload,
    measure,
    parse_size,
    read_once,
    run,
)

log = logging.getLogger("bench.install_compare")

REPO = Path(__file__).resolve().parent.parent
DEVICE_TYPE = "bench-device"
HW_REVISION = "1.0"
SLOT_SPARE = 16 * MIB  # the slot is this much larger than the payload
TARGET_PEER_RATIO = 1.25
TARGET_LIMIT_RATIO = 0.90
TARGET_IDLE_RSS_KIB = 40 * 1024
# Bump when the peer inputs built below change: it is part of their cache key.
PEER_GENERATOR_VERSION = 1
TOOLS = (
    TIME, "losetup", "partx", "sfdisk", "blkid", "blkdiscard", "unshare", "dd", "sha256sum",
    "gzip", "zstd", "cpio", "openssl", "mksquashfs", "dbus-daemon", "gdbus",
    "mender", "mender-artifact", "fw_printenv", "fw_setenv", "rauc", "swupdate",
)  # fmt: skip
RAUC_SQUASHFS_ARGS = {
    "none": "-noI -noD -noF -noX",
    "gzip": "-comp gzip",
    "zstd": "-comp zstd",
}
SWUPDATE_COMPRESSED = {"none": None, "gzip": "zlib", "zstd": "zstd"}


@dataclass(frozen=True)
class Case:
    """One row of the table: a timed command and what to do around it."""

    key: str  # e.g. "otad/zstd"
    tool: str
    compression: str
    command: Command
    resets_slot: bool = True  # discard the slot first
    checks_slot: bool = True  # on the first run, the slot must then hold the payload
    prepare: Callable[[], None] | None = None  # untimed, before the command
    service: tuple[str, ...] | None = None  # a daemon the command needs (rauc, otad)
    service_name: str = ""  # the bus name that daemon owns once it answers


@dataclass(frozen=True)
class Skipped:
    key: str
    tool: str
    compression: str
    reason: str


@dataclass
class Results:
    measurements: dict[str, list[Measurement]] = field(default_factory=dict)

    def add(self, key: str, measurement: Measurement) -> None:
        self.measurements.setdefault(key, []).append(measurement)

    def speed(self, key: str, size: int) -> float:
        return size / MIB / statistics.median(m.seconds for m in self.measurements[key])

    def max_rss(self, key: str) -> int:
        return max(m.max_rss_kib for m in self.measurements[key])


# -- the disk: a sparse image with two slots on a loop device --------------------------


@dataclass(frozen=True)
class Disk:
    loop: Path
    slot_a: Path
    slot_b: Path
    partuuid_a: str
    partuuid_b: str


def _partuuid(partition: Path) -> str:
    return run(["blkid", "-p", "-s", "PART_ENTRY_UUID", "-o", "value", str(partition)]).strip()


@contextmanager
def attached_disk(directory: Path, slot_size: int, direct_io: bool = False) -> Iterator[Disk]:
    """A GPT disk image with root-a, root-b and data, on a loop device; detached after.

    By default the loop device is buffered: what is written to it lands in the host's page
    cache of the image file, and an fsync only pushes it to the host's disk. With
    `direct_io` the loop device reads and writes the image file with O_DIRECT, so the
    slot behaves like a disk of its own: writes reach the host's disk at its speed.
    """
    image = directory / "disk.img"
    with image.open("wb") as stream:
        stream.truncate(2 * slot_size + 16 * MIB)
    layout = (
        f"label: gpt\nsize={slot_size // 1024}KiB, name=root-a\n"
        f"size={slot_size // 1024}KiB, name=root-b\nname=data\n"
    )
    subprocess.run(["sfdisk", "-q", str(image)], input=layout, text=True, check=True)
    direct = ["--direct-io=on"] if direct_io else []
    loop = Path(run(["losetup", *direct, "--find", "--show", str(image)]).strip())
    try:
        run(["partx", "-u", str(loop)])
        slot_a, slot_b = Path(f"{loop}p1"), Path(f"{loop}p2")
        yield Disk(loop, slot_a, slot_b, _partuuid(slot_a), _partuuid(slot_b))
    finally:
        subprocess.run(["partx", "-d", str(loop)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", str(loop)], capture_output=True, check=False)
        image.unlink(missing_ok=True)


def discard_slot(slot: Path) -> None:
    """Make the slot read back as zeros (holes in the image), so no tool can skip blocks."""
    run(["blkdiscard", "-f", str(slot)])


def slot_holds(slot: Path, payload: Path) -> bool:
    size = payload.stat().st_size
    slot_digest = run(["sh", "-c", f"head -c {size} {shlex.quote(str(slot))} | sha256sum"])
    return slot_digest.split()[0] == run(["sha256sum", str(payload)]).split()[0]


# -- peer inputs: a mender artifact, rauc bundles, swupdate images ---------------------


def _tool_versions() -> str:
    versions = run(["dpkg-query", "-W", "mender-artifact", "rauc", "squashfs-tools", "cpio"])
    return versions.replace("\n", ";")


def peer_key(parameters: PayloadParameters, artifacts: Path) -> str:
    """The peer inputs' cache key: the mender artifact is signed with otad's bench key,
    which is made anew with every artifacts directory, so that directory is part of it."""
    import hashlib

    text = f"{parameters.key};{artifacts.name};{PEER_GENERATOR_VERSION};{_tool_versions()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_with_input(argv: Sequence[str], stdin: bytes, stdout: Path, cwd: Path) -> None:
    with stdout.open("wb") as out:
        completed = subprocess.run(
            argv, input=stdin, stdout=out, stderr=subprocess.PIPE, cwd=cwd, check=False
        )
    if completed.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {completed.returncode}: {completed.stderr!r}")


def make_certificate(work: Path) -> None:
    """A self-signed P-256 certificate: rauc's keyring and swupdate's CMS signer."""
    run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(work / "peer.key"), "-out", str(work / "peer.crt"),
            "-days", "3650", "-subj", "/CN=otad bench", "-addext",
            "keyUsage=critical,digitalSignature",
        ]
    )  # fmt: skip


def make_rauc_bundle(work: Path, payload: Path, compression: str, bundle_format: str) -> None:
    source = work / f"rauc-{bundle_format}-{compression}"
    source.mkdir()
    os.link(payload, source / "rootfs.ext4")
    (source / "manifest.raucm").write_text(
        f"[update]\ncompatible={DEVICE_TYPE}\nversion=2\n\n[bundle]\nformat={bundle_format}\n\n"
        "[image.rootfs]\nfilename=rootfs.ext4\n"
    )
    bundle = work / f"rauc-{bundle_format}-{compression}.raucb"
    run(
        [
            "rauc", "bundle", "--cert", str(work / "peer.crt"), "--key", str(work / "peer.key"),
            f"--mksquashfs-args={RAUC_SQUASHFS_ARGS[compression]}", str(source), str(bundle),
        ]
    )  # fmt: skip
    shutil.rmtree(source)


def sw_description(image: str, digest: str, compression: str, device: Path) -> str:
    compressed = SWUPDATE_COMPRESSED[compression]
    line = f'\t\t\tcompressed = "{compressed}";\n' if compressed else ""
    return (
        "software =\n{\n"
        '\tversion = "2.0";\n'
        f'\thardware-compatibility = [ "{HW_REVISION}" ];\n'
        "\timages: (\n\t\t{\n"
        f'\t\t\tfilename = "{image}";\n'
        f'\t\t\tdevice = "{device}";\n'
        '\t\t\ttype = "raw";\n'
        f"{line}"
        f'\t\t\tsha256 = "{digest}";\n'
        "\t\t\tinstalled-directly = true;\n"
        "\t\t}\n\t);\n}\n"
    )


def make_swu(work: Path, payload: Path, compression: str, device: Path) -> None:
    """A .swu as swupdate documents it: a crc cpio, sw-description and its CMS sig first."""
    source = work / f"swu-{compression}"
    source.mkdir()
    image = {"none": "rootfs.ext4", "gzip": "rootfs.ext4.gz", "zstd": "rootfs.ext4.zst"}[
        compression
    ]
    if compression == "none":
        os.link(payload, source / image)
    else:
        level = "-6" if compression == "gzip" else "-3"  # the levels otad's writer uses
        run_with_input([compression, level, "-c", "-n" if compression == "gzip" else "-q",
                        str(payload)], b"", source / image, source)  # fmt: skip
    digest = run(["sha256sum", str(source / image)]).split()[0]
    (source / "sw-description").write_text(sw_description(image, digest, compression, device))
    run(
        [
            "openssl", "cms", "-sign", "-in", str(source / "sw-description"),
            "-out", str(source / "sw-description.sig"), "-signer", str(work / "peer.crt"),
            "-inkey", str(work / "peer.key"), "-outform", "DER", "-nosmimecap", "-binary",
        ]
    )  # fmt: skip
    names = f"sw-description\nsw-description.sig\n{image}\n".encode()
    run_with_input(["cpio", "-o", "-H", "crc", "--quiet"], names, work / f"{compression}.swu",
                   source)  # fmt: skip
    shutil.rmtree(source)


def ensure_peer_inputs(
    cache: Path, payload: Path, parameters: PayloadParameters, artifacts: Path
) -> Path:
    """The directory with the mender artifact, rauc bundles and .swu files for `payload`.

    The .swu files name the slot device in sw-description, so they are built for the
    loop partition the benchmark will attach (see SWU_DEVICE).
    """
    directory = cache / f"peers-{peer_key(parameters, artifacts)}"
    if (directory / "complete").exists():
        log.info("peer inputs: cached in %s", directory)
        return directory
    with building(directory) as work:
        started = time.monotonic()
        make_certificate(work)
        run(
            [
                "mender-artifact", "--compression", "gzip", "write", "rootfs-image",
                "-n", "bench-mender", "-t", DEVICE_TYPE, "-f", str(payload),
                "-o", str(work / "mender-gzip.mender"), "-k", str(artifacts / "signing.key"),
                "--no-progress",
            ]
        )  # fmt: skip
        log.info("peer inputs: mender artifact in %.0f s", time.monotonic() - started)
        for compression in ("none", "gzip", "zstd"):
            make_rauc_bundle(work, payload, compression, "plain")
            make_swu(work, payload, compression, SWU_DEVICE)
            log.info("peer inputs: %s done at %.0f s", compression, time.monotonic() - started)
        (work / "complete").touch()
    return directory


# The .swu files are signed with the device path inside; the benchmark makes the slot
# reachable under this stable name (a symbolic link to the loop partition).
SWU_DEVICE = Path("/run/otad-bench/slot-b")


# -- otad: the driver process ----------------------------------------------------------


def otad_workdir(work: Path, disk: Disk, artifacts: Path) -> Path:
    """otad.conf, a fake /proc whose root= is slot A, and room for state and bootloader."""
    directory = work / "otad"
    proc = directory / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "sys" / "kernel" / "random").mkdir(parents=True)
    shutil.copy("/proc/self/mountinfo", proc / "self" / "mountinfo")
    (proc / "cmdline").write_text(f"root=PARTUUID={disk.partuuid_a} ro quiet\n")
    (proc / "sys" / "kernel" / "random" / "boot_id").write_text(
        "6d3f1e0a-5b7c-4a8e-9f21-0c4d5e6f7a8b\n"
    )
    (directory / "otad.conf").write_text(
        f'device_type = "{DEVICE_TYPE}"\n'
        f'data_dir = "{directory / "data"}"\n'
        f'trusted_keys = ["{artifacts / "signing.key.pub"}"]\n'
        f'[bootloader]\nbackend = "file"\npath = "{directory / "bootloader.json"}"\n'
        f'[slots.a]\nroot = "PARTUUID={disk.partuuid_a}"\n'
        f'[slots.b]\nroot = "PARTUUID={disk.partuuid_b}"\n'
    )
    return directory


def reset_child(directory: Path) -> int:
    """Put otad's state record and file bootloader back to "slot A booted, idle"."""
    # Imported here: only the child runs with the clone on PYTHONPATH.
    from otad.bootloader.base import Slot
    from otad.bootloader.file import FileBootloader
    from otad.config import parse_config
    from otad.state import Release, StateStore, initial_state

    config = parse_config((directory / "otad.conf").read_text())
    release = Release("release-1", "1.0", {"artifact_name": "release-1"})
    StateStore(config.data_dir).save(initial_state(Slot.A, release))
    FileBootloader(directory / "bootloader.json").initialize(Slot.A)
    return 0


def install_child(directory: Path, artifact: Path) -> int:
    """The otad runner: reset state and bootloader, install `artifact`, print JSON."""
    from otad.bootloader.file import FileBootloader
    from otad.config import parse_config
    from otad.devices import SystemPaths
    from otad.engine import Engine
    from otad.state import StateStore

    reset_child(directory)
    config = parse_config((directory / "otad.conf").read_text())
    store = StateStore(config.data_dir)
    bootloader = FileBootloader(directory / "bootloader.json")
    engine = Engine(config, bootloader, paths=SystemPaths(proc=directory / "proc"), store=store)
    started = time.perf_counter()
    with artifact.open("rb") as stream:
        result = engine.install(stream, allow_downgrade=True)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "slot": result.slot.value,
                "written": result.bytes_written,
                "skipped": result.bytes_skipped,
            }
        )
    )
    return 0


# -- mender, rauc and swupdate setups ---------------------------------------------------


def write_uboot_env(path: Path, size: int, variables: dict[str, str]) -> None:
    """A libubootenv environment: CRC-32 of the data area, then NUL-separated key=value."""
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in variables.items()) + b"\0"
    data = body.ljust(size - 4, b"\0")
    path.write_bytes(struct.pack("<I", zlib.crc32(data)) + data)


MENDER_ENV = {
    "mender_boot_part": "1",
    "mender_boot_part_hex": "1",
    "upgrade_available": "0",
    "bootcount": "0",
}


def mender_setup(work: Path, disk: Disk, artifacts: Path) -> tuple[Path, Callable[[], None]]:
    """A standalone mender: its config, state dir, U-Boot env file and tool wrappers.

    mender runs fw_printenv/fw_setenv and mount from PATH: the wrappers point libubootenv
    at a file-backed fw_env.config, and make `mount` (without arguments) report slot A as
    the root filesystem. /etc/mender (artifact_info) is bind-mounted in a private mount
    namespace, so nothing outside the benchmark's directory changes.
    """
    directory = work / "mender"
    tools, etc, data = directory / "bin", directory / "etc", directory / "data"
    for folder in (tools, etc, data):
        folder.mkdir(parents=True)
    env_file = directory / "uboot.env"
    (directory / "fw_env.config").write_text(f"{env_file} 0x0 0x4000\n")
    for name in ("fw_printenv", "fw_setenv"):
        (tools / name).write_text(
            f'#!/bin/sh\nexec /usr/bin/{name} -c {directory / "fw_env.config"} "$@"\n'
        )
    (tools / "mount").write_text(
        '#!/bin/sh\n[ $# -eq 0 ] || exec /usr/bin/mount "$@"\n'
        f'echo "{disk.slot_a} on / type ext4 (rw,relatime)"\n'
    )
    for script in tools.iterdir():
        script.chmod(0o755)
    (etc / "artifact_info").write_text("artifact_name=release-1\n")
    (data / "device_type").write_text(f"device_type={DEVICE_TYPE}\n")
    config = {
        "RootfsPartA": str(disk.slot_a),
        "RootfsPartB": str(disk.slot_b),
        "ArtifactVerifyKey": str(artifacts / "signing.key.pub"),
        "DeviceTypeFile": str(data / "device_type"),
        "UpdatePollIntervalSeconds": 1800,
        "InventoryPollIntervalSeconds": 1800,
    }
    (directory / "mender.conf").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "fallback.conf").write_text("{}\n")
    launcher = directory / "run-mender"
    launcher.write_text(
        "#!/bin/sh\n"
        f"/usr/bin/mount --bind {etc} /etc/mender || exit 1\n"
        f'PATH={tools}:$PATH exec mender --config {directory / "mender.conf"} '
        f'--fallback-config {directory / "fallback.conf"} --data {data} --no-syslog "$@"\n'
    )
    launcher.chmod(0o755)

    def reset() -> None:
        write_uboot_env(env_file, 0x4000, MENDER_ENV)
        for stale in data.glob("mender-store*"):
            stale.unlink()

    return launcher, reset


RAUC_BOOTLOADER = """#!/bin/sh
# rauc's custom bootloader backend, kept in files: A is booted, B gets the update.
dir=$(dirname "$0")
case "$1" in
  get-primary) cat "$dir/primary" ;;
  set-primary) echo "$2" > "$dir/primary" ;;
  get-state) echo good ;;
  set-state) ;;
  get-current) echo A ;;
esac
"""


def rauc_setup(work: Path, disk: Disk, peers: Path) -> tuple[Path, Callable[[], None]]:
    """system.conf with the two loop partitions as ext4 slots and a custom bootloader."""
    directory = work / "rauc"
    data, mounts = directory / "data", directory / "mnt"
    for folder in (data, mounts):
        folder.mkdir(parents=True)
    backend = directory / "bootloader.sh"
    backend.write_text(RAUC_BOOTLOADER)
    backend.chmod(0o755)
    config = directory / "system.conf"
    config.write_text(
        f"[system]\ncompatible={DEVICE_TYPE}\nbootloader=custom\n"
        f"bundle-formats=plain verity\ndata-directory={data}\nmountprefix={mounts}\n\n"
        f"[handlers]\nbootloader-custom-backend={backend}\n\n"
        f"[keyring]\npath={peers / 'peer.crt'}\n\n"
        f"[slot.rootfs.0]\ndevice={disk.slot_a}\ntype=ext4\nbootname=A\n\n"
        f"[slot.rootfs.1]\ndevice={disk.slot_b}\ntype=ext4\nbootname=B\n"
    )

    def reset() -> None:
        (directory / "primary").write_text("A\n")
        for stale in data.iterdir():
            stale.unlink()

    return config, reset


def device_mapper_missing() -> str | None:
    """Why dm-verity cannot work here, or None when /dev/mapper/control opens."""
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
    except OSError as error:
        return f"/dev/mapper/control: {error.strerror} (no device-mapper in this kernel)"
    return None


@contextmanager
def private_system_bus(work: Path) -> Iterator[str]:
    """A dbus-daemon for rauc's service, exported as DBUS_SYSTEM_BUS_ADDRESS."""
    address = f"unix:path={work / 'system_bus_socket'}"
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", f"--address={address}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if (work / "system_bus_socket").exists():
                break
            time.sleep(0.05)
        yield address
    finally:
        daemon.terminate()
        daemon.wait()


# -- measuring ---------------------------------------------------------------------------


def _child_of(pid: int) -> int | None:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else None


def measure_with_service(case: Case) -> Measurement:
    """Time a service's start, the client's run and the service's stop, as one figure.

    The service runs under time(1) as well; the peak RSS is the larger of the two.
    """
    assert case.service is not None
    with tempfile.TemporaryDirectory(prefix="otad-bench-svc-") as scratch:
        report = Path(scratch) / "service"
        started = time.perf_counter()
        service = subprocess.Popen(
            (TIME, "-f", "%M", "-o", str(report), *case.service),
            env=dict(os.environ, LC_ALL="C", PYTHONPATH=str(REPO)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            run(["gdbus", "wait", "--system", "--timeout", "10", case.service_name])
            client = measure(case.command)
        finally:
            child = _child_of(service.pid)
            if child is not None:
                os.kill(child, signal.SIGTERM)
            service.wait()
        seconds = time.perf_counter() - started
        service_rss = int(report.read_text().split()[-1])
    return Measurement(seconds, max(service_rss, client.max_rss_kib), client.output)


def run_benchmark(cases: list[Case], runs: int, is_dropping: bool, slot: Path,
                  payload: Path) -> Results:  # fmt: skip
    results = Results()
    for number in range(1, runs + 1):
        for case in cases:
            if case.resets_slot:
                discard_slot(slot)
            if case.prepare is not None:
                case.prepare()
            if is_dropping:
                drop_caches()
            if case.service is not None:
                measurement = measure_with_service(case)
            else:
                measurement = measure(case.command)
            results.add(case.key, measurement)
            log.info(
                "run %d/%d %-16s %6.2f s %8d KiB",
                number,
                runs,
                case.key,
                measurement.seconds,
                measurement.max_rss_kib,
            )
            if number == 1 and case.checks_slot and not slot_holds(slot, payload):
                raise BenchError(f"{case.key}: the slot does not hold the payload afterwards")
    return results


# -- the cases ---------------------------------------------------------------------------


def otad_cases(otad_dir: Path, artifacts: Path) -> list[Case]:
    def driver(compression: str) -> Command:
        artifact = str(artifacts / f"{compression}.mender")
        argv = (PYTHON, str(Path(__file__).resolve()), "--child-install", str(otad_dir), artifact)
        return Command(compression, "otad", "otad engine install", (argv,))

    cases = [Case(f"otad/{c}", "otad", c, driver(c)) for c in ("none", "gzip", "zstd")]
    cases.append(
        Case("otad/zstd again", "otad", "zstd", driver("zstd"), resets_slot=False)
    )  # right after otad/zstd: the slot already holds these bytes
    return cases


def otactl_cases(otad_dir: Path, artifacts: Path, bus: str) -> list[Case]:
    """`otactl install` through the daemon on the private bus, timed from its start."""

    def reset() -> None:
        run((PYTHON, str(Path(__file__).resolve()), "--child-reset", str(otad_dir)))

    cases = []
    for compression in ("none", "zstd"):
        client = (PYTHON, "-m", "otad.cli.ctl", "--bus-address", bus, "install",
                  "--allow-downgrade", str(artifacts / f"{compression}.mender"))  # fmt: skip
        cases.append(
            Case(
                f"otactl/{compression}", "otad via otactl", compression,
                Command(compression, "otad", "otactl install", (client,)),
                prepare=reset, service=daemon_argv(otad_dir, bus),
                service_name=OTAD_BUS_NAME,
            )
        )  # fmt: skip
    return cases


def peer_cases(
    work: Path, disk: Disk, artifacts: Path, peers: Path, bus: str
) -> tuple[list[Case], list[Skipped]]:
    launcher, mender_reset = mender_setup(work, disk, artifacts)
    mender_argv = ("unshare", "-m", "--propagation", "private", str(launcher), "install",
                   str(peers / "mender-gzip.mender"))  # fmt: skip
    cases = [
        Case(
            "mender/gzip", "mender", "gzip",
            Command("gzip", "mender", "mender install", (mender_argv,)), prepare=mender_reset,
        )
    ]  # fmt: skip
    config, rauc_reset = rauc_setup(work, disk, peers)
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus  # for gdbus, rauc and its service
    service = ("rauc", f"--conf={config}", "service", "--override-boot-slot=A")
    for compression in ("none", "gzip", "zstd"):
        bundle = peers / f"rauc-plain-{compression}.raucb"
        client = ("rauc", f"--conf={config}", "install", str(bundle))
        cases.append(
            Case(
                f"rauc/{compression}", "rauc plain", compression,
                Command(compression, "rauc", "rauc install", (client,)),
                prepare=rauc_reset, service=service, service_name="de.pengutronix.rauc",
            )
        )  # fmt: skip
    skipped = []
    reason = device_mapper_missing()
    if reason is not None:
        skipped.append(Skipped("rauc verity", "rauc verity", "any", f"not run: {reason}"))
    else:
        # TODO: add verity bundles to the peer inputs when a machine with device-mapper
        # runs this benchmark.
        skipped.append(Skipped("rauc verity", "rauc verity", "any", "not run: not built yet"))
    for compression in ("none", "gzip", "zstd"):
        argv = ("swupdate", "-i", str(peers / f"{compression}.swu"), "-k",
                str(peers / "peer.crt"), "-H", f"{DEVICE_TYPE}:{HW_REVISION}",
                "-B", "none", "-m", "-M", "-l", "2")  # fmt: skip
        cases.append(
            Case(
                f"swupdate/{compression}",
                "swupdate",
                compression,
                Command(compression, "swupdate", "swupdate -i", (argv,)),
            )
        )
        # swupdate never fsyncs the slot; followed by one fsync, as rauc and dd end, its
        # install is as durable as theirs when the clock stops.
        synced = ("sh", "-c", f'{shlex.join(argv)} && exec sync "$0"', str(SWU_DEVICE))
        cases.append(
            Case(
                f"swupdate+sync/{compression}", "swupdate + fsync", compression,
                Command(compression, "swupdate", "swupdate -i; sync", (synced,)),
            )
        )  # fmt: skip
    return cases, skipped


def limit_cases(disk: Disk, payload: Path, artifacts: Path) -> list[Case]:
    dd = ("dd", f"if={payload}", f"of={disk.slot_b}", "bs=4M", "conv=fsync", "status=none")
    cases = [
        Case("dd", "dd conv=fsync", "none", Command("none", "dd", "dd", (dd,))),
        Case(
            "dd direct", "dd oflag=direct", "none",
            Command("none", "dd", "dd", ((*dd, "oflag=direct"),)),
        ),
        Case(
            "sha256sum", "sha256sum", "none",
            Command("none", "sha", "sha256sum", (("sha256sum", str(payload)),)),
            resets_slot=False, checks_slot=False,
        ),
    ]  # fmt: skip
    for compression in ("gzip", "zstd"):
        stages = ((compression, "-dc", str(artifacts / f"{compression}.data")), ("sha256sum",))
        cases.append(
            Case(
                f"{compression} -dc", f"{compression} -dc|sha256sum", compression,
                Command(compression, "sha", "decompress", stages),
                resets_slot=False, checks_slot=False,
            )
        )  # fmt: skip
    return cases


# -- the daemon: idle RSS and time to its first D-Bus answer ---------------------------


@dataclass(frozen=True)
class DaemonFigures:
    seconds: float  # from exec to the first answered D-Bus call
    idle_rss_kib: int  # VmRSS after IDLE_SECONDS without requests
    peak_rss_kib: int  # VmHWM at the same moment


IDLE_SECONDS = 2.0


def is_daemon_built() -> bool:
    return (REPO / "otad" / "cli" / "daemon.py").exists() and (REPO / "otad" / "dbus").is_dir()


OTAD_BUS_NAME = "org.otad.Updater1"


def daemon_argv(otad_dir: Path, bus: str) -> tuple[str, ...]:
    return (PYTHON, "-m", "otad.cli.daemon", "--config", str(otad_dir / "otad.conf"),
            "--bus-address", bus, "--proc", str(otad_dir / "proc"),
            "--reboot-command", "true")  # fmt: skip


def _status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field_name}")


def measure_daemon(otad_dir: Path, bus: str) -> DaemonFigures:
    """Start otad's daemon on the private bus, call it until it answers, let it idle."""
    reset = (PYTHON, str(Path(__file__).resolve()), "--child-reset", str(otad_dir))
    run(reset)
    call = ["gdbus", "call", "--address", bus, "--dest", "org.otad.Updater1",
            "--object-path", "/org/otad/Updater1",
            "--method", "org.freedesktop.DBus.Properties.GetAll", "org.otad.Updater1"]  # fmt: skip
    argv = daemon_argv(otad_dir, bus)
    env = dict(os.environ, LC_ALL="C", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)  # fmt: skip
    try:
        while True:
            answer = subprocess.run(call, capture_output=True, check=False)
            if answer.returncode == 0:
                break
            if daemon.poll() is not None or time.perf_counter() - started > 30:
                stderr = daemon.stderr.read().decode(errors="replace") if daemon.stderr else ""
                raise BenchError(f"the daemon did not answer: {stderr.strip()[-300:]}")
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        time.sleep(IDLE_SECONDS)
        idle, peak = _status_kib(daemon.pid, "VmRSS"), _status_kib(daemon.pid, "VmHWM")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()
    return DaemonFigures(seconds, idle, peak)


def daemon_figures(otad_dir: Path, bus: str, runs: int) -> list[DaemonFigures] | str:
    """`runs` measurements, or why there are none."""
    if not is_daemon_built():
        return "not measured: daemon not built yet"
    try:
        return [measure_daemon(otad_dir, bus) for _ in range(runs)]
    except (BenchError, OSError) as error:
        return f"not measured: {error}"


# -- the report --------------------------------------------------------------------------


def header_lines(size: int, runs: int, cache: str, slot: str) -> list[str]:
    return [
        f"payload: ext4 image, {size // MIB} MiB; {runs} interleaved runs; median MiB/s of "
        "uncompressed payload per wall second (process start included); peak RSS over runs",
        f"page cache: {cache}; before every install the slot is discarded (reads as zeros)",
        f"slot: partition 2 of a sparse disk image on a {slot}; every tool writes it",
        "otad: Engine.install in a driver process, signature + per-chunk SHA-256 (signed "
        "chunk index), 1 MiB blocks, pread-compare, fsync every 64 MiB and at the end, O_EXCL",
        "mender 3.4: standalone `mender install`, gzip artifact from mender-artifact, "
        "signature verified (ArtifactVerifyKey); fsyncs as it writes, file-backed U-Boot env",
        "rauc 1.8: `rauc install` of a signed plain bundle (squashfs: none=-noI -noD -noF -noX, "
        "gzip, zstd), service on a private bus, timed from service start; one fsync at end",
        "swupdate 2022.12: `swupdate -i`, CMS-signed sw-description, raw handler, sha256 "
        "checked, installed-directly; no fsync (kernel writes back on the device's last close)",
        "limits: dd bs=4M conv=fsync [oflag=direct]; sha256sum; gzip/zstd -dc of otad's "
        "data member | sha256sum",
    ]


@dataclass(frozen=True)
class Row:
    label: str
    compression: str
    key: str


def report(
    results: Results,
    cases: list[Case],
    skipped: list[Skipped],
    daemon: list[DaemonFigures] | str,
    size: int,
    runs: int,
    cache: str,
    slot: str,
) -> None:
    print("\n".join(header_lines(size, runs, cache, slot)))
    print(f"{'tool':<26} {'compr.':<6} {'MiB/s':>8} {'RSS KiB':>9}")
    for case in cases:
        label = case.tool if case.key != "otad/zstd again" else "otad re-install same image"
        speed = results.speed(case.key, size)
        print(f"{label:<26} {case.compression:<6} {speed:>8.0f} {results.max_rss(case.key):>9}")
    for skip in skipped:
        print(f"{skip.tool:<26} {skip.compression:<6} {skip.reason}")
    if isinstance(daemon, str):
        print(f"{'otad daemon':<26} {'-':<6} {daemon}")
    else:
        idle = statistics.median(f.idle_rss_kib for f in daemon)
        ready = statistics.median(f.seconds for f in daemon)
        print(f"{'otad daemon':<26} {'-':<6} idle RSS {idle:.0f} KiB (VmRSS after "
              f"{IDLE_SECONDS:.0f} s idle; VmHWM {max(f.peak_rss_kib for f in daemon)} KiB), "
              f"start to first D-Bus answer {ready:.2f} s")  # fmt: skip
    for case in cases:
        if case.tool == "otad" and case.key != "otad/zstd again":
            inner = statistics.median(
                json.loads(m.output)["seconds"] for m in results.measurements[case.key]
            )
            print(f"{case.key}: Engine.install alone {size / MIB / inner:.0f} MiB/s (in-process)")
    if "otad/zstd again" in results.measurements:  # not when --only left it out
        again = json.loads(results.measurements["otad/zstd again"][-1].output)
        print(f"otad re-install: {again['written']} bytes written, {again['skipped']} skipped")
    print_targets(results, cases, size, daemon)


def print_targets(
    results: Results, cases: list[Case], size: int, daemon: list[DaemonFigures] | str
) -> None:
    limit = max(results.speed("dd", size), results.speed("dd direct", size))
    for compression in ("none", "zstd"):
        if f"otad/{compression}" not in results.measurements:
            continue  # left out by --only
        otad = results.speed(f"otad/{compression}", size)
        for peer_tools, how in (
            (("mender", "rauc plain", "swupdate"), "as shipped"),
            (("mender", "rauc plain", "swupdate + fsync"), "each ending with an fsync"),
        ):
            peers = [
                (results.speed(c.key, size), c.key)
                for c in cases
                if c.compression == compression and c.tool in peer_tools
            ]
            if not peers:
                continue
            best, name = max(peers)
            ratio = otad / best
            verdict = "MET" if ratio >= TARGET_PEER_RATIO else "MISSED"
            print(f"target {compression}: otad >= {TARGET_PEER_RATIO}x best peer {how} "
                  f"({name} {best:.0f}): {ratio:.2f}x {verdict}")  # fmt: skip
        ratio = otad / limit
        verdict = "MET" if ratio >= TARGET_LIMIT_RATIO else "MISSED"
        print(f"target {compression}: otad >= {TARGET_LIMIT_RATIO} of dd ({limit:.0f}): "
              f"{ratio:.2f} {verdict}")  # fmt: skip
    target = f"target: daemon idle RSS < {TARGET_IDLE_RSS_KIB // 1024} MiB"
    if isinstance(daemon, str):
        print(f"{target}: {daemon}")
    else:
        idle = statistics.median(f.idle_rss_kib for f in daemon)
        print(f"{target}: {idle:.0f} KiB {'MET' if idle < TARGET_IDLE_RSS_KIB else 'MISSED'}")


# -- entry point -------------------------------------------------------------------------


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
        help="echo 3 > /proc/sys/vm/drop_caches before every run; default: warm cache",
    )
    parser.add_argument(
        "--slot-direct-io",
        action="store_true",
        help="losetup --direct-io=on: the slot writes through to the host's disk, as a real "
        "disk would; default: a buffered loop device (writes land in the page cache)",
    )
    parser.add_argument(
        "--only",
        help="run only the cases whose key contains this text (or one of several, "
        "comma-separated: otad/none,otad/zstd); the dd limits always run",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log commands")
    parser.add_argument("--child-install", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-reset", type=Path, help=argparse.SUPPRESS)
    return parser


def benchmark(args: argparse.Namespace) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (see bench/README.md)")
    if os.geteuid() != 0:
        raise BenchError("loop devices and block writes need root")
    if args.runs < 1:
        raise BenchError(f"--runs {args.runs}: expected at least 1")
    parameters = PayloadParameters(size=args.size)
    payload = ensure_payload(args.cache, parameters)
    artifacts = ensure_artifacts(args.cache, payload, parameters)
    peers = ensure_peer_inputs(args.cache, payload, parameters, artifacts)
    with ExitStack() as stack:
        scratch = tempfile.TemporaryDirectory(dir=args.cache, prefix="install-")
        work = Path(stack.enter_context(scratch))
        disk = stack.enter_context(attached_disk(work, args.size + SLOT_SPARE, args.slot_direct_io))
        SWU_DEVICE.parent.mkdir(parents=True, exist_ok=True)
        SWU_DEVICE.unlink(missing_ok=True)
        SWU_DEVICE.symlink_to(disk.slot_b)
        stack.callback(SWU_DEVICE.unlink, missing_ok=True)
        bus = stack.enter_context(private_system_bus(work))
        otad_dir = otad_workdir(work, disk, artifacts)
        cases = otad_cases(otad_dir, artifacts)
        if is_daemon_built():
            cases += otactl_cases(otad_dir, artifacts, bus)
        more, skipped = peer_cases(work, disk, artifacts, peers, bus)
        cases += more + limit_cases(disk, payload, artifacts)
        if args.only:
            wanted = [text for text in args.only.split(",") if text]
            cases = [
                c
                for c in cases
                if any(text in c.key for text in wanted) or c.key in ("dd", "dd direct")
            ]
        slot = "loop device with direct I/O" if args.slot_direct_io else "buffered loop device"
        if args.drop_caches:
            cache = "dropped before every run"
        else:
            cache = "warm (every input file read once before timing)"
            inputs = [payload, *artifacts.glob("*.mender"), *artifacts.glob("*.data")]
            for path in [
                *inputs,
                *peers.glob("*.mender"),
                *peers.glob("*.raucb"),
                *peers.glob("*.swu"),
            ]:
                read_once(path)
        results = run_benchmark(cases, args.runs, args.drop_caches, disk.slot_b, payload)
        daemon = daemon_figures(otad_dir, bus, args.runs)
    report(results, cases, skipped, daemon, args.size, args.runs, cache, slot)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child_install:
        return install_child(*args.child_install)
    if args.child_reset:
        return reset_child(args.child_reset)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        benchmark(args)
    except (BenchError, OSError, subprocess.CalledProcessError) as error:
        print(f"install_compare: {error}", file=sys.stderr)
        return 1
    return 0  # a benchmark reports a missed target, it does not fail on it


if __name__ == "__main__":
    sys.exit(main())
