"""What Debian's own Raspberry Pi images (raspi.debian.net) need beyond Raspberry Pi OS's.

Those images find their root and boot partitions by label (RASPIROOT, RASPIFIRM) in
cmdline.txt and fstab, and Debian's raspi-firmware package rewrites cmdline.txt on every
kernel or initramfs update, with root= taken from ROOTPART in /etc/default/raspi-firmware
(a shell file its hook sources). After conversion both slots hold the same root, so a
label names no slot: the labels are checked against the partitions before anything is
changed, the root's label is cleared, and ROOTPART is computed, each time the hook runs,
from the booted slot's root= on the kernel command line. That is the slot whose boot
partition is mounted at /boot/firmware (convert/data/otad-boot-firmware), which the hook
writes; an update fills the other slot's boot partition with otad/bootsync.py, which
sets root= to that slot, so the two agree. Newer images grow their root partition from
the initrd; that script is overridden in the initrds the image carries.
"""

from __future__ import annotations

import logging
import lzma
import shlex
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from convert.errors import ImageError
from convert.mbr import MbrPlan
from otad.process import run

log = logging.getLogger(__name__)

FIRMWARE_DEFAULTS = Path("etc/default/raspi-firmware")
FIRMWARE_HOOKS = (
    Path("etc/kernel/postinst.d/z50-raspi-firmware"),
    Path("etc/initramfs/post-update.d/z50-raspi-firmware"),
)
# image-specs (since May 2021) grows the root partition from the initrd, with this
# initramfs-tools script, deleted from the root once the image's initrd is built: only
# the initrds on the image have it, and a later update-initramfs drops it.
RESIZE_SCRIPT = "scripts/local-bottom/rpi-resizerootfs"
RESIZE_STUB = (
    b"#!/bin/sh\n"
    b"# Written by otad-convert over image-specs' first-boot resize of the root partition:\n"
    b"# the A/B slots keep their size; otad-grow-data.service grows the data partition.\n"
    b'case $1 in prereqs) echo ""; exit 0 ;; esac\n'
    b"exit 0\n"
)
CPIO_MAGIC = (b"070701", b"070702")
CPIO_TRAILER = b"TRAILER!!!"
BLOCK_START = "# otad-convert: begin"
BLOCK_END = "# otad-convert: end"


@dataclass(frozen=True)
class LabelUse:
    """A place in the stock image that names a partition by its label."""

    where: str  # for messages: "cmdline.txt root=", "/etc/fstab for /", ...
    label: str
    is_root: bool  # names the root partition (else the boot partition)


def has_firmware_hook(root: Path) -> bool:
    """Whether Debian's raspi-firmware hooks (or their configuration) are in the root."""
    return any((root / path).exists() for path in (FIRMWARE_DEFAULTS, *FIRMWARE_HOOKS))


def label_uses(root: Path, cmdline: str) -> list[LabelUse]:
    """Every LABEL= that names the root or the boot partition in the stock image."""
    uses = [
        LabelUse("cmdline.txt root=", word.removeprefix("root=LABEL="), True)
        for word in cmdline.split()
        if word.startswith("root=LABEL=")
    ]
    fstab = root / "etc/fstab"
    for line in fstab.read_text(errors="replace").splitlines() if fstab.exists() else []:
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#") or not fields[0].startswith("LABEL="):
            continue
        if fields[1] in ("/", "/boot/firmware"):
            uses.append(
                LabelUse(
                    f"/etc/fstab for {fields[1]}",
                    fields[0].removeprefix("LABEL="),
                    fields[1] == "/",
                )  # fmt: skip
            )
    rootpart = _rootpart(root)
    if rootpart is not None and rootpart.startswith("LABEL="):
        uses.append(
            LabelUse(f"ROOTPART in /{FIRMWARE_DEFAULTS}", rootpart.removeprefix("LABEL="), True)
        )
    return uses


def check_labels(uses: list[LabelUse], boot_label: str, root_label: str) -> None:
    """Refuse labels that name no partition, the wrong one, or both partitions at once."""
    if uses and boot_label and boot_label == root_label:
        raise ImageError(
            f"the boot partition (1) and the root partition (2) are both labelled "
            f"{boot_label!r}, and {uses[0].where} names LABEL={uses[0].label}: it is "
            "ambiguous which partition the image boots from"
        )
    for use in uses:
        number, expected = (2, root_label) if use.is_root else (1, boot_label)
        if use.label != expected:
            raise ImageError(
                f"{use.where} names LABEL={use.label}, but partition {number} (the "
                f"{'root' if use.is_root else 'boot'} partition) is labelled "
                f"{expected!r}: the image would not find its "
                f"{'root' if use.is_root else 'boot partition'}"
            )


def clear_root_label(root_fs: Path) -> None:
    """Remove the ext4 label both slots would carry (RASPIROOT names no single slot)."""
    run(["tune2fs", "-L", "", root_fs])


