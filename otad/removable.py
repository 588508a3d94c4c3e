"""Updates from removable media: notice a USB stick or SD card, find its artifact, use it.

Detection. A medium is a block device of the kernel's "block" class (a whole disk) that
the detection predicate accepts; by default `is_removable()`: udev says ID_BUS=usb, or
sysfs says the disk is removable, or a USB device is among its ancestors in sysfs. Where
udev runs (/run/udev/control exists) the watcher listens to udev's events; where it does
not (containers, minimal images) it listens to the kernel's own uevents on netlink. Both
carry the same DEVPATH and DISKSEQ, and the decisions are made from sysfs, so both paths
behave the same. A disk is considered once per medium (per DISKSEQ): on `add`, or on a
`change` that gives it a size (a card pushed into a reader). A disk with a mounted
partition or a holder (dm, md) is never a medium: that is how the SD card the system
runs from is kept out, even where its slot reports removable=1. Only insertion starts
anything: a medium left in the device across a reboot is not used again.

Where the artifact is looked for. The volumes of a medium are the whole disk when it
holds a filesystem itself (a "superfloppy", as many sticks are formatted), else its
partitions in partition-number order. otad mounts the first volume
whose filesystem it accepts (vfat, exfat, ext2/3/4, iso9660, udf: `FILESYSTEMS`) and
mounts successfully, and looks only at the top-level directory of that volume. An
artifact is an entry whose name ends in `.mender` (any case) and does not start with a
dot (macOS leaves `._name` companions on FAT sticks). Exactly one such entry must exist:
none is reported as "no artifact", two or more as "ambiguous", naming them all. otad
does not pick the newest by version: that would mean verifying every file and ordering
artifacts of different names and payload types, and a forgotten older file must never
be installed by surprise. The entry must be a regular file on that filesystem: it is
opened with O_NOFOLLOW relative to the mount root, so a symbolic link, a directory or a
FIFO named `*.mender` is refused, and nothing outside the medium is ever read.

Mounting. Volumes are mounted with mount(8) read-only, nosuid, nodev, noexec and
nosymfollow (plus noload for ext3/ext4, so a journal is never replayed onto the stick),
into /run/otad/media/<volume>, a directory of mode 0700 in a 0700 parent. Nothing on the
medium is ever executed. Every path out unmounts and removes the directory; when a busy
mount refuses, a lazy unmount detaches it. A medium that fails or is pulled while it is
read ends in MediumGone, and nothing is activated.

Use. The artifact is verified end to end first (a signature by a trusted key is
required), so a bad file never reaches the engine. Then, as configured, the file is
rewound and handed to `install` (the daemon passes Engine.install, which verifies again
as it writes: a device that serves different bytes the second time gains nothing), or
announced with `announce(MediumArtifact)` so that a program can ask for confirmation and
call `RemovableUpdates.install_offered()`, which mounts the same medium again, checks it
holds the very artifact announced and installs it.

The settings are otad.conf's [removable] table (otad.config.RemovableConfig):

    [removable]
    enabled = false          # watch for media at all
    action = "announce"      # "install": install at once; "announce": wait for confirmation

otad.media runs this inside the daemon.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pyudev

from otad.artifact.reader import ArtifactHeader, VerifyPolicy, verify_artifact
from otad.artifact.signing import Verifier
from otad.artifact.streams import Readable
from otad.config import Action, RemovableConfig
from otad.devices import SystemPaths, mounted_device_numbers, probe
from otad.errors import (
    ArtifactError,
    CommandFailed,
    DeviceError,
    OtadError,
    UsageError,
)
from otad.process import run

log = logging.getLogger(__name__)

MEDIA_DIR = Path("/run/otad/media")
UDEV_CONTROL = Path("/run/udev/control")
ARTIFACT_SUFFIX = ".mender"
MOUNT_TIMEOUT = 60.0  # seconds; a slow card reader may take a while to answer
BASE_OPTIONS = ("ro", "nosuid", "nodev", "noexec", "nosymfollow")
# Filesystems otad mounts from a medium, with the options each needs beyond BASE_OPTIONS.
# Each one is kernel code parsing data from a stranger; keep the list short.
FILESYSTEMS: Mapping[str, tuple[str, ...]] = {
    "vfat": (),
    "exfat": (),
    "ext2": (),
    "ext3": ("noload",),
    "ext4": ("noload",),
    "iso9660": (),
    "udf": (),
}
_KERNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# -- errors ---------------------------------------------------------------------------
# Beside the code that raises them; callers map them through DeviceError.


class MediumError(DeviceError):
    """A medium cannot be used as a source of updates; `medium` names its disk."""

    def __init__(self, medium: str, problem: str) -> None:
        super().__init__(f"medium {medium}: {problem}")
        self.medium = medium
        self.problem = problem


class NoArtifact(MediumError):
    """The medium holds no mountable filesystem, or no artifact at its top level."""


class AmbiguousArtifacts(MediumError):
    """The medium holds more than one artifact; `names` lists them."""

    def __init__(self, medium: str, volume: str, names: tuple[str, ...]) -> None:
        listed = ", ".join(names)
        super().__init__(
            medium, f"{volume} holds {len(names)} artifacts ({listed}); expected exactly one"
        )
        self.names = names


class UnsafeEntry(MediumError):
    """The artifact's entry is not a regular file on the medium (a link, a directory...)."""


