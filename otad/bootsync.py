"""Filling a slot's own FAT boot partition from the boot files inside its root filesystem.

On a Raspberry Pi each slot boots from its own FAT partition, but an artifact carries one
ext4 image: the boot files travel in its /boot/firmware. After the engine has written and
verified the image into the target slot, `sync_boot_partition()` copies that directory
into the slot's boot partition. Nothing is mounted: debugfs reads the ext4 image (read
only), mkfs.vfat formats the partition and mtools writes and reads it back. Everything
that can be checked (the source, the names, the space) is checked before formatting, so
that most failures leave the old boot partition as it was.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import math
import os
import posixpath
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from otad.devices import SystemPaths, check_unused, probe
from otad.errors import BootSyncError, DeviceError, OtadError, UsageError
from otad.process import require_tools, run

log = logging.getLogger(__name__)

TOOLS = ("debugfs", "mkfs.vfat", "mcopy", "mdir", "minfo", "blkid")

# mtools: no geometry sanity check (partitions and images have none to offer), long
# names on, and no personal ~/.mtoolsrc changing how names are written.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0", "MTOOLSRC": "/dev/null"}

BLKSSZGET = 0x1268
BLKFLSBUF = 0x1261
MAX_LINK_HOPS = 40
DIR_ENTRY = 32
# Printable ASCII that FAT cannot hold in a long name, and in a volume label.
FORBIDDEN_IN_NAME = set('"*/:<>?\\|')
FORBIDDEN_IN_LABEL = set('"*+,./:;<=>?[\\]|')
ROOT_WORD = re.compile(rb"(?<!\S)root=\S*")


@dataclass(frozen=True)
class SyncReport:
    """What a sync wrote: counts and bytes of the files, and the space it planned with."""

    files: int
    directories: int
    bytes: int
    needed: int  # bytes of whole clusters the tree takes, counted before formatting
    capacity: int  # free bytes of the freshly formatted partition
    cmdline_root: str | None  # the root= value written into cmdline.txt, if rewritten


@dataclass(frozen=True)
class Tree:
    """The boot files to copy: sizes and SHA-256 by relative path, and every directory."""

    files: dict[str, tuple[int, str]]
    directories: dict[str, list[str]]  # relative path ("" is the top) -> child names

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


@dataclass(frozen=True)
class Geometry:
    cluster: int  # bytes
    free: int  # bytes free on an empty filesystem
    root_slots: int  # entries of a fixed root directory (FAT12/16); 0 on FAT32


def sync_boot_partition(
    rootfs: Path,
    boot: Path,
    *,
    source_dir: str = "/boot/firmware",
    label: str | None = None,
    cmdline_root: str | None = None,
    paths: SystemPaths | None = None,
) -> SyncReport:
    """Replace the content of the FAT partition `boot` by `source_dir` of the ext4 `rootfs`.

    `label` names the new filesystem; without it the partition keeps its current label.
    Its volume ID is kept either way, so that fstab entries by UUID stay valid. With
    `cmdline_root` (such as "PARTUUID=5b1c9e63-03"), every root= word of cmdline.txt is
    set to it. Raises BootSyncError; its `changed` says whether `boot` was formatted.
    """
    source = _check_request(rootfs, boot, source_dir, label, cmdline_root)
    require_tools(*TOOLS)
    if stat.S_ISBLK(os.stat(boot).st_mode):
        check_unused(boot, paths)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="otad-boot-") as name:
        work = Path(name)
        top = _extract(rootfs, source, boot, work)
        if cmdline_root is not None:
            _rewrite_root(top / "cmdline.txt", cmdline_root, boot)
        tree = _inventory(top, boot)
        identity = _identity(boot, label)
        geometry = _plan_geometry(boot, identity, work)
        needed = _needed_bytes(tree, geometry, boot)

        _format(boot, identity)
        try:
            _copy_in(top, boot)
            _flush(boot)
            _verify(tree, boot, work)
        except BootSyncError:
            raise
        except (OtadError, OSError) as error:
            raise BootSyncError(str(boot), str(error), changed=True) from error

    report = SyncReport(
        len(tree.files), len(tree.directories) - 1, tree.size, needed, geometry.free, cmdline_root
    )
    log.info(
        "boot partition %s: %d files, %d bytes from %s in %.1f s",
        boot, report.files, report.bytes, source, time.monotonic() - started,
    )  # fmt: skip
    return report


# -- checking the request -----------------------------------------------------------


def _check_request(
    rootfs: Path, boot: Path, source_dir: str, label: str | None, cmdline_root: str | None
) -> str:
    """The normalized source directory; UsageError for what cannot be done as asked."""
    source = posixpath.normpath(source_dir)
    if not source.startswith("/") or source in ("/", "//"):
        raise UsageError(f"source_dir must be an absolute directory below /, not {source_dir!r}")
    if label is not None and not _is_fat_label(label):
        raise UsageError(
            f"{label!r} is not a FAT label: 1 to 11 printable ASCII characters, none of "
            f"{''.join(sorted(FORBIDDEN_IN_LABEL))}"
        )
    if cmdline_root is not None and (
        not cmdline_root.isascii()
        or not cmdline_root.isprintable()
        or not cmdline_root
        or any(c.isspace() for c in cmdline_root)
        or cmdline_root.startswith("root=")
    ):
        raise UsageError(
            f"cmdline_root must be the value of root= (e.g. PARTUUID=...), not {cmdline_root!r}"
        )
    for path in (rootfs, boot):
        if not path.exists():
            raise DeviceError(f"{path} does not exist")
    if os.stat(rootfs).st_rdev == os.stat(boot).st_rdev != 0 or rootfs.resolve() == boot.resolve():
        raise UsageError(f"{boot} is the root filesystem {rootfs} itself")
    return source


def _is_fat_label(label: str) -> bool:
    return (
        0 < len(label) <= 11
        and label.isascii()
        and label.isprintable()
        and not set(label) & FORBIDDEN_IN_LABEL
    )


# -- reading the root filesystem (debugfs, read only) -------------------------------


def _debugfs(rootfs: Path, boot: Path, *words: str) -> None:
    """Run one debugfs request on `rootfs`, opened read only; its words are quoted."""
    for word in words:
        if '"' in word or "\n" in word:
            raise BootSyncError(
                str(boot), f"cannot ask debugfs for {word!r}: it has a quote or a newline",
                changed=False,
            )  # fmt: skip
    request = " ".join(f'"{word}"' for word in words)
    result = run(["debugfs", "-R", request, rootfs])
    # debugfs exits 0 whatever happens; an image it cannot open shows only on stderr.
    stderr = result.stderr.decode("utf-8", "replace")
    if "while trying to open" in stderr or "Filesystem not open" in stderr:
        lines = [line for line in stderr.splitlines() if "while trying to open" in line]
        reason = (lines or stderr.strip().splitlines())[0].removeprefix("debugfs: ")
        raise BootSyncError(
            str(boot), f"cannot read {rootfs} as an ext2/3/4 filesystem: {reason}", changed=False
        )


def _extract(rootfs: Path, source: str, boot: Path, work: Path) -> Path:
    """Dump `source` of `rootfs` into `work`, links replaced by what they point to."""
    (work / "extract").mkdir()
    _debugfs(rootfs, boot, "rdump", source, str(work / "extract"))
    top = work / "extract" / posixpath.basename(source)
    kind = _kind(top)
    if kind != "directory":
        found = {None: "no such directory", "link": "a symbolic link"}.get(kind, f"a {kind}")
        raise BootSyncError(
            str(boot), f"{source} in {rootfs} is {found}; expected the boot files' directory",
            changed=False,
        )  # fmt: skip

    hops = itertools.count()
    files = 0
    for directory, dirnames, filenames in os.walk(top):
        os.chmod(directory, 0o755)
        for name in dirnames + filenames:
            local = Path(directory, name)
            if _kind(local) == "link":
                inside = posixpath.join(source, local.relative_to(top).as_posix())
                content = _follow_link(rootfs, boot, inside, local, work, hops)
                local.unlink()
                os.replace(content, local)
                dirnames[:] = [d for d in dirnames if d != name]
            if _kind(local) == "file":
                os.chmod(local, 0o644)
                files += 1
    if not files:
        raise BootSyncError(
            str(boot), f"{source} in {rootfs} holds no files: nothing would boot", changed=False
        )
    return top


def _follow_link(
    rootfs: Path, boot: Path, link: str, local: Path, work: Path, hops: Iterator[int]
) -> Path:
    """Dump the regular file that `link` (a path in `rootfs`) finally points to."""
    path, target = link, os.readlink(local)
    for _ in range(MAX_LINK_HOPS):
        # TODO: resolve ".." after a linked directory as the kernel does (normpath drops
        # both lexically) when an image needs such a link among its boot files.
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        hop = work / f"link-{next(hops)}"
        hop.mkdir()
        _debugfs(rootfs, boot, "rdump", path, str(hop))
        found = hop / posixpath.basename(path)
        kind = _kind(found)
        if kind == "file":
            return found
        if kind != "link":
            what = "nothing" if kind is None else f"a {kind}"
            raise BootSyncError(
                str(boot),
                f"{link} in {rootfs} is a symbolic link to {path}, which is {what}; "
                "FAT has no links, so only links to regular files can be copied",
                changed=False,
            )
        target = os.readlink(found)
    raise BootSyncError(
        str(boot), f"{link} in {rootfs}: more than {MAX_LINK_HOPS} symbolic links", changed=False
    )


def _kind(path: Path) -> str | None:
    """What `path` is, never following a link (those point into the host, not the image)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "special file"


