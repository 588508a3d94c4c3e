"""The conversion, phase by phase, with every resource released and no partial output left.

Everything is built in a work directory beside OUTPUT (same filesystem, so the final
renames are atomic); only when every phase has succeeded are the image and its
artifact renamed into place. Any failure removes the work directory, and with it every
partial file; loop devices and mounts are released in reverse order, past errors.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert import (
    fat,
    filesystems,
    grub,
    image,
    layout,
    mbr,
    partition,
    progress,
    rootfs,
    sparse,
    swap,
    watchdog,
)
from convert.artifact import artifact_path, emit, release_of
from convert.errors import NotSupportedYet
from convert.fat import TOOLS as FAT_TOOLS
from convert.fat import FatVolume
from convert.layout import MIB, Partition, Plan, StockLayout
from convert.mounts import loop_device, mounted
from convert.report import Report
from convert.watchdog import DEFAULT_TIMEOUT as WATCHDOG_TIMEOUT
from otad.artifact.signing import Signer, Verifier, load_signer, load_verifier, public_pem
from otad.bootloader.base import Slot
from otad.errors import UsageError
from otad.process import require_tools, run
from otad.state import StateStore, initial_state

log = logging.getLogger(__name__)

TOOLS = tuple(dict.fromkeys((  # each once, in order
    "sfdisk", "losetup", "mount", "umount", "chroot", "cp", "rm", "tar", "du",
    *filesystems.TOOLS, *FAT_TOOLS, fat.FORMAT_TOOL, *swap.TOOLS,
)))  # fmt: skip
COMPRESSED_TOOLS = {"xz": "xz", "gzip": "gzip", "zstd": "zstd"}
DATA_LABEL = "data"
ESP_LABEL = "ESP"  # of an ESP made for an MBR input
ARTIFACT_COMPRESSIONS = ("gzip", "zstd", "none")
HEARTBEAT = 10.0  # seconds between progress lines of a long phase
DEFAULT_DEVICE_TYPE = "x86_64"  # of a PC image when --device-type does not say


@dataclass(frozen=True)
class Options:
    input: Path
    output: Path
    storage_size: int  # bytes
    data_size: int  # bytes
    device_type: str | None  # None: the layout's default (DEFAULT_DEVICE_TYPE, rpi's own)
    artifact_name: str
    key: Path | None = None
    verify_keys: tuple[Path, ...] = ()
    debs: tuple[Path, ...] = ()
    overlay: Path | None = None
    bootloader: str = "auto"
    artifact_compression: str = "gzip"
    watchdog: int = WATCHDOG_TIMEOUT  # seconds; 0: the image does not arm the watchdog


@dataclass
class _Keys:
    signer: Signer | None
    verifiers: list[Verifier] = field(default_factory=list)
    files: list[tuple[str, bytes]] = field(default_factory=list)


# (phase, seconds) of the conversion running in this context, for the report.
_TIMINGS: contextvars.ContextVar[list[tuple[str, float]] | None] = contextvars.ContextVar(
    "timings", default=None
)


@contextlib.contextmanager
def _phase(title: str) -> Iterator[None]:
    """Log a phase's start and end, and a line every HEARTBEAT seconds while it runs (none
    while a progress bar is drawn); record its time for the report."""
    log.info("== %s", title)
    started = time.monotonic()
    finished = threading.Event()

    # TODO: show bytes done for e2fsck, resize2fs and package installation too (their -C,
    # -p and Status-Fd output), when filesystems.py and rootfs.py pass those on.
    def beat() -> None:
        while not finished.wait(HEARTBEAT):
            if not progress.is_drawing():
                log.info("   %s: still working (%.0f s)", title, time.monotonic() - started)

    heart = threading.Thread(target=beat, daemon=True)
    heart.start()
    try:
        yield
    finally:
        finished.set()
        heart.join()
    seconds = time.monotonic() - started
    log.info("   %s: done in %.1f s", title, seconds)
    timings = _TIMINGS.get()
    if timings is not None:
        timings.append((title, seconds))


def convert(options: Options) -> Report:
    """Convert `options.input` into `options.output` and its artifact; return the report."""
    timings: list[tuple[str, float]] = []
    token = _TIMINGS.set(timings)
    try:
        report = _convert(options)
    finally:
        _TIMINGS.reset(token)
    return dataclasses.replace(report, timings=tuple(timings))


def _convert(options: Options) -> Report:
    keys = _preflight(options)
    output = options.output.resolve()
    artifact = artifact_path(output)
    changes: list[str] = []
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.convert."))
        stack.callback(shutil.rmtree, work, True)

        with _phase("reading the input"):
            raw = image.raw_image(options.input.resolve(), work)
            table = layout.read_table(raw)
            if not mbr.is_pi_layout(table):
                stock = layout.recognise(table, raw.stat().st_size, options.input)
                plan = layout.plan_layout(stock, options.storage_size, options.data_size)
        if mbr.is_pi_layout(table):
            # Raspberry Pi images have phases of their own; that module imports this one.
            from convert.rpi_pipeline import convert_pi

            return convert_pi(options, keys, raw, table, work, output, artifact)
        if options.bootloader == "rpi-tryboot":
            raise UsageError(f"{options.input} is no Raspberry Pi image for rpi-tryboot to boot")
        device_type = options.device_type or DEFAULT_DEVICE_TYPE

        with _phase("copying the root filesystem"):
            root_fs = work / "rootfs.ext4"
            used = sparse.data_bytes(raw, stock.root.offset, stock.root.end * layout.SECTOR)
            with progress.watch_growth("copying the root filesystem", root_fs, used):
                filesystems.extract_root(raw, stock.root, root_fs)
            needed = filesystems.used_bytes(root_fs) + _added_bytes(options)
            layout.check_slot_fits(plan, needed, options.storage_size)
            filesystems.resize(root_fs, plan.slot_a.bytes)

        with _phase("writing the A/B partition table"):
            disk = work / "output.img"
            partition.create_disk(disk, plan)
            esp, efi_binaries = _write_esp(raw, stock, disk, plan, changes)
            _write_swap(raw, stock, disk, plan, work, changes)

        kernel, built = _change_root(
            options, device_type, keys, stock, plan, root_fs, disk, esp, work, changes
        )

        with _phase("writing the slots"):
            _write_slots(root_fs, disk, plan)
            changes.append("slots A and B: copies of the root with their own filesystem UUIDs")

        with _phase("installing GRUB's A/B configuration on the ESP"):
            grub.install_efi(esp, plan, kernel, work)
            binaries = (
                f"{', '.join(efi_binaries)} unchanged"
                if efi_binaries
                else f"new {', '.join(built)}" if built else "no EFI binaries: BIOS only"
            )  # fmt: skip
            changes.append(
                f"ESP: {grub.EFI_CONFIG} boots the slot otad chooses ({binaries}); "
                f"slot table in {rootfs.ENV_DIR}, slot A good"
            )

        _finish(options, device_type, keys, root_fs, disk, plan.data, work, output, artifact,
                changes)  # fmt: skip
    return Report(output, artifact, options.artifact_name, keys.signer is not None, plan, changes)


def _write_esp(
    raw: Path, stock: StockLayout, disk: Path, plan: Plan, changes: list[str]
) -> tuple[FatVolume, tuple[str, ...]]:
    """The stock ESP copied into place with its GRUB binaries, or a new empty one."""
    if stock.esp is not None:
        filesystems.copy_partition(raw, stock.esp, disk, plan.esp)
        esp = FatVolume(disk, plan.esp.offset)
        return esp, grub.detect(esp)
    esp = fat.format_volume(disk, plan.esp.offset, plan.esp.bytes, ESP_LABEL)
    grub.prepare_new_esp(esp)
    changes.append(
        f"MBR input: now GPT, with a new ESP ({plan.esp.bytes // MIB} MiB, FAT32) and a BIOS "
        "boot partition"
    )
    return esp, ()


def _write_swap(
    raw: Path, stock: StockLayout, disk: Path, plan: Plan, work: Path, changes: list[str]
) -> None:
    if stock.swap is None or plan.swap is None:
        return
    identity = swap.read_identity(raw, stock.swap)
    swap.make_swap(identity, disk, plan.swap, work)
    changes.append(
        f"swap: partition {plan.swap.number}, shared by both slots, made anew with "
        f"{'the UUID ' + identity.uuid if identity.uuid else 'a new UUID'}"
    )


def _change_root(
    options: Options,
    device_type: str,
    keys: _Keys,
    stock: StockLayout,
    plan: Plan,
    root_fs: Path,
    disk: Path,
    esp: FatVolume,
    work: Path,
    changes: list[str],
) -> tuple[rootfs.Kernel, tuple[str, ...]]:
    """Every change inside the root filesystem, and the GRUB images built from it: the
    kernel the boot entries name, and the EFI binaries built (for an MBR input)."""
    built: tuple[str, ...] = ()
    with contextlib.ExitStack() as stack:
        device = stack.enter_context(loop_device(root_fs))
        root = stack.enter_context(mounted(device, work / "root"))
        rootfs.check_convertible(root)
        if stock.is_mbr and not grub.has_bios_modules(root):
            raise NotSupportedYet(
                f"{options.input} boots by BIOS but its root has no GRUB for BIOS "
                f"(/{grub.BIOS_MODULES_DIR}, package grub-pc-bin): the result could not boot"
            )
        # The watchdog's phase rebuilds the initramfs once, after all packages.
        defer = options.watchdog > 0 and watchdog.can_rebuild(root)
        owed = False
        if options.debs:
            with _phase("installing packages"):
                owed = rootfs.install_debs(root, options.debs, defer_initramfs=defer)
                changes.append(f"installed {', '.join(d.name for d in options.debs)}")
        if options.overlay is not None:
            with _phase("copying the overlay"):
                rootfs.copy_overlay(root, options.overlay)
                changes.append(f"copied the overlay {options.overlay}")
        with _phase("configuring the root filesystem for A/B"):
            rootfs.rewrite_fstab(root, plan)
            rootfs.disable_root_growth(root)
            rootfs.install_data_growth(root)
            rootfs.install_otad_config(root, plan, device_type, keys.files)
            kernel = rootfs.find_kernel(root)
            changes += [
                "fstab: / is /dev/root; ESP and /data by PARTUUID; x-systemd.growfs removed",
                "root growth off (growroot, cloud-init growpart, systemd-growfs-root); "
                f"{rootfs.GROW_UNIT} grows the data partition on first boot",
                f"/{rootfs.OTAD_CONF} and {len(keys.files)} trusted key(s) in /{rootfs.KEYS_DIR}",
                f"boot entries: {kernel.kernel} {kernel.initrd or '(no initrd)'} "
                f"with '{kernel.arguments}'",
            ]
        if options.watchdog:
            with _phase("arming the watchdog from the initramfs"):
                changes.append(watchdog.install(root, options.watchdog, kernel.initrd, owed))
        with _phase("installing GRUB for BIOS"):
            if grub.has_bios_modules(root):
                esp_uuid = filesystems.filesystem_uuid_at(disk, plan.esp.offset)
                whole = stack.enter_context(loop_device(disk))
                grub.install_bios(root, device, whole, esp, esp_uuid)
                changes.append(
                    f"BIOS: new GRUB core in partition {plan.bios_boot.number}, "
                    f"loading {grub.EFI_CONFIG} from the ESP"
                )
            else:
                log.warning("no grub-pc-bin in the image: the result boots with EFI only")
                changes.append("BIOS: not set up (the image has no grub-pc-bin)")
        if stock.is_mbr:
            with _phase("installing GRUB for EFI"):
                if grub.has_efi_modules(root):
                    built = grub.install_efi_binaries(root, esp)
                else:
                    log.warning("no grub-efi-amd64-bin in the image: the result boots by BIOS only")
                    changes.append("EFI: not set up (the image has no grub-efi-amd64-bin)")
    return kernel, built


def _write_slots(root_fs: Path, disk: Path, plan: Plan) -> None:
    """Slot B, then slot A, each the data of `root_fs` under a new filesystem UUID: only
    the used blocks are copied, and `root_fs` ends as slot A, the artifact's payload."""
    filesystems.check(root_fs, "the converted root")
    for name, slot in (("B", plan.slot_b), ("A", plan.slot_a)):
        filesystems.set_uuid(root_fs, filesystems.new_uuid())
        with progress.track(f"writing slot {name}", sparse.data_bytes(root_fs)) as shown:
            sparse.copy_data(root_fs, disk, slot.offset, slot.bytes, shown.advance)


