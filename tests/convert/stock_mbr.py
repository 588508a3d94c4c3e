"""Builds a BIOS/MBR Debian 12 amd64 image like the Debian installer's default for the tests.

The layout copies a guided "all files in one partition" install on a BIOS machine: an
MBR (dos) table with partition 1 the bootable ext4 root (with /boot inside) from 1 MiB,
and a swap partition as logical partition 5 in an extended partition 2 at the end.
GRUB for BIOS is installed the classic way: boot.img in the MBR and core.img in the gap
before partition 1, loading /boot/grub/grub.cfg from the root. There is no ESP. The root
is the same cached debootstrap tree as tests/convert/stock.py's (so it also has
grub-efi-amd64-bin, which the converter uses to add an EFI path), and the image is
cached beside the GPT one, keyed by the tree and this file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

from tests.convert import stock

log = logging.getLogger(__name__)

IMAGE_SIZE = 1536 << 20
ROOT_START = 2048  # sectors
SWAP_SIZE = 256 << 20
EXTENDED_START = (IMAGE_SIZE - SWAP_SIZE) // 512 - 2048  # sectors: 1 MiB before the swap
SWAP_START = EXTENDED_START + 2048
ROOT_UUID = "3c1f7b52-8e0a-4d6e-9b13-5a7c9e2d4f60"
SWAP_UUID = "3c1f7b52-8e0a-4d6e-9b13-5a7c9e2d4f65"
SWAP_LABEL = "stockswap"
DISK_ID = "0x5e7a11d0"
BIOS_MODULES = "biosdisk part_msdos ext2 normal search search_fs_uuid linux configfile".split()


def image_key() -> str:
    return stock._key(stock.tree_key(), Path(__file__).read_text())


def tree() -> Path:
    """The cached debootstrap tree; without waiting for the cache's lock when it is built."""
    built = stock.cache_dir() / f"tree-{stock.tree_key()}"
    return built if built.is_dir() else stock.stock_tree()


def mbr_image() -> Path:
    """The cached BIOS/MBR image (raw, sparse), built on first use."""
    cache = stock.cache_dir()
    final = cache / f"stock-mbr-{image_key()}.img"
    if final.exists():  # complete: it is renamed into place only when built
        return final
    source = tree()
    with stock._locked(cache):
        if not final.exists():
            with tempfile.TemporaryDirectory(dir=cache) as work:
                partial = Path(work) / "stock-mbr.img"
                build_image(source, partial, Path(work))
                partial.rename(final)
    return final


def build_image(tree: Path, image: Path, work: Path) -> None:
    table = (
        f"label: dos\nlabel-id: {DISK_ID}\nunit: sectors\n\n"
        f"1: start={ROOT_START}, size={EXTENDED_START - ROOT_START}, type=83, bootable\n"
        f"2: start={EXTENDED_START}, size={IMAGE_SIZE // 512 - EXTENDED_START}, type=5\n"
        f"5: start={SWAP_START}, size={SWAP_SIZE // 512}, type=82\n"
    )
    root = work / "root.ext4"
    root_bytes = (EXTENDED_START - ROOT_START) * 512
    stock._sh("mkfs.ext4", "-q", "-U", ROOT_UUID, "-d", tree, root, f"{root_bytes // 1024}k")
    _customize_root(root, work)
    stock._sh("e2image", "-ra", "-O", str(ROOT_START * 512), root, image)
    os.truncate(image, IMAGE_SIZE)
    subprocess.run(["sfdisk", "-q", str(image)], input=table.encode(), check=True)
    swap = work / "swap.img"
    swap.write_bytes(b"")
    swap.chmod(0o600)
    os.truncate(swap, SWAP_SIZE)
    stock._sh("mkswap", "-U", SWAP_UUID, "-L", SWAP_LABEL, swap)
    stock._sh("dd", f"if={swap}", f"of={image}", "bs=1M", f"seek={SWAP_START * 512}",
              "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")  # fmt: skip
    _install_bios_grub(tree, image, work)


def _customize_root(root: Path, work: Path) -> None:
    """What the installer leaves in the root: fstab by UUID with swap, GRUB's config, resume."""
    mountpoint = work / "root"
    mountpoint.mkdir()
    stock._sh("mount", "-o", "loop", root, mountpoint)
    try:
        (mountpoint / "etc/fstab").write_text(
            "# / was on /dev/sda1 during installation\n"
            f"UUID={ROOT_UUID} /               ext4    errors=remount-ro 0       1\n"
            "# swap was on /dev/sda5 during installation\n"
            f"UUID={SWAP_UUID} none            swap    sw              0       0\n"
            "/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto     0       0\n"
        )
        (mountpoint / "etc/default").mkdir(exist_ok=True)
        (mountpoint / "etc/default/grub").write_text(
            'GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
            'GRUB_CMDLINE_LINUX="console=ttyS0,115200"\n'
        )
        resume = mountpoint / "etc/initramfs-tools/conf.d"
        resume.mkdir(parents=True, exist_ok=True)
        (resume / "resume").write_text(f"RESUME=UUID={SWAP_UUID}\n")
        (mountpoint / "etc/hostname").write_text("debian\n")
        (mountpoint / "boot/grub").mkdir(parents=True, exist_ok=True)
        (mountpoint / "boot/grub/grub.cfg").write_text(
            f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n"
            "menuentry 'Debian GNU/Linux' {\n"
            f"    linux /vmlinuz root=UUID={ROOT_UUID} ro quiet console=ttyS0,115200\n"
            "    initrd /initrd.img\n"
            "}\n"
        )
    finally:
        stock._sh("umount", mountpoint)


def _install_bios_grub(tree: Path, image: Path, work: Path) -> None:
    """boot.img into the MBR, core.img into the gap and the modules into /boot/grub/i386-pc,
    as grub-install does on BIOS."""
    modules = tree / "usr/lib/grub/i386-pc"
    whole = _attach(image)
    try:
        part = _attach(image, ROOT_START * 512, (EXTENDED_START - ROOT_START) * 512)
        try:
            mountpoint = work / "installed"
            mountpoint.mkdir()
            stock._sh("mount", part, mountpoint)
            try:
                grub_dir = mountpoint / "boot/grub/i386-pc"
                stock._sh("cp", "-r", modules, grub_dir)
                stock._sh("grub-mkimage", "-O", "i386-pc", "-d", modules,
                          "-p", "(hd0,msdos1)/boot/grub", "-o", grub_dir / "core.img",
                          *BIOS_MODULES)  # fmt: skip
                # grub-bios-setup guesses a root device from the directory holding core.img.
                (work / "device.map").write_text(f"(hd0) {whole}\n(hd1) {part}\n")
                stock._sh(modules / "grub-bios-setup", "--skip-fs-probe", "-d", grub_dir,
                          "-m", work / "device.map", whole)  # fmt: skip
            finally:
                stock._sh("umount", mountpoint)
        finally:
            stock._sh("losetup", "--detach", part)
    finally:
        stock._sh("losetup", "--detach", whole)


def _attach(image: Path, offset: int = 0, size: int | None = None) -> str:
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    result = subprocess.run([*argv, str(image)], capture_output=True, text=True, check=True)
    return result.stdout.strip()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(mbr_image())
