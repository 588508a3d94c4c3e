"""Builds a small stock-like Debian 12 amd64 cloud image for the converter's tests.

The layout copies the official cloud images: partition 1 the ext4 root (from 128 MiB
to the end), 14 a BIOS boot partition, 15 the EFI system partition with a GRUB whose
EFI/debian/grub.cfg chain-loads the root's /boot/grub/grub.cfg. The debootstrap tree and
the image are cached outside the clone, under $OTAD_TEST_CACHE (default
/var/cache/otad-test), each keyed by a hash of what builds it, so only the first run
pays for debootstrap (a few minutes). Nothing here mounts FAT: the ESP is written with
mtools.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
PACKAGES = (
    "linux-image-amd64",
    "grub-common",
    "grub-efi-amd64-bin",
    "grub-pc-bin",
    "systemd-sysv",
    "e2fsprogs",
    "fdisk",
)
IMAGE_SIZE = 1536 << 20
ROOT_START = 262144  # sectors, as in the cloud images
BIOS_BOOT = (2048, 6144)  # start and size in sectors
ESP = (8192, 253952)
ROOT_PARTUUID = "6b2d3a4e-0f11-4c3b-9a62-0c1b2e3d4f01"
ESP_PARTUUID = "6b2d3a4e-0f11-4c3b-9a62-0c1b2e3d4f0f"
ROOT_UUID = "0d5a7c2e-3b44-4e6f-8a1b-2c3d4e5f6a70"
# Like Debian's signed GRUB: a monolithic image that loads its config from /EFI/debian.
EFI_MODULES = (
    "all_video boot cat chain configfile echo ext2 fat gzio halt help linux loadenv ls "
    "minicmd normal part_gpt part_msdos probe reboot regexp search search_fs_uuid "
    "search_fs_file search_label sleep test true"
).split()
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


def cache_dir() -> Path:
    return Path(os.environ.get("OTAD_TEST_CACHE", "/var/cache/otad-test"))


def _sh(*argv: str | Path, env: dict[str, str] | None = None) -> None:
    log.info("stock image: %s", " ".join(str(a) for a in argv))
    subprocess.run([str(a) for a in argv], check=True, env=env, stdin=subprocess.DEVNULL)


def _key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def tree_key() -> str:
    return _key(SUITE, MIRROR, VARIANT, *PACKAGES, inspect.getsource(build_tree))


def build_tree(target: Path) -> None:
    """debootstrap a minimal bookworm with a kernel and both GRUB platforms into `target`."""
    _sh(
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        target,
        MIRROR,
    )
    (target / "var/cache/apt/archives").mkdir(exist_ok=True)
    for deb in (target / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def stock_tree() -> Path:
    """The cached debootstrap tree, built on first use."""
    cache = cache_dir()
    final = cache / f"tree-{tree_key()}"
    with _locked(cache):
        if not final.is_dir():
            partial = cache / f".{final.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            build_tree(partial)
            partial.rename(final)
    return final


def image_key() -> str:
    return _key(tree_key(), Path(__file__).read_text())


def stock_image() -> Path:
    """The cached stock cloud-like image (raw, sparse), built on first use."""
    tree = stock_tree()
    cache = cache_dir()
    final = cache / f"stock-{image_key()}.img"
    with _locked(cache):
        if not final.exists():
            with tempfile.TemporaryDirectory(dir=cache) as work:
                partial = Path(work) / "stock.img"
                build_image(tree, partial, Path(work))
                partial.rename(final)
    return final


def build_image(tree: Path, image: Path, work: Path) -> None:
    table = (
        "label: gpt\n"
        f"start={ROOT_START}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={ROOT_PARTUUID}\n"
        f"14: start={BIOS_BOOT[0]}, size={BIOS_BOOT[1]}, "
        "type=21686148-6449-6E6F-744E-656564454649\n"
        f"15: start={ESP[0]}, size={ESP[1]}, "
        f"type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={ESP_PARTUUID}\n"
    )
    root = work / "root.ext4"
    root_bytes = IMAGE_SIZE - ROOT_START * 512 - (1 << 20)
    _sh("mkfs.ext4", "-q", "-U", ROOT_UUID, "-d", tree, root, f"{root_bytes // 1024}k")
    _customize_root(root, work)
    # e2image truncates its output after the filesystem: write the table afterwards.
    _sh("e2image", "-ra", "-O", str(ROOT_START * 512), root, image)
    os.truncate(image, IMAGE_SIZE)
    subprocess.run(["sfdisk", "-q", str(image)], input=table.encode(), check=True)
    esp = work / "esp.img"
    _build_esp(tree, esp, work)
    _sh("dd", f"if={esp}", f"of={image}", "bs=1M", f"seek={ESP[0] * 512}", "oflag=seek_bytes",
        "conv=notrunc,sparse", "status=none")  # fmt: skip


def _customize_root(root: Path, work: Path) -> None:
    """What a cloud image's root has and debootstrap does not: fstab, GRUB config, growroot."""
    mountpoint = work / "root"
    mountpoint.mkdir()
    _sh("mount", "-o", "loop", root, mountpoint)
    try:
        (mountpoint / "etc/fstab").write_text(
            f"PARTUUID={ROOT_PARTUUID} / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1\n"
            f"PARTUUID={ESP_PARTUUID} /boot/efi vfat defaults 0 0\n"
        )
        (mountpoint / "boot/efi").mkdir(parents=True, exist_ok=True)
        (mountpoint / "etc/default").mkdir(exist_ok=True)
        (mountpoint / "etc/default/grub").write_text(
            'GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_CMDLINE_LINUX_DEFAULT=""\n'
            'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200"\n'
        )
        (mountpoint / "etc/cloud/cloud.cfg.d").mkdir(parents=True, exist_ok=True)
        (mountpoint / "etc/hostname").write_text("localhost\n")
        (mountpoint / "boot/grub").mkdir(parents=True, exist_ok=True)
        (mountpoint / "boot/grub/grub.cfg").write_text(
            f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n"
            "menuentry 'Debian GNU/Linux' {\n"
            f"    linux /vmlinuz root=PARTUUID={ROOT_PARTUUID} ro console=ttyS0,115200\n"
            "    initrd /initrd.img\n"
            "}\n"
        )
    finally:
        _sh("umount", mountpoint)


def _build_esp(tree: Path, esp: Path, work: Path) -> None:
    with esp.open("wb") as out:
        out.truncate(ESP[1] * 512)
    _sh("mkfs.vfat", "-F", "16", "-i", "5EC7A1B2", esp)
    efi = work / "grubx64.efi"
    _sh("grub-mkimage", "-O", "x86_64-efi", "-d", tree / "usr/lib/grub/x86_64-efi",
        "-p", "/EFI/debian", "-o", efi, *EFI_MODULES)  # fmt: skip
    chain = work / "grub.cfg"
    chain.write_text(
        f"search.fs_uuid {ROOT_UUID} root\nset prefix=($root)'/boot/grub'\n"
        "configfile $prefix/grub.cfg\n"
    )
    for directory in ("::/EFI", "::/EFI/BOOT", "::/EFI/debian"):
        _sh("mmd", "-i", esp, directory, env=MTOOLS_ENV)
    _sh("mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI", env=MTOOLS_ENV)
    _sh("mcopy", "-i", esp, efi, "::/EFI/debian/grubx64.efi", env=MTOOLS_ENV)
    _sh("mcopy", "-i", esp, chain, "::/EFI/debian/grub.cfg", env=MTOOLS_ENV)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(stock_image())