def _rewrite_root(cmdline: Path, value: str, boot: Path) -> None:
    """Point every root= word of `cmdline` at `value`; add one if there is none."""
    if _kind(cmdline) != "file":
        raise BootSyncError(
            str(boot), f"no cmdline.txt among the boot files to set root={value} in",
            changed=False,
        )  # fmt: skip
    text = cmdline.read_bytes()
    word = b"root=" + value.encode("ascii")
    if ROOT_WORD.search(text):
        text = ROOT_WORD.sub(lambda _: word, text)
    else:
        text = text.rstrip(b"\r\n") + b" " + word + b"\n"
    cmdline.write_bytes(text)
    log.debug("cmdline.txt now reads %r", text)


# -- what the tree needs on FAT ------------------------------------------------------


def _inventory(top: Path, boot: Path) -> Tree:
    """Hash every file under `top`; refuse names FAT cannot hold."""
    files: dict[str, tuple[int, str]] = {}
    directories: dict[str, list[str]] = {}
    for directory, dirnames, filenames in os.walk(top):
        relative = Path(directory).relative_to(top).as_posix()
        relative = "" if relative == "." else relative
        children = sorted(dirnames + filenames)
        directories[relative] = children
        _check_names(relative, children, boot)
        for name in filenames:
            path = Path(directory, name)
            shown = posixpath.join(relative, name)
            if _kind(path) != "file":  # debugfs dumps no devices; links are resolved
                raise BootSyncError(
                    str(boot), f"{shown} is a {_kind(path)}, FAT cannot hold it", changed=False
                )
            files[shown] = (path.stat().st_size, _sha256(path))
    return Tree(files, directories)