def _finish(
    options: Options,
    device_type: str,
    keys: _Keys,
    root_fs: Path,
    disk: Path,
    data: Partition,
    work: Path,
    output: Path,
    artifact: Path,
    changes: list[str],
) -> None:
    """The last phases of every layout: the first artifact, made from the converted root
    filesystem `root_fs`, the data partition saying slot A runs it, and both outputs
    moved into place."""
    with _phase("writing and verifying the artifact"):
        partial_artifact = work / artifact.name
        header = emit(root_fs, partial_artifact, options.artifact_name,
                      device_type, keys.signer, keys.verifiers,
                      compression=options.artifact_compression)  # fmt: skip

    with _phase("formatting the data partition"):
        content = work / "data"
        StateStore(content / "otad").save(initial_state(Slot.A, release_of(header)))
        filesystems.make_data(disk, data, DATA_LABEL, content)
        changes.append("data partition: otad/state.json says slot A runs the artifact")

    _publish(disk, output, partial_artifact, artifact)


def _publish(disk: Path, output: Path, partial_artifact: Path, artifact: Path) -> None:
    """Rename the finished image and artifact into place, the image once it is on disk
    (the artifact's writer syncs its own); the artifact goes away if not both."""
    _fsync_file(disk)  # mkfs.ext4 of the data partition has most often flushed it already
    os.replace(partial_artifact, artifact)
    try:
        os.replace(disk, output)
    except BaseException:
        artifact.unlink(missing_ok=True)
        raise
    directory = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _added_bytes(options: Options) -> int:
    """A generous bound on what --deb and --overlay add to the root filesystem."""
    added = sum(3 * deb.stat().st_size for deb in options.debs)
    if options.overlay is not None:
        result = run(["du", "-sb", options.overlay])
        added += int(result.stdout.split()[0])
    return added


