"""The boot tests' machinery: a converted image built once, and QEMU guests booted from it.

Every input is cached under $OTAD_TEST_CACHE (default /var/cache/otad-test), keyed by a
hash of what makes it: the otad .deb by the content of the tree it is built from, its
dependencies by the .deb and the stock tree, the converted image by all of its inputs.
A guest boots a copy-on-write overlay of the converted image under TCG, with UEFI
(OVMF) or legacy BIOS (QEMU's default firmware, SeaBIOS). Its first serial port is the
system console, logged to a file; the second carries a root shell (a getty with
autologin, set up by the overlay the converter copies in), which `Guest.run` drives with
a small expect loop, with a deadline on every wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.convert import stock

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
FIRMWARES = ("uefi", "bios")  # OVMF, or SeaBIOS (QEMU's default without pflash)
STORAGE_SIZE = "2600M"
DEVICE_TYPE = "x86_64"
FIRST_RELEASE = "v1"
SHELL_TTY = "ttyS1"
# tests/ and bench/ are not packaged (debian/rules runs no tests), so they do not key
# the .deb: editing a test does not rebuild the package and the image.
UNPACKAGED = ("tests/", "bench/")
BOOT_TIMEOUT = 240.0  # seconds from power-on to a root shell; about 45 s is usual
COMMAND_TIMEOUT = 120.0


class GuestError(AssertionError):
    """The guest did not do what a test waited for; the message ends with its logs' tails."""


# -- inputs -----------------------------------------------------------------------------