def _check_names(directory: str, names: list[str], boot: Path) -> None:
    seen: dict[str, str] = {}
    for name in names:
        shown = posixpath.join(directory, name)
        if (
            not name.isascii()
            or not name.isprintable()
            or set(name) & FORBIDDEN_IN_NAME
            or name.endswith((".", " "))
            or len(name) > 255
        ):
            raise BootSyncError(
                str(boot), f"the name {shown!r} cannot be stored on FAT as it is", changed=False
            )
        other = posixpath.join(directory, seen.setdefault(name.lower(), name))
        if other != shown:
            raise BootSyncError(
                str(boot),
                f"{other!r} and {shown!r} differ only in case, which FAT does not tell apart",
                changed=False,
            )


def _needed_bytes(tree: Tree, geometry: Geometry, boot: Path) -> int:
    """Bytes of whole clusters the tree takes; BootSyncError if it does not fit."""
    cluster = geometry.cluster
    clusters = sum(math.ceil(size / cluster) for size, _ in tree.files.values())
    for relative, children in tree.directories.items():
        # Counted as if every name needed long-name entries; the top also holds the label.
        entries = sum(1 + math.ceil(len(name) / 13) for name in children)
        if relative:
            clusters += max(1, math.ceil((entries + 2) * DIR_ENTRY / cluster))
        elif geometry.root_slots:
            if entries + 1 > geometry.root_slots:
                raise BootSyncError(
                    str(boot),
                    f"the top directory needs {entries + 1} entries, "
                    f"this FAT's fixed root directory holds {geometry.root_slots}",
                    changed=False,
                )
        else:
            clusters += max(0, math.ceil((entries + 1) * DIR_ENTRY / cluster) - 1)
    needed = clusters * cluster
    if needed > geometry.free:
        raise BootSyncError(
            str(boot),
            f"the boot files ({len(tree.files)} files, {tree.size} bytes) need {needed} bytes "
            f"in clusters of {cluster}, the formatted partition would have {geometry.free}",
            changed=False,
        )
    return needed