def _preflight(options: Options) -> _Keys:
    """Check tools, options and keys before anything is written."""
    tools = list(TOOLS)
    if not options.input.exists():
        raise UsageError(f"input image {options.input} does not exist")
    if options.input.is_file():
        command = image.decompressor(options.input)
        if command is not None:
            tools.append(command[0])
    if options.debs:
        tools.append("dpkg-deb")  # names the packages (rootfs.install_debs)
    require_tools(*tools)
    if options.bootloader not in ("auto", "grub", "rpi-tryboot"):
        raise UsageError(f"bootloader {options.bootloader!r}: only grub and rpi-tryboot exist")
    if options.output.resolve() == options.input.resolve():
        raise UsageError("OUTPUT must not be the input image: the input is never modified")
    if not options.output.parent.is_dir():
        raise UsageError(f"the directory of OUTPUT, {options.output.parent}, does not exist")
    if options.artifact_compression not in ARTIFACT_COMPRESSIONS:
        raise UsageError(
            f"artifact compression {options.artifact_compression!r}: expected one of "
            f"{', '.join(ARTIFACT_COMPRESSIONS)}"
        )
    watchdog.check_timeout(options.watchdog)
    if options.data_size < 16 * MIB:
        raise UsageError(f"data size must be at least 16 MiB, got {options.data_size} bytes")
    for deb in options.debs:
        if not deb.is_file():
            raise UsageError(f"package {deb} does not exist")
    if options.overlay is not None and not options.overlay.is_dir():
        raise UsageError(f"overlay {options.overlay} is not a directory")
    return _load_keys(options)


def _load_keys(options: Options) -> _Keys:
    keys = _Keys(load_signer(options.key) if options.key else None)
    for path in options.verify_keys:
        keys.verifiers.append(load_verifier(path))
        keys.files.append((_key_name(path, keys.files), path.read_bytes()))
    if keys.signer is not None and not options.verify_keys:
        keys.verifiers.append(keys.signer.verifier)
        keys.files.append(("release.pub", public_pem(keys.signer)))
    if not keys.files:
        raise UsageError(
            "the device must trust at least one key: pass --verify-key PUBLIC-KEY "
            "(or --key, whose public key is then installed)"
        )
    return keys


def _key_name(path: Path, taken: Sequence[tuple[str, bytes]]) -> str:
    base = path.name if path.name.endswith(".pub") else f"{path.stem}.pub"
    names = {name for name, _ in taken}
    name, counter = base, 1
    while name in names:
        counter += 1
        name = f"{base.removesuffix('.pub')}-{counter}.pub"
    if any(ch in name for ch in '"\\'):
        raise UsageError(f"key file name {name!r} cannot be named in otad.conf")
    return name