class MediumGone(MediumError):
    """The medium was removed, replaced or failed while otad was using it."""


class ArtifactChanged(ArtifactError):
    """The medium no longer holds the artifact that was announced and confirmed."""


# -- detection ------------------------------------------------------------------------


@dataclass(frozen=True)
class Medium:
    """A disk that appeared: its kernel name, sysfs directory, device node and DISKSEQ."""

    name: str
    sys_dir: Path
    node: Path
    diskseq: str  # "" on kernels that do not number disks (before 5.15)


MediumPredicate = Callable[[Path, Mapping[str, str]], bool]


def _read_attribute(directory: Path, name: str) -> str:
    try:
        return (directory / name).read_text().strip()
    except OSError:
        return ""


def _has_usb_ancestor(sys_dir: Path) -> bool:
    for directory in sys_dir.parents:
        link = directory / "subsystem"
        if link.is_symlink() and Path(os.readlink(link)).name == "usb":
            return True
    return False


def is_removable(disk_dir: Path, properties: Mapping[str, str]) -> bool:
    """Whether the disk at `disk_dir` (its sysfs directory) is removable storage.

    True when udev found it on USB, when the kernel calls it removable (card readers,
    optical drives, many sticks) or when it hangs below a USB device (USB disks, which
    often report removable=0).
    """
    if properties.get("ID_BUS") == "usb":
        return True
    if _read_attribute(disk_dir, "removable") == "1":
        return True
    return _has_usb_ancestor(disk_dir)


def is_loop_backed_under(directory: Path) -> MediumPredicate:
    """A predicate for tests: loop devices whose backing file lies below `directory`.

    Loop devices are never removable in sysfs; this lets a test's own images stand in
    for sticks without accepting any other disk on the machine.
    """

    def accepts(disk_dir: Path, properties: Mapping[str, str]) -> bool:
        backing = _read_attribute(disk_dir, "loop/backing_file")
        return bool(backing) and directory in Path(backing).parents

    return accepts


def _read_uevent(directory: Path) -> dict[str, str]:
    fields = {}
    for line in _read_attribute(directory, "uevent").splitlines():
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


