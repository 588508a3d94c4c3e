"""The conversion, phase by phase, with every resource released and no partial output left.

Everything is built in a work directory beside OUTPUT (same filesystem, so the final
renames are atomic); only when every phase has succeeded are the image and its
artifact renamed into place. Any failure removes the work directory, and with it every
partial file; loop devices and mounts are released in reverse order, past errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert import filesystems, grub, image, layout, partition, rootfs
from convert.artifact import artifact_path, emit, release_of
from convert.fat import TOOLS as FAT_TOOLS
from convert.fat import FatVolume
from convert.layout import MIB, Plan
from convert.mounts import loop_device, mounted
from convert.report import Report
from otad.artifact.signing import Signer, Verifier, load_signer, load_verifier, public_pem
from otad.bootloader.base import Slot
from otad.errors import UsageError
from otad.process import require_tools, run
from otad.state import StateStore, initial_state

log = logging.getLogger(__name__)

TOOLS = (
    "sfdisk", "losetup", "mount", "umount", "chroot", "cp", "rm", "tar", "du",
    *filesystems.TOOLS, *FAT_TOOLS,
)  # fmt: skip
COMPRESSED_TOOLS = {"xz": "xz", "gzip": "gzip", "zstd": "zstd"}
DATA_LABEL = "data"
HEARTBEAT = 10.0  # seconds between progress lines of a long phase


@dataclass(frozen=True)
class Options:
    input: Path
    output: Path
    storage_size: int  # bytes
    data_size: int  # bytes
    device_type: str
    artifact_name: str
    key: Path | None = None
    verify_keys: tuple[Path, ...] = ()
    debs: tuple[Path, ...] = ()
    overlay: Path | None = None
    bootloader: str = "auto"


@dataclass
class _Keys:
    signer: Signer | None
    verifiers: list[Verifier] = field(default_factory=list)
    files: list[tuple[str, bytes]] = field(default_factory=list)


@contextlib.contextmanager
def _phase(title: str) -> Iterator[None]:
    """Log a phase's start and end, and a line every HEARTBEAT seconds while it runs."""
    log.info("== %s", title)
    started = time.monotonic()
    finished = threading.Event()

    def beat() -> None:
        while not finished.wait(HEARTBEAT):
            log.info("   %s: still working (%.0f s)", title, time.monotonic() - started)

    heart = threading.Thread(target=beat, daemon=True)
    heart.start()
    try:
        yield
    finally:
        finished.set()
        heart.join()
    log.info("   %s: done in %.1f s", title, time.monotonic() - started)


def convert(options: Options) -> Report:
    """Convert `options.input` into `options.output` and its artifact; return the report."""
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
            stock = layout.recognise(table, raw.stat().st_size, options.input)
            plan = layout.plan_layout(stock, options.storage_size, options.data_size)

        with _phase("copying the root filesystem"):
            root_fs = work / "rootfs.ext4"
            filesystems.extract_root(raw, stock.root, root_fs)
            needed = filesystems.used_bytes(root_fs) + _added_bytes(options)
            layout.check_slot_fits(plan, needed, options.storage_size)
            filesystems.resize(root_fs, plan.slot_a.bytes)

        with _phase("writing the A/B partition table"):
            disk = work / "output.img"
            partition.create_disk(disk, plan)
            filesystems.copy_partition(raw, stock.esp, disk, plan.esp)
            esp = FatVolume(disk, plan.esp.offset)
            efi_binaries = grub.detect(esp)

        kernel = _change_root(options, keys, plan, root_fs, disk, esp, work, changes)

        with _phase("writing the slots"):
            _write_slots(root_fs, disk, plan, work)
            changes.append("slots A and B: copies of the root with their own filesystem UUIDs")

        with _phase("installing GRUB's A/B configuration on the ESP"):
            grub.install_efi(esp, plan, kernel, work)
            changes.append(
                f"ESP: {grub.EFI_CONFIG} boots the slot otad chooses ({', '.join(efi_binaries)} "
                f"unchanged); slot table in {rootfs.ENV_DIR}, slot A good"
            )

        with _phase("writing and verifying the artifact"):
            partial_artifact = work / artifact.name
            header = emit(root_fs, partial_artifact, options.artifact_name,
                          options.device_type, keys.signer, keys.verifiers)  # fmt: skip

        with _phase("formatting the data partition"):
            content = work / "data"
            StateStore(content / "otad").save(initial_state(Slot.A, release_of(header)))
            filesystems.make_data(disk, plan.data, DATA_LABEL, content)
            changes.append("data partition: otad/state.json says slot A runs the artifact")

        _publish(disk, output, partial_artifact, artifact)
    return Report(output, artifact, options.artifact_name, keys.signer is not None, plan, changes)


def _change_root(
    options: Options,
    keys: _Keys,
    plan: Plan,
    root_fs: Path,
    disk: Path,
    esp: FatVolume,
    work: Path,
    changes: list[str],
) -> rootfs.Kernel:
    """Every change inside the root filesystem, and the BIOS core built from it."""
    with contextlib.ExitStack() as stack:
        device = stack.enter_context(loop_device(root_fs))
        root = stack.enter_context(mounted(device, work / "root"))
        rootfs.check_convertible(root)
        if options.debs:
            with _phase("installing packages"):
                rootfs.install_debs(root, options.debs)
                changes.append(f"installed {', '.join(d.name for d in options.debs)}")
        if options.overlay is not None:
            with _phase("copying the overlay"):
                rootfs.copy_overlay(root, options.overlay)
                changes.append(f"copied the overlay {options.overlay}")
        with _phase("configuring the root filesystem for A/B"):
            rootfs.rewrite_fstab(root, plan)
            rootfs.disable_root_growth(root)
            rootfs.install_data_growth(root)
            rootfs.install_otad_config(root, plan, options.device_type, keys.files)
            kernel = rootfs.find_kernel(root)
            changes += [
                "fstab: / is /dev/root; ESP and /data by PARTUUID; x-systemd.growfs removed",
                "root growth off (growroot, cloud-init growpart, systemd-growfs-root); "
                f"{rootfs.GROW_UNIT} grows the data partition on first boot",
                f"/{rootfs.OTAD_CONF} and {len(keys.files)} trusted key(s) in /{rootfs.KEYS_DIR}",
                f"boot entries: {kernel.kernel} {kernel.initrd or '(no initrd)'} "
                f"with '{kernel.arguments}'",
            ]
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
    return kernel


def _write_slots(root_fs: Path, disk: Path, plan: Plan, work: Path) -> None:
    filesystems.check(root_fs, "the converted root")
    filesystems.set_uuid(root_fs, filesystems.new_uuid())
    filesystems.write_into(root_fs, disk, plan.slot_a)
    slot_b = work / "rootfs-b.ext4"
    filesystems.copy_sparse(root_fs, slot_b)
    filesystems.set_uuid(slot_b, filesystems.new_uuid())
    filesystems.write_into(slot_b, disk, plan.slot_b)
    slot_b.unlink()


def _publish(disk: Path, output: Path, partial_artifact: Path, artifact: Path) -> None:
    """Rename the finished image and artifact into place; the artifact goes away if not both."""
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
    require_tools(*tools)
    if options.bootloader not in ("auto", "grub"):
        raise UsageError(f"bootloader {options.bootloader!r}: only grub is supported yet")
    if options.output.resolve() == options.input.resolve():
        raise UsageError("OUTPUT must not be the input image: the input is never modified")
    if not options.output.parent.is_dir():
        raise UsageError(f"the directory of OUTPUT, {options.output.parent}, does not exist")
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