# -- the FAT partition (dosfstools, mtools) ------------------------------------------


@dataclass(frozen=True)
class Identity:
    """How mkfs.vfat is to format: label, volume ID and logical sector size."""

    label: str | None
    volume_id: str | None
    sector_size: int

    def mkfs_argv(self, target: Path) -> list[str | Path]:
        argv: list[str | Path] = ["mkfs.vfat", "-S", str(self.sector_size)]
        if self.label is not None:
            argv += ["-n", self.label]
        if self.volume_id is not None:
            argv += ["-i", self.volume_id]
        return [*argv, target]


def _identity(boot: Path, label: str | None) -> Identity:
    """The label asked for (else the current one) and the current volume ID, if FAT."""
    fields = probe(boot)
    is_fat = fields.get("TYPE") == "vfat"
    if label is None and is_fat and _is_fat_label(fields.get("LABEL", "")):
        label = fields["LABEL"]
    volume_id = fields.get("UUID", "").replace("-", "") if is_fat else ""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", volume_id):
        volume_id = ""
    sector_size = 512
    if stat.S_ISBLK(os.stat(boot).st_mode):
        with _opened(boot) as descriptor:
            buffer = fcntl.ioctl(descriptor, BLKSSZGET, b"\0" * 4)
            sector_size = int.from_bytes(buffer, "little")
    return Identity(label, volume_id or None, sector_size)


def _plan_geometry(boot: Path, identity: Identity, work: Path) -> Geometry:
    """Format a sparse stand-in of `boot`'s size in `work` and read its geometry."""
    with _opened(boot) as descriptor:
        size = os.lseek(descriptor, 0, os.SEEK_END)
    stand_in = work / "geometry.img"
    with stand_in.open("wb") as out:
        out.truncate(size)
    run(identity.mkfs_argv(stand_in))

    info = run(["minfo", "-i", stand_in, "::"], env=MTOOLS_ENV).stdout.decode()
    listing = run(["mdir", "-i", stand_in, "::"], env=MTOOLS_ENV).stdout.decode()
    sector = _field(info, r"sector size: (\d+) bytes", boot)
    per_cluster = _field(info, r"cluster size: (\d+) sectors", boot)
    root_slots = _field(info, r"max available root directory slots: (\d+)", boot)
    free = re.search(r"([\d ]+) bytes free", listing)
    if free is None:
        raise BootSyncError(str(boot), f"mdir reported no free space: {listing!r}", changed=False)
    geometry = Geometry(sector * per_cluster, int(free.group(1).replace(" ", "")), root_slots)
    log.debug("a FAT on %s of %d bytes would have %s", boot, size, geometry)
    return geometry