def _device_number(directory: Path) -> int | None:
    major, _, minor = _read_attribute(directory, "dev").partition(":")
    return os.makedev(int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def _partitions(disk_dir: Path) -> list[Path]:
    """The partitions' sysfs directories, in partition-number order."""
    found = [
        (int(number), entry)
        for entry in disk_dir.iterdir()
        if (number := _read_attribute(entry, "partition")).isdigit()
    ]
    return [entry for _, entry in sorted(found)]


def _is_in_use(disk_dir: Path, paths: SystemPaths) -> bool:
    mounted = mounted_device_numbers(paths)
    for directory in (disk_dir, *_partitions(disk_dir)):
        if _device_number(directory) in mounted:
            return True
        holders = directory / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            return True
    return False


def _node(directory: Path, paths: SystemPaths) -> Path:
    return paths.dev / _read_uevent(directory).get("DEVNAME", directory.name)


class MediumTracker:
    """Turns block-device events into media, each medium once.

    Pure decisions over sysfs, so that tests can feed it events and a prepared tree.
    """

    def __init__(
        self, predicate: MediumPredicate = is_removable, paths: SystemPaths | None = None
    ) -> None:
        self._predicate = predicate
        self._paths = paths or SystemPaths()
        self._seen: dict[str, str] = {}  # disk name -> DISKSEQ it was considered at

    def consider(self, action: str, properties: Mapping[str, str]) -> Medium | None:
        """The medium this event announces, or None (not a disk, not new, not removable)."""
        disk_dir = self._disk_of(properties)
        if disk_dir is None:
            return None
        name = disk_dir.name
        gone = action == "remove" and properties.get("DEVTYPE") != "partition"
        if gone or _read_attribute(disk_dir, "size") in ("", "0"):
            self._seen.pop(name, None)  # no medium in the drive (any more)
            return None
        diskseq = properties.get("DISKSEQ", "")
        if action not in ("add", "change") or self._seen.get(name) == diskseq:
            return None
        if not self._predicate(disk_dir, properties):
            return None
        self._seen[name] = diskseq
        if _is_in_use(disk_dir, self._paths):
            log.debug("%s is removable but in use (mounted or held); not a medium", name)
            return None
        log.debug("%s appeared (%s, DISKSEQ %s)", name, action, diskseq or "unknown")
        return Medium(name, disk_dir, _node(disk_dir, self._paths), diskseq)

    def _disk_of(self, properties: Mapping[str, str]) -> Path | None:
        """The sysfs directory of the disk a block event is about."""
        devpath = properties.get("DEVPATH", "")
        if properties.get("SUBSYSTEM", "block") != "block" or not devpath:
            return None
        sys_dir = self._paths.sys / devpath.lstrip("/")
        return sys_dir.parent if properties.get("DEVTYPE") == "partition" else sys_dir


def default_source(control: Path = UDEV_CONTROL) -> str:
    """'udev' where udev runs, else 'kernel' (raw uevents)."""
    return "udev" if control.exists() else "kernel"


class MediumWatcher:
    """Listens for block devices on netlink and yields the media among them.

    Events queue in the socket from construction on, so a caller may create the watcher,
    then cause or wait for an insertion, then call `next_medium()`.
    """

    def __init__(
        self,
        predicate: MediumPredicate = is_removable,
        *,
        source: str | None = None,
        paths: SystemPaths | None = None,
    ) -> None:
        self.source = source or default_source()
        self._tracker = MediumTracker(predicate, paths)
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
        self._monitor.filter_by("block")
        self._monitor.start()
        log.debug("watching %s events for removable media", self.source)

    def fileno(self) -> int:
        """The socket, for a caller's own event loop."""
        return int(self._monitor.fileno())

    def next_medium(self, timeout: float) -> Medium | None:
        """The next medium to appear within `timeout` seconds, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            # poll() also returns None for an event the socket filter dropped.
            device = self._monitor.poll(timeout=left)
            if device is None:
                continue
            properties = {str(key): str(value) for key, value in device.properties.items()}
            medium = self._tracker.consider(str(device.action), properties)
            if medium is not None:
                return medium
        return None

    def close(self) -> None:
        # pyudev has no close: dropping the monitor frees the socket.
        del self._monitor

    def __enter__(self) -> MediumWatcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# -- mounting -------------------------------------------------------------------------


def _private_directory(path: Path) -> None:
    """Create `path` with mode 0700 in a 0700 parent; refuse links and foreign owners."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path.parent)
    path.mkdir(mode=0o700)
    _check_private(path)


def _check_private(directory: Path) -> None:
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise DeviceError(f"{directory} is not a directory owned by otad; not mounting there")
    os.chmod(directory, 0o700)


def _clear_stale(target: Path) -> None:
    """Remove what a crashed run left at `target`: a mount, then the directory."""
    if not target.exists():
        return
    if os.path.ismount(target):
        log.warning("%s is still mounted from an earlier run; unmounting it", target)
        run(["umount", "--lazy", target], check=False)
    try:
        target.rmdir()
    except OSError as error:
        raise DeviceError(f"cannot remove the leftover mount directory {target}: {error}") from None


def unmount(target: Path) -> None:
    """Unmount `target` and remove it; lazily when busy. Logs and never raises."""
    try:
        run(["umount", target], timeout=MOUNT_TIMEOUT)
    except CommandFailed as error:
        log.warning(
            "%s: %s; detaching it lazily, it goes once the last user closes it", target, error
        )
        run(["umount", "--lazy", target], check=False, timeout=MOUNT_TIMEOUT)
    try:
        target.rmdir()
    except OSError as error:
        log.warning("cannot remove %s (%s); it stays until the next start", target, error)


@contextlib.contextmanager
def mounted_readonly(node: Path, fstype: str, target: Path) -> Iterator[Path]:
    """Mount `node` read-only, nosuid, nodev, noexec, nosymfollow at a new `target`."""
    _clear_stale(target)
    _private_directory(target)
    options = ",".join((*BASE_OPTIONS, *FILESYSTEMS[fstype]))
    try:
        run(["mount", "-t", fstype, "-o", options, node, target], timeout=MOUNT_TIMEOUT)
    except BaseException:
        target.rmdir()
        raise
    try:
        if os.stat(target).st_dev != os.stat(node).st_rdev:
            raise DeviceError(f"{target} does not show {node} after mounting it")
        yield target
    finally:
        unmount(target)


# -- reading the artifact -------------------------------------------------------------


class MediumFile:
    """The artifact, open on the medium; read errors become MediumGone."""

    def __init__(self, fd: int, medium: str, where: str) -> None:
        self._fd = fd
        self._medium = medium
        self.where = where

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            return os.readv(self._fd, [buffer])
        except OSError as error:
            raise MediumGone(
                self._medium, f"cannot read {self.where} ({error.strerror}): removed or failing"
            ) from error

    def rewind(self) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)

    def fileno(self) -> int:
        return self._fd

    def size(self) -> int:
        return os.fstat(self._fd).st_size