def point_hook_at_booted_slot(root: Path, plan: MbrPlan) -> str | None:
    """Make /etc/default/raspi-firmware compute ROOTPART from the booted slot's root=.

    The stock ROOTPART= lines are commented out; the block appended takes root= from
    /proc/cmdline when it is one of the two slots' and otherwise (a chroot at build
    time) slot A's, as the root's own /boot/firmware/cmdline.txt has it. Returns the
    stock ROOTPART (None when there was none, or no hook to configure).
    """
    if not has_firmware_hook(root):
        return None
    path = root / FIRMWARE_DEFAULTS
    for link in (path.parent, path):
        if link.is_symlink():
            raise ImageError(
                f"/{link.relative_to(root)} in the root filesystem is a symbolic link; "
                "otad-convert writes there and does not follow links that could lead out "
                "of the image"
            )
    stock = _rootpart(root)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept = [f"# {line}  # otad-convert: see below" if _is_rootpart(line) else line
            for line in lines]  # fmt: skip
    slot_a, slot_b = plan.partuuid(plan.slot_a), plan.partuuid(plan.slot_b)
    block = [
        BLOCK_START,
        "# Both A/B slots hold this root filesystem; the hook writes /boot/firmware, the",
        "# booted slot's boot partition, so root= is the booted slot's, from the kernel",
        "# command line; slot A's when not booted from a slot (a chroot).",
        f"ROOTPART={slot_a}",
        "for otad_word in $(cat /proc/cmdline 2>/dev/null); do",
        "    case $otad_word in",
        f"        root={slot_a}|root={slot_b}) ROOTPART=${{otad_word#root=}} ;;",
        "    esac",
        "done",
        "unset otad_word",
        BLOCK_END,
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*kept, *block]) + "\n")
    path.chmod(0o644)
    return stock


def _is_rootpart(line: str) -> bool:
    return line.strip().startswith(("ROOTPART=", "export ROOTPART="))


def _rootpart(root: Path) -> str | None:
    """The last ROOTPART= the defaults file sets, unquoted (None if it sets none)."""
    path = root / FIRMWARE_DEFAULTS
    value = None
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if _is_rootpart(line):
            text = line.strip().removeprefix("export ").removeprefix("ROOTPART=")
            try:
                words = shlex.split(text, comments=True)
            except ValueError as error:
                raise ImageError(f"/{FIRMWARE_DEFAULTS}: cannot read {line!r}: {error}") from error
            value = " ".join(words)
    return value


def neutralize_initrd_resize(root: Path) -> list[str]:
    """Override image-specs' resize script in every initrd of the root that has it.

    An uncompressed cpio archive holding a script that does nothing, under the same
    name, is appended to the initrd: the kernel unpacks concatenated archives in order,
    a later file replacing an earlier one. Returns the initrds changed, as root paths.
    """
    # TODO: prove on a booted Pi that the appended archive wins when Pi conversions are
    # booted (the kernel's initramfs unpacker replaces files; nothing here ran it).
    changed = []
    for initrd in sorted(
        [*root.glob("boot/initrd.img-*"), *root.glob("boot/firmware/initrd.img-*")]
    ):
        if initrd.is_symlink() or not initrd.is_file():
            continue  # a link to one of the others, which are handled themselves
        where = f"/{initrd.relative_to(root).as_posix()}"
        try:
            found = has_member(initrd.read_bytes(), RESIZE_SCRIPT)
        except ImageError as error:
            raise ImageError(f"the initrd {where} cannot be read: {error}") from None
        if found:
            with initrd.open("ab") as stream:
                stream.write(bytes(-stream.tell() % 512))  # archives start 4-byte aligned
                stream.write(newc_archive({RESIZE_SCRIPT: RESIZE_STUB}))
            changed.append(where)
    return changed


def has_member(initrd: bytes, name: str) -> bool:
    """Whether the initramfs `initrd` (cpio archives, the last one compressed) holds `name`."""
    wanted = name.encode() + b"\0"
    return any(wanted in segment for segment in _segments(initrd))


def _segments(data: bytes) -> list[bytes]:
    """The archives of an initramfs, decompressed: uncompressed ones first (early
    microcode, firmware), then the compressed main one."""
    found = []
    offset = 0
    while offset < len(data):
        rest = data[offset:].lstrip(b"\0")
        if not rest:
            break
        offset = len(data) - len(rest)
        if rest.startswith(CPIO_MAGIC):
            end = rest.find(CPIO_TRAILER)
            end = len(rest) if end < 0 else end + len(CPIO_TRAILER)
            found.append(rest[:end])
            offset += end
            continue
        found.append(_decompress(rest))
        break
    return found


def _decompress(data: bytes) -> bytes:
    """One compressed archive at the start of `data`; what follows it is ignored.
    ImageError when it is corrupt."""
    try:
        return _decompress_one(data)
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError) as error:
        raise ImageError(f"its compressed archive is corrupt ({error})") from None


def _decompress_one(data: bytes) -> bytes:
    if data.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(data)
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor().decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        decompressed: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        return decompressed
    # TODO: read lz4, lzo and bzip2 initrds too when an image uses one (Debian's default
    # is zstd; initramfs-tools also offers gzip, xz, lz4, lzo, bzip2).
    log.warning("an initrd compressed as %r is not searched for a root resize script", data[:4])
    return b""


def newc_archive(files: dict[str, bytes]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks: regular files, root's, 0755."""
    out = bytearray()
    for number, (name, content) in enumerate([*files.items(), (CPIO_TRAILER.decode(), b"")]):
        is_trailer = name == CPIO_TRAILER.decode()
        encoded = name.encode() + b"\0"
        fields = (number + 1, 0 if is_trailer else 0o100755, 0, 0, 1, 0, len(content),
                  0, 0, 0, 0, len(encoded), 0)  # fmt: skip
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        out += bytes(-len(out) % 4) + content + bytes(-len(content) % 4)
    return bytes(out + bytes(-len(out) % 512))