def _field(text: str, pattern: str, boot: Path) -> int:
    match = re.search(pattern, text)
    if match is None:
        raise BootSyncError(str(boot), f"minfo printed no {pattern!r}", changed=False)
    return int(match.group(1))


def _format(boot: Path, identity: Identity) -> None:
    try:
        run(identity.mkfs_argv(boot))
    except OtadError as error:
        # mkfs.vfat may have written part of the new filesystem before it failed.
        raise BootSyncError(str(boot), f"formatting failed: {error}", changed=True) from error


def _copy_in(top: Path, boot: Path) -> None:
    sources = [top / name for name in sorted(os.listdir(top))]
    run(["mcopy", "-s", "-m", "-Q", "-i", boot, *sources, "::/"], env=MTOOLS_ENV)


def _flush(boot: Path) -> None:
    """Make what mtools wrote durable, and drop it from the cache so reading checks the medium."""
    with _opened(boot) as descriptor:
        os.fsync(descriptor)
        if not stat.S_ISBLK(os.fstat(descriptor).st_mode):
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            return
        try:
            fcntl.ioctl(descriptor, BLKFLSBUF)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EACCES):
                raise
            log.debug("cannot drop the cache of %s; reading back may come from memory", boot)


def _verify(tree: Tree, boot: Path, work: Path) -> None:
    """Read the whole partition back with mtools and compare it with the tree."""
    back = work / "readback"
    run(["mcopy", "-s", "-m", "-n", "-i", boot, "::/", back], env=MTOOLS_ENV)
    back.mkdir(exist_ok=True)  # mcopy creates nothing for an empty partition
    files, directories = _read_back(back)
    expected_dirs = set(tree.directories) - {""}
    problems = [f"{name} is missing" for name in sorted(tree.files.keys() - files.keys())]
    problems += [f"{name}/ is missing" for name in sorted(expected_dirs - directories)]
    problems += [f"{name} is not a boot file" for name in sorted(files.keys() - tree.files)]
    problems += [f"{name}/ is not a boot directory" for name in sorted(directories - expected_dirs)]
    for name in sorted(tree.files.keys() & files.keys()):
        (size, digest), (size_back, digest_back) = tree.files[name], files[name]
        if digest != digest_back:
            problems.append(
                f"{name} reads back as {size_back} bytes with SHA-256 {digest_back}, "
                f"written were {size} bytes with {digest}"
            )
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise BootSyncError(
            str(boot), f"read back wrong: {'; '.join(problems[:3])}{more}", changed=True
        )


def _read_back(top: Path) -> tuple[dict[str, tuple[int, str]], set[str]]:
    """Sizes and SHA-256 of the files under `top`, and its directories, by relative path."""
    files = {}
    directories: set[str] = set()
    for directory, dirnames, filenames in os.walk(top):
        base = Path(directory).relative_to(top)
        directories.update((base / name).as_posix() for name in dirnames)
        for name in filenames:
            path = Path(directory, name)
            files[(base / name).as_posix()] = (path.stat().st_size, _sha256(path))
    return files, directories


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@contextmanager
def _opened(path: Path) -> Iterator[int]:
    """A read-only descriptor of `path` (enough for fsync and the block ioctls)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield descriptor
    finally:
        os.close(descriptor)