def is_artifact_name(name: str) -> bool:
    return name.lower().endswith(ARTIFACT_SUFFIX) and not name.startswith(".")


def find_artifact(root_fd: int, medium: str, volume: str) -> str:
    """The name of the one artifact at the top of the mounted volume."""
    with os.scandir(root_fd) as entries:
        names = tuple(sorted(entry.name for entry in entries if is_artifact_name(entry.name)))
    if not names:
        raise NoArtifact(medium, f"no *{ARTIFACT_SUFFIX} file at the top of {volume}")
    if len(names) > 1:
        raise AmbiguousArtifacts(medium, volume, names)
    return names[0]


@contextlib.contextmanager
def open_artifact(root_fd: int, name: str, medium: str, volume: str) -> Iterator[MediumFile]:
    """Open `name` in the directory `root_fd`, refusing anything but a regular file there."""
    where = f"{name} on {volume}"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=root_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeEntry(
                medium, f"{where} is a symbolic link; links are not followed"
            ) from None
        raise MediumGone(medium, f"cannot open {where}: {error.strerror}") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeEntry(medium, f"{where} is not a regular file")
        if info.st_dev != os.fstat(root_fd).st_dev:
            raise UnsafeEntry(medium, f"{where} is not on the medium's filesystem")
        yield MediumFile(fd, medium, where)
    finally:
        os.close(fd)