def _sh(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    log.info("boot harness: %s", " ".join(str(a) for a in argv))
    result = subprocess.run(
        [str(a) for a in argv], check=True, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    return result.stdout


def _hash(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tree_hash() -> str:
    """A hash of the files tools/build-deb copies, except those the package leaves out."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    digest = hashlib.sha256()
    for name in sorted(set(filter(None, listing.split("\0")))):
        path = REPO / name
        if name.startswith(UNPACKAGED) or not (path.is_file() or path.is_symlink()):
            continue
        digest.update(name.encode() + b"\0")
        content = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A scratch directory that becomes `final` if the block succeeds; under the cache lock."""
    with stock._locked(final.parent):
        if final.exists():
            yield final
            return
        partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            yield partial
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def otad_deb() -> Path:
    """The otad .deb built by tools/build-deb from this tree, cached by the tree's content."""
    final = stock.cache_dir() / f"boot-deb-{tree_hash()}"
    with _building(final) as directory:
        if directory != final:
            _sh(REPO / "tools/build-deb", directory)
    (deb,) = final.glob("otad_*_all.deb")
    return deb


def dependency_debs(deb: Path, tree: Path) -> list[Path]:
    """The packages `deb` needs beyond those of the stock `tree`, downloaded once by apt.

    apt resolves against a copy of the tree's dpkg status and the host's package lists
    (the host runs bookworm too), so the result is what `apt install` would fetch on the
    device.
    """
    depends = _sh("dpkg-deb", "--field", deb, "Pre-Depends", "Depends")
    final = stock.cache_dir() / f"boot-debs-{_hash(depends, tree.name)}"
    with _building(final) as directory:
        if directory != final:
            (directory / "partial").mkdir()
            status = directory / "status"
            shutil.copy(tree / "var/lib/dpkg/status", status)
            _sh("apt-get", "install", "--download-only", "--yes", "--no-install-recommends",
                "-o", f"Dir::State::status={status}", "-o", f"Dir::Cache::archives={directory}",
                "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
                "-o", "Debug::NoLocking=1", deb.resolve())  # fmt: skip
            status.unlink()
            shutil.rmtree(directory / "partial")
            (directory / "lock").unlink(missing_ok=True)
    return sorted(p for p in final.glob("*.deb") if not p.name.startswith("otad_"))


def write_overlay(target: Path) -> None:
    """What the image gets for these tests, as a product would add it with --overlay.

    A root shell on the second serial port (autologin; the first port stays the
    console), and `panic=10` on the kernel command line so that a kernel panic reboots
    the machine, as an unattended device must, instead of waiting forever.
    """
    getty = target / f"etc/systemd/system/serial-getty@{SHELL_TTY}.service.d"
    getty.mkdir(parents=True)
    (getty / "autologin.conf").write_text(
        "[Service]\nExecStart=\n"
        "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %I dumb\n"
    )
    wants = target / "etc/systemd/system/getty.target.wants"
    wants.mkdir(parents=True)
    (wants / f"serial-getty@{SHELL_TTY}.service").symlink_to(
        "/lib/systemd/system/serial-getty@.service"
    )
    grub = target / "etc/default/grub.d"
    grub.mkdir(parents=True)
    (grub / "90-unattended.cfg").write_text('GRUB_CMDLINE_LINUX_DEFAULT="panic=10"\n')


def signing_key() -> Path:
    """An ECDSA key for the boot tests' releases (the public key is KEY.pub), made once."""
    final = stock.cache_dir() / "boot-key"
    with _building(final) as directory:
        if directory != final:
            artifact_tool("genkey", "-o", directory / "release.key", "--type", "ecdsa")
    return final / "release.key"


def artifact_tool(*args: str | Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    _sh(sys.executable, "-m", "otad.cli.artifact", *args, env=environment)


@dataclass(frozen=True)
class Converted:
    """The converted image, its first artifact and the key its releases are signed with."""

    image: Path
    artifact: Path
    key: Path


def converted_image() -> Converted:
    """The stock image converted by otad-convert with otad and its dependencies, cached."""
    deb = otad_deb()
    tree = stock.stock_tree()
    debs = [*dependency_debs(deb, tree), deb]
    key = signing_key()
    public = key.with_name(key.name + ".pub")
    inputs = _hash(
        stock.image_key(), *(d.name for d in debs), _file_hash(deb), _file_hash(public),
        inspect.getsource(write_overlay), inspect.getsource(_convert), STORAGE_SIZE,
    )  # fmt: skip
    final = stock.cache_dir() / f"boot-image-{inputs}"
    source = stock.stock_image()
    with _building(final) as directory:
        if directory != final:
            _convert(source, directory, debs, key, public)
            prune_images(final)
    return Converted(final / f"{FIRST_RELEASE}.img", final / f"{FIRST_RELEASE}.mender", key)


KEPT_IMAGES = 2  # converted images kept besides the newest, for other checkouts' runs


def prune_images(newest: Path) -> None:
    """Delete all but the most recently built few converted images (about 2 GB each) and
    the power-cut images made from them: every change to otad's tree makes a new one,
    and a machine that runs the suite often would otherwise fill its disk."""
    cache = newest.parent
    images = sorted(
        (path for path in cache.glob("boot-image-*") if path != newest and path.is_dir()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for stale in images[KEPT_IMAGES:]:
        log.info("boot harness: removing the superseded %s", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
        for derived in cache.glob(f"powercut-{stale.name}-*"):
            shutil.rmtree(derived, ignore_errors=True)


def _convert(source: Path, directory: Path, debs: Sequence[Path], key: Path, public: Path) -> None:
    overlay = directory / "overlay"
    write_overlay(overlay)
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    _sh(sys.executable, "-m", "convert.cli", source, "-o", directory / f"{FIRST_RELEASE}.img",
        "--storage-size", STORAGE_SIZE, "--device-type", DEVICE_TYPE,
        "--artifact-name", FIRST_RELEASE, "--key", key, "--verify-key", public,
        "--overlay", overlay, *[a for d in debs for a in ("--deb", str(d))],
        env=environment)  # fmt: skip
    shutil.rmtree(overlay)


# -- releases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    start: int  # bytes
    size: int  # bytes


def partition_of(image: Path, number: int) -> Partition:
    table = json.loads(_sh("sfdisk", "--json", image))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for entry in table["partitions"]:
        if re.search(rf"\D{number}$", entry["node"]):
            return Partition(entry["start"] * sector, entry["size"] * sector)
    raise LookupError(f"{image} has no partition {number}")


SLOT_A_PARTITION = 3  # convert.layout.plan_layout's numbering


def extract_slot_a(image: Path, target: Path) -> None:
    """Slot A's filesystem, copied out of the converted image into `target` (sparse)."""
    part = partition_of(image, SLOT_A_PARTITION)
    _sh("dd", f"if={image}", f"of={target}", "bs=1M", f"skip={part.start}", f"count={part.size}",
        "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none")  # fmt: skip


def make_release(converted: Converted, work: Path, version: str, files: dict[str, bytes]) -> Path:
    """A signed rootfs artifact of slot A's filesystem with `files` (path: content) added
    or replaced, software version `version`; returns the .mender."""
    filesystem = work / f"{version}.ext4"
    extract_slot_a(converted.image, filesystem)
    staging = work / f"{version}-files"
    staging.mkdir()
    requests = []
    for index, (path, content) in enumerate(files.items()):
        local = staging / str(index)
        local.write_bytes(content)
        local.chmod(0o755 if content.startswith(b"#!") else 0o644)
        directory, _, name = path.rpartition("/")
        requests += [f"cd {directory or '/'}", f"rm {name}", f"write {local} {name}"]
    debugfs(filesystem, requests)
    _sh("e2fsck", "-fy", filesystem)
    _sh("tune2fs", "-U", "random", filesystem)
    _sh("resize2fs", "-M", filesystem)  # a smaller payload: the slot is larger than needed
    artifact = work / f"{version}.mender"
    artifact_tool("write", "rootfs-image", "-n", version, "-t", DEVICE_TYPE,
                  "--software-version", version, "-f", filesystem, "-o", artifact,
                  "-k", converted.key)  # fmt: skip
    filesystem.unlink()
    return artifact


def debugfs(filesystem: Path, requests: list[str]) -> None:
    """Change `filesystem` with debugfs -w; any error but `rm` of a missing file fails."""
    result = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(filesystem)], input="\n".join(requests) + "\n",
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    errors = [
        line for line in result.stderr.splitlines()
        if not line.startswith("debugfs ") and "File not found by ext2_lookup" not in line
    ]  # fmt: skip
    if errors:
        raise RuntimeError(f"debugfs on {filesystem}: {'; '.join(errors)}")


def make_usb_stick(artifact: Path, target: Path) -> None:
    """A disk laid out as USB sticks come: an MBR, one FAT32 partition from 1 MiB, with
    `artifact` at the top level. Made without mounting (mkfs.fat at an offset, mtools)."""
    size = artifact.stat().st_size * 11 // 10 + (64 << 20)
    with target.open("wb") as disk:
        disk.truncate(size)
    subprocess.run(["sfdisk", "--quiet", str(target)], input="label: dos\nstart=2048, type=c\n",
                   text=True, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    sectors = size // 512 - 2048
    _sh("mkfs.fat", "-F", "32", "-n", "OTADSTICK", "--offset", "2048", target, str(sectors // 2))
    _sh("mcopy", "-i", f"{target}@@1M", artifact, f"::{artifact.name}")


def make_media(artifact: Path, target: Path) -> None:
    """A small ext4 disk holding `artifact` at its top level, to attach as a drive."""
    content = target.with_suffix(".content")
    content.mkdir()
    os.link(artifact, content / artifact.name)
    size = artifact.stat().st_size * 11 // 10 + (16 << 20)
    _sh("mkfs.ext4", "-q", "-L", "otad-media", "-d", content, target, f"{size // 1024}k")
    shutil.rmtree(content)


# -- guests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    status: int
    output: str


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path.name} was never written)"
    text = path.read_bytes().decode(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


class Guest:
    """A QEMU machine booted from an overlay of `image`; `media` is attached as a 2nd disk.

    `firmware` is one of FIRMWARES. `overlay` names the machine's disk: a fresh overlay is
    made there unless it exists, in which case the machine boots what it holds (the same
    machine powered on again, its UEFI variables beside it); by default a fresh overlay
    in `work`. The disk uses QEMU's writeback cache, which honours the guest's flushes: a
    write the guest has flushed is in the overlay file, so it survives `kill`.
    """

    def __init__(
        self,
        image: Path,
        work: Path,
        media: Path | None = None,
        firmware: str = "uefi",
        overlay: Path | None = None,
        usb: bool = False,
    ) -> None:
        if firmware not in FIRMWARES:
            raise ValueError(f"firmware {firmware!r} is not one of {', '.join(FIRMWARES)}")
        self.work = work
        self.firmware = firmware
        self.console_log = work / "console.log"
        self.shell_log = work / "shell.log"
        self.overlay = overlay or work / "disk.qcow2"
        self.socket_path = work / "shell.sock"
        self.qmp_path = work / "qmp.sock"
        if not self.overlay.exists():
            _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", image.resolve(), "-F", "raw",
                self.overlay)  # fmt: skip
        variables = self.overlay.with_name("OVMF_VARS.fd")
        if firmware == "uefi" and not variables.exists():
            shutil.copy(OVMF_VARS, variables)
        pflash = [
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]  # fmt: skip
        self._argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "1024",
            "-smp", "2", "-nographic", "-monitor", "none", "-nic", "none",
            *(pflash if firmware == "uefi" else []),
            "-drive", f"if=virtio,format=qcow2,cache=writeback,file={self.overlay}",
            "-chardev", f"file,id=console,path={self.console_log},append=on",
            "-serial", "chardev:console",
            "-serial", f"unix:{self.socket_path},server=on,wait=off",
            # A hardware watchdog, as devices have; idle unless the guest arms it.
            "-device", "i6300esb", "-action", "watchdog=reset",
            # A reset (the guest's reboot, the watchdog's) ends QEMU, which _running()
            # then starts again: every reboot is a power cycle. OVMF under multi-threaded
            # TCG now and then hangs for good on a warm reset, before printing anything
            # (seen once in CI); a cold start does not, and is what a device's reset
            # circuit does anyway.
            "-no-reboot",
        ]  # fmt: skip
        if media is not None:
            self._argv += ["-drive", f"if=virtio,format=raw,readonly=on,file={media}"]
        # QEMU's control socket, for hot-plugging: guests see nothing of it.
        self._argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if usb:
            self._argv += ["-device", "qemu-xhci,id=usb"]  # a USB 3 host controller
        self._plugged = 0
        self._qemu_log = (work / "qemu.log").open("ab")
        self._transcript = self.shell_log.open("ab")
        self.power_cycles = 0
        self._serial = 0  # numbers the shell's markers; never reused, even across resets
        self._launch()

    def _launch(self) -> None:
        self.process = subprocess.Popen(
            self._argv, stdin=subprocess.DEVNULL, stdout=self._qemu_log, stderr=subprocess.STDOUT
        )
        self._socket = self._connect()
        self._buffer = ""

    def _running(self) -> None:
        """Start QEMU again if the guest reset it (it exits 0); fail if it died otherwise
        or the guest powered itself off."""
        if self.process.poll() is None:
            return
        if self.process.returncode != 0:
            raise self.failure(f"QEMU exited with {self.process.returncode}")
        if tail(self.console_log, 5).rstrip().endswith("reboot: Power down"):
            raise self.failure("the guest powered itself off")
        self._socket.close()
        self.power_cycles += 1
        log.info("guest reset: QEMU powered on again (%d)", self.power_cycles)
        self._launch()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise self.failure(f"QEMU exited with {self.process.returncode}")
            try:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.connect(str(self.socket_path))
                return connection
            except (FileNotFoundError, ConnectionRefusedError):
                connection.close()
                if time.monotonic() > deadline:
                    raise self.failure("QEMU's serial socket did not appear in 30 s") from None
                time.sleep(0.2)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._socket.close()
        self._transcript.close()
        self._qemu_log.close()

    def kill(self) -> None:
        """Cut the power: SIGKILL QEMU, so that nothing it still buffers reaches the disk.

        What the guest flushed is in the overlay file already; writes it had not flushed
        may be lost, wholly or in part (qcow2 keeps new clusters' mappings in QEMU's memory
        until a flush). The host's page cache survives, as a disk's flushed cache would.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.close()

    def plug_usb_stick(self, stick: Path) -> None:
        """Hot-plug `stick` (a raw disk image) as a USB mass-storage device, as a person
        pushes a stick in: the guest's kernel and udev see a new removable disk. Needs a
        guest started with usb=True. A power cycle unplugs it: QEMU starts without it.
        """
        self._plugged += 1
        node = f"stick{self._plugged}"
        self._qmp("blockdev-add", {
            "node-name": node, "driver": "raw", "read-only": True,
            "file": {"driver": "file", "filename": str(stick), "read-only": True},
        })  # fmt: skip
        self._qmp("device_add", {
            "driver": "usb-storage", "id": f"usb-{node}", "bus": "usb.0", "drive": node,
            "removable": True,
        })  # fmt: skip

    def _qmp(self, command: str, arguments: Mapping[str, object]) -> object:
        """One QMP command on a fresh connection; its "return" value, or a failure."""
        self._running()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(30)
            connection.connect(str(self.qmp_path))
            replies = connection.makefile("rwb")

            def exchange(message: Mapping[str, object] | None) -> dict[str, object]:
                if message is not None:
                    replies.write(json.dumps(message).encode() + b"\n")
                    replies.flush()
                while True:  # asynchronous events may come first
                    line = replies.readline()
                    if not line:
                        raise self.failure(f"QMP closed the connection during {command}")
                    reply: dict[str, object] = json.loads(line)
                    if "event" not in reply:
                        return reply

            exchange(None)  # the greeting
            exchange({"execute": "qmp_capabilities"})
            reply = exchange({"execute": command, "arguments": dict(arguments)})
        if "error" in reply:
            raise self.failure(f"QMP {command} {dict(arguments)} failed: {reply['error']}")
        return reply.get("return")

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def failure(self, message: str) -> GuestError:
        return GuestError(
            f"{message}\n--- console (tail of {self.console_log}) ---\n{tail(self.console_log)}"
            f"\n--- shell (tail of {self.shell_log}) ---\n{tail(self.shell_log, 30)}"
        )

    # -- the expect loop --

    def _send(self, text: str) -> None:
        self._transcript.write(f"\n>>> {text}".encode())
        self._transcript.flush()
        self._running()
        # When QEMU is exiting, the next _expect starts it again and the command is lost,
        # as any input to a machine that resets is.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._socket.sendall(text.encode())

    def _expect(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str] | None:
        """Read until `pattern` matches the unread output (consumed up to the match's end),
        or return None at `deadline`."""
        while True:
            match = pattern.search(self._buffer)
            if match is not None:
                self._buffer = self._buffer[match.end() :]
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._running()
            readable, _, _ = select.select([self._socket], [], [], min(left, 1.0))
            if readable:
                try:
                    data = self._socket.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:  # QEMU closes the socket as it exits
                    try:
                        self.process.wait(10)
                    except subprocess.TimeoutExpired:
                        raise self.failure("QEMU closed the serial socket") from None
                    self._running()
                    continue
                self._transcript.write(data)
                self._transcript.flush()
                self._buffer += data.decode(errors="replace").replace("\r", "")

    def wait_shell(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for the root shell and make it quiet: no echo, no prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._serial += 1
            # The shell prints the sum, which the echoed input does not contain.
            self._send(f"stty -echo; PS1=; PS2=; echo OTAD-READY-$(({self._serial}+1))\n")
            pattern = re.compile(rf"OTAD-READY-{self._serial + 1}\n")
            if self._expect(pattern, min(deadline, time.monotonic() + 5)) is not None:
                self.run("true")  # drains answers to earlier, buffered attempts
                return
        raise self.failure(f"no root shell on {SHELL_TTY} within {timeout:.0f} s")

    def _start(self, command: str) -> re.Pattern[str]:
        """Send `command` framed by markers; the pattern of its framed output and status."""
        self._serial += 1
        serial = self._serial
        self._send(
            f"printf 'OTAD-BEGIN-%s\\n' {serial}; {{ {command}\n}} </dev/null 2>&1; "
            f"printf 'OTAD-END-%s-%s\\n' {serial} $?\n"
        )
        return re.compile(rf"OTAD-BEGIN-{serial}\n(.*?)OTAD-END-{serial}-(\d+)\n", re.DOTALL)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> Result:
        """Run `command` in the guest's shell; its exit status and output (stderr included)."""
        pattern = self._start(command)
        match = self._expect(pattern, time.monotonic() + timeout)
        if match is None:
            raise self.failure(f"{command!r} did not finish within {timeout:.0f} s")
        return Result(int(match[2]), match[1])

    def check(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Output of `command`, which must succeed."""
        result = self.run(command, timeout)
        if result.status != 0:
            raise self.failure(f"{command!r} exited with {result.status}:\n{result.output}")
        return result.output

    def run_into_reboot(self, command: str, timeout: float) -> Result | None:
        """Run `command`, which ends by rebooting the guest; its result, or None when the
        reboot ended the shell before the command reported (the console shows the reboot).
        """
        restarts = self._console_restarts()
        pattern = self._start(command)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = self._expect(pattern, min(deadline, time.monotonic() + 2))
            if match is not None:
                return Result(int(match[2]), match[1])
            if self._console_restarts() > restarts:
                return None
        raise self.failure(f"{command!r} neither finished nor rebooted within {timeout:.0f} s")

    def _console_restarts(self) -> int:
        """How often the kernel announced a restart on the console."""
        if not self.console_log.exists():
            return 0
        return self.console_log.read_bytes().count(b"reboot: Restarting system")

    def boot_id(self) -> str:
        return self.check("cat /proc/sys/kernel/random/boot_id").strip()

    def wait_reboot(self, previous_boot: str, timeout: float) -> None:
        """Wait until a shell answers from a boot other than `previous_boot`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.failure(f"the guest did not come back within {timeout:.0f} s")
            try:
                self.wait_shell(left)
                if self.boot_id() != previous_boot:
                    return
            except GuestError:
                # The old shell may die between the handshake and the command.
                if time.monotonic() >= deadline:
                    raise
            time.sleep(2)

    def wait_until(self, command: str, timeout: float, what: str) -> str:
        """Run `command` until it succeeds; its output. `what` names the wait in errors."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(command)
            if result.status == 0:
                return result.output
            if time.monotonic() > deadline:
                raise self.failure(
                    f"{what}: not within {timeout:.0f} s; last {command!r} gave "
                    f"{result.status}:\n{result.output}"
                )
            time.sleep(2)

    def status(self) -> dict[str, object]:
        """`otactl status --json` in the guest."""
        output = self.check("otactl status --json")
        try:
            value = json.loads(output)
        except json.JSONDecodeError as error:
            raise self.failure(
                f"otactl status --json printed no JSON ({error}):\n{output}"
            ) from None
        if not isinstance(value, dict):
            raise self.failure(f"otactl status --json printed {value!r}")
        return value

    def booted_slot_parameter(self) -> str:
        """The otad.slot= value GRUB put on the kernel command line."""
        words = self.check("cat /proc/cmdline").split()
        values = [w.split("=", 1)[1] for w in words if w.startswith("otad.slot=")]
        return values[-1] if values else ""


# -- releases of the scenarios ----------------------------------------------------------


@dataclass(frozen=True)
class ReleaseChanges:
    """What a release changes in slot A's filesystem; paths are absolute in the slot.

    `directories` are made first (parents before children), then `files` (path: content)
    written, `edits` (path: function of the old content) applied and `links` (path:
    target) made as symbolic links.
    """

    files: Mapping[str, bytes] = field(default_factory=dict)
    edits: Mapping[str, Callable[[bytes], bytes]] = field(default_factory=dict)
    directories: Sequence[str] = ()
    links: Mapping[str, str] = field(default_factory=dict)


def make_changed_release(
    converted: Converted, work: Path, version: str, changes: ReleaseChanges
) -> Path:
    """Like make_release, with new directories, edited files and symbolic links too; the
    payload is zstd-compressed (faster to write and to install under TCG than gzip)."""
    filesystem = work / f"{version}.ext4"
    extract_slot_a(converted.image, filesystem)
    files = dict(changes.files)
    for path, edit in changes.edits.items():
        files[path] = edit(read_file(filesystem, path))
    staging = work / f"{version}-files"
    staging.mkdir()
    requests = [f"mkdir {directory}" for directory in changes.directories]
    for index, (path, content) in enumerate(files.items()):
        local = staging / str(index)
        local.write_bytes(content)
        local.chmod(0o755 if content.startswith(b"#!") else 0o644)
        directory, _, name = path.rpartition("/")
        requests += [f"cd {directory or '/'}", f"rm {name}", f"write {local} {name}"]
    for path, target in changes.links.items():
        directory, _, name = path.rpartition("/")
        requests += [f"cd {directory or '/'}", f"rm {name}", f"symlink {name} {target}"]
    debugfs(filesystem, requests)
    _sh("e2fsck", "-fy", filesystem)
    _sh("tune2fs", "-U", "random", filesystem)
    _sh("resize2fs", "-M", filesystem)
    artifact = work / f"{version}.mender"
    artifact_tool("write", "rootfs-image", "-n", version, "-t", DEVICE_TYPE,
                  "--software-version", version, "-f", filesystem, "-o", artifact,
                  "-k", converted.key, "--compression", "zstd")  # fmt: skip
    filesystem.unlink()
    shutil.rmtree(staging)
    return artifact


def read_file(filesystem: Path, path: str) -> bytes:
    """The content of `path` in the ext4 `filesystem`, read with debugfs."""
    result = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(filesystem)], capture_output=True, check=True
    )
    if not result.stdout:
        raise RuntimeError(f"debugfs found no {path} in {filesystem}: {result.stderr!r}")
    return result.stdout


def make_small_artifact(
    work: Path, name: str, *, version: str, device_type: str = DEVICE_TYPE,
    key: Path | None = None, marker: bytes = b"",
) -> Path:  # fmt: skip
    """A rootfs artifact of a small ext4 filesystem holding `marker` in a file, its payload
    uncompressed (so that the marker's bytes appear as they are in the .mender); signed
    with `key` if given."""
    content = work / f"{name}.content"
    content.mkdir()
    (content / "marker").write_bytes(marker or name.encode())
    filesystem = work / f"{name}.ext4"
    _sh("mkfs.ext4", "-q", "-d", content, filesystem, "8M")
    shutil.rmtree(content)
    artifact = work / f"{name}.mender"
    signing = ["-k", str(key)] if key is not None else []
    artifact_tool("write", "rootfs-image", "-n", name, "-t", device_type,
                  "--software-version", version, "-f", filesystem, "-o", artifact,
                  "--compression", "none", *signing)  # fmt: skip
    filesystem.unlink()
    return artifact


def tamper(artifact: Path, marker: bytes, target: Path) -> None:
    """A copy of `artifact` with one bit flipped in the only occurrence of `marker`."""
    data = bytearray(artifact.read_bytes())
    offset = data.find(marker)
    if offset < 0 or data.find(marker, offset + 1) >= 0:
        raise LookupError(f"{artifact} does not hold {marker!r} exactly once")
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))


def make_media_of(artifacts: Sequence[Path], target: Path) -> None:
    """A small ext4 disk holding all of `artifacts` at its top level, to attach as a drive."""
    content = target.with_suffix(".content")
    content.mkdir()
    for artifact in artifacts:
        os.link(artifact, content / artifact.name)
    size = sum(a.stat().st_size for a in artifacts) * 11 // 10 + (16 << 20)
    _sh("mkfs.ext4", "-q", "-L", "otad-media", "-d", content, target, f"{size // 1024}k")
    shutil.rmtree(content)