# -- using a medium -------------------------------------------------------------------


@dataclass(frozen=True)
class MediumArtifact:
    """A verified artifact found on a medium: what an announcement tells."""

    medium: Medium
    volume: str
    file: str
    size: int
    artifact: str
    version: str | None
    device_types: tuple[str, ...]
    manifest_sha256: str
    payload_type: str = ""  # "" for a bootstrap artifact


class Status(enum.Enum):
    INSTALLED = "installed"
    ANNOUNCED = "announced"
    NO_ARTIFACT = "no-artifact"
    AMBIGUOUS = "ambiguous"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of a medium, for the log and for the D-Bus service."""

    medium: str
    status: Status
    message: str
    artifact: MediumArtifact | None = None
    error: OtadError | None = None  # why nothing was installed or announced


def _status_of(error: OtadError) -> Status:
    if isinstance(error, NoArtifact):
        return Status.NO_ARTIFACT
    if isinstance(error, AmbiguousArtifacts):
        return Status.AMBIGUOUS
    if isinstance(error, ArtifactError | UnsafeEntry):
        return Status.REFUSED
    return Status.FAILED


Install = Callable[[Readable], object]
Announce = Callable[[MediumArtifact], None]


def _manifest_digest(header: ArtifactHeader) -> str:
    return hashlib.sha256(header.manifest.serialize()).hexdigest()


def is_present(medium: Medium) -> bool:
    """Whether the disk still holds the medium that appeared (same DISKSEQ, not empty)."""
    size = _read_attribute(medium.sys_dir, "size")
    return (
        size not in ("", "0") and _read_uevent(medium.sys_dir).get("DISKSEQ", "") == medium.diskseq
    )


class RemovableUpdates:
    """Uses each medium as configured: verify its artifact, then install or announce it."""

    def __init__(
        self,
        config: RemovableConfig,
        keys: tuple[Verifier, ...],
        *,
        install: Install,
        announce: Announce | None = None,
        media_dir: Path = MEDIA_DIR,
        paths: SystemPaths | None = None,
    ) -> None:
        if not keys:
            raise UsageError("updates from removable media need at least one trusted key")
        if config.action is Action.ANNOUNCE and announce is None:
            raise UsageError("removable.action is 'announce' but nothing receives announcements")
        self.config = config
        self._policy = VerifyPolicy(keys, require_signature=True)
        self._install = install
        self._announce = announce
        self._media_dir = media_dir
        self._paths = paths or SystemPaths()

    def handle(self, medium: Medium) -> Outcome:
        """Verify the medium's artifact, then install or announce it; never raises OtadError."""
        try:
            with self._verified(medium, None, None) as (found, stream):
                if self.config.action is Action.INSTALL:
                    self._install_from(found, stream)
                    return self._done(found, Status.INSTALLED, "installed")
            assert self._announce is not None
            self._announce(found)
            return self._done(found, Status.ANNOUNCED, "announced")
        except OtadError as error:
            return self._failed(medium.name, error)

    def install_offered(self, offer: MediumArtifact) -> Outcome:
        """Install an announced artifact once confirmed, if the medium still holds it."""
        try:
            self._check_still_present(offer.medium)
            with self._verified(offer.medium, offer.volume, offer.file) as (found, stream):
                if found.manifest_sha256 != offer.manifest_sha256:
                    raise ArtifactChanged(
                        f"{offer.file} on {offer.volume} is no longer the artifact "
                        f"{offer.artifact} that was announced"
                    )
                self._install_from(found, stream)
                return self._done(found, Status.INSTALLED, "installed")
        except OtadError as error:
            return self._failed(offer.medium.name, error)

    def serve(
        self,
        watcher: MediumWatcher,
        stop: threading.Event,
        report: Callable[[Outcome], None] | None = None,
        interval: float = 1.0,
    ) -> None:
        """Handle media as they appear until `stop` is set (checked every `interval` s)."""
        if not self.config.enabled:
            log.debug("updates from removable media are disabled")
            return
        while not stop.is_set():
            medium = watcher.next_medium(interval)
            if medium is None:
                continue
            outcome = self.handle(medium)
            if report is not None:
                report(outcome)

    def _install_from(self, found: MediumArtifact, stream: MediumFile) -> None:
        log.info("installing %s from %s", found.artifact, stream.where)
        stream.rewind()
        self._install(stream)

    @staticmethod
    def _done(found: MediumArtifact, status: Status, verb: str) -> Outcome:
        message = f"{verb} {found.artifact} from {found.file} on {found.volume}"
        log.info("medium %s: %s", found.medium.name, message)
        return Outcome(found.medium.name, status, message, found)

    @staticmethod
    def _failed(medium: str, error: OtadError) -> Outcome:
        status = _status_of(error)
        log.warning("%s; nothing from this medium was installed", error)
        return Outcome(medium, status, str(error), error=error)

    def _check_still_present(self, medium: Medium) -> None:
        if not is_present(medium):
            raise MediumGone(medium.name, "was removed or replaced since it was announced")

    @contextlib.contextmanager
    def _verified(
        self, medium: Medium, volume: str | None, file: str | None
    ) -> Iterator[tuple[MediumArtifact, MediumFile]]:
        with ExitStack() as stack:
            volume_name, mount_dir = self._mount_first(medium, volume, stack)
            root_fd = os.open(mount_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            stack.callback(os.close, root_fd)
            name = file or find_artifact(root_fd, medium.name, volume_name)
            stream = stack.enter_context(open_artifact(root_fd, name, medium.name, volume_name))
            log.info("medium %s: verifying %s (%d bytes)", medium.name, stream.where, stream.size())
            header, _ = verify_artifact(stream, self._policy)
            first = header.payloads[0] if header.payloads else None
            found = MediumArtifact(
                medium,
                volume_name,
                name,
                stream.size(),
                header.name,
                first.software_version if first else None,
                header.compatible_devices,
                _manifest_digest(header),
                (first.type or "") if first else "",
            )
            yield found, stream

    def _volumes(self, medium: Medium) -> list[Path]:
        # Probing opens the disk, which makes the kernel rescan it after a media change.
        # A filesystem on the whole disk wins over partitions the kernel still lists
        # (loop devices keep partitions added by partx after they are detached).
        disk = probe(medium.node)
        if disk.get("TYPE") and not disk.get("PTTYPE"):
            return [medium.sys_dir]
        return _partitions(medium.sys_dir) or [medium.sys_dir]

    def _mount_first(
        self, medium: Medium, wanted: str | None, stack: ExitStack
    ) -> tuple[str, Path]:
        skipped = []
        for directory in self._volumes(medium):
            name = directory.name
            if wanted is not None and name != wanted:
                continue
            if not _KERNEL_NAME.fullmatch(name):
                skipped.append(f"{name} (unusable name)")
                continue
            node = _node(directory, self._paths)
            fstype = probe(node).get("TYPE", "")
            if fstype not in FILESYSTEMS:
                skipped.append(f"{name} ({fstype or 'no filesystem'})")
                continue
            try:
                target = stack.enter_context(mounted_readonly(node, fstype, self._media_dir / name))
            except CommandFailed as error:
                # mount(8) puts the reason first and a hint to read dmesg last.
                reason = error.stderr.splitlines()[0] if error.stderr else str(error)
                skipped.append(f"{name} ({fstype}, not mountable: {reason})")
                continue
            log.info(
                "medium %s: mounted %s (%s) read-only at %s", medium.name, name, fstype, target
            )
            return name, target
        if wanted is not None and not skipped:
            raise MediumGone(medium.name, f"no longer has the volume {wanted}")
        accepted = ", ".join(FILESYSTEMS)
        raise NoArtifact(
            medium.name,
            f"no volume otad can mount (found: {'; '.join(skipped) or 'none'}; "
            f"otad mounts {accepted})",
        )
