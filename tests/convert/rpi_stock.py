"""Builds small Raspberry Pi OS-like images (arm64, armhf) for the converter's tests.

The layout copies Raspberry Pi OS bookworm: an MBR, partition 1 a FAT32 "bootfs" from
sector 8192 (config.txt, cmdline.txt with the firstboot init=, a stand-in kernel, DTBs
and overlays, Raspberry Pi Imager's first-boot files), partition 2 the ext4 root, whose
fstab mounts partition 1 at /boot/firmware. The root is a debootstrap minbase of the
architecture with systemd, D-Bus and Python as Raspberry Pi OS Lite has them (first
stage on the host, second stage under qemu-user-static: a few minutes, once), with
stand-ins of the first-boot hooks of Raspberry Pi OS (firstboot, init_resize.sh,
resize2fs_once, userconfig) and of Debian's Pi images (rpi-resizerootfs). Trees,
images and the packages otad needs on the architecture are cached under
$OTAD_TEST_CACHE, keyed by what builds them. FAT is written with mtools only.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from convert import emulation
from tests.convert import stock

log = logging.getLogger(__name__)

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DISK_ID = "4e639091"
IMAGE_SIZE = 900 << 20
BOOT = (8192, 131072)  # start and size in sectors: a 64 MiB FAT32
ROOT_START = BOOT[0] + BOOT[1]
ROOT_UUID = "7a1c8d40-2b3e-4f5a-9c6d-1e2f3a4b5c6d"
BOOT_SERIAL = "BC4A1F2E"
# What Raspberry Pi OS Lite has and minbase lacks, among what otad needs: an image with
# systemd, D-Bus and Python, so that a conversion installs only otad's own libraries.
PACKAGES = ("systemd-sysv", "dbus", "python3", "fdisk", "e2fsprogs")
KERNELS = {"arm64": "kernel8.img", "armhf": "kernel7l.img"}
CMDLINE = (
    f"console=serial0,115200 console=tty1 root=PARTUUID={DISK_ID}-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot splash "
    "plymouth.ignore-serial-consoles systemd.run=/boot/firmware/firstrun.sh "
    "systemd.run_success_action=reboot systemd.unit=kernel-command-line.target\n"
)
# What Raspberry Pi Imager leaves on the boot partition for the first boot.
USER_FILES = {
    "firstrun.sh": "#!/bin/bash\n# Imager's customisation: hostname, user, Wi-Fi, keys\n",
    "userconf.txt": "pi:$6$stand-in$hash\n",
    "ssh": "",
    "user-data": "#cloud-config\nhostname: pi-test\n",
    "meta-data": "instance-id: pi-test\n",
}
STAND_INS = {
    "usr/lib/raspberrypi-sys-mods/firstboot": "#!/bin/sh\n# resizes the root, new disk id\n",
    "usr/lib/raspi-config/init_resize.sh": "#!/bin/sh\n# grows the root partition\n",
    "etc/init.d/resize2fs_once": "#!/bin/sh\n### BEGIN INIT INFO\n# resize2fs on first boot\n",
    "usr/sbin/rpi-resizerootfs": "#!/bin/sh\n# Debian's Pi images: grow the root\n",
    "lib/systemd/system/rpi-resizerootfs.service": (
        "[Unit]\nDescription=resize root filesystem to fill partition\n"
        "[Service]\nType=oneshot\nExecStart=/usr/sbin/rpi-resizerootfs\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
    "usr/lib/userconf-pi/userconf": "#!/bin/sh\n# creates the user from userconf.txt\n",
    "lib/systemd/system/userconfig.service": (
        "[Unit]\nDescription=User configuration dialog\n"
        "ConditionPathExists=/boot/firmware/userconf.txt\n"
        "[Service]\nType=oneshot\nExecStart=/usr/lib/userconf-pi/userconf\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
}
ENABLED = {
    "etc/rc3.d/S01resize2fs_once": "../init.d/resize2fs_once",
    "etc/systemd/system/multi-user.target.wants/rpi-resizerootfs.service": (
        "/lib/systemd/system/rpi-resizerootfs.service"
    ),
    "etc/systemd/system/multi-user.target.wants/userconfig.service": (
        "/lib/systemd/system/userconfig.service"
    ),
}
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


def _sh(*argv: str | Path, env: dict[str, str] | None = None) -> None:
    log.info("pi image: %s", " ".join(str(a) for a in argv))
    subprocess.run([str(a) for a in argv], check=True, env=env, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path | None]:
    """A scratch path that becomes `final` if the block succeeds (None: already built)."""
    if final.exists():  # without the cache's lock, which a long build elsewhere may hold
        yield None
        return
    with stock._locked(final.parent):
        if final.exists():
            yield None
            return
        scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            yield scratch
            (scratch / "result").rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def tree_key(architecture: str) -> str:
    return stock._key(SUITE, MIRROR, architecture, *PACKAGES, inspect.getsource(build_tree))


def build_tree(target: Path, architecture: str) -> None:
    """debootstrap minbase for `architecture`: the second stage runs under qemu-user-static."""
    _sh("debootstrap", f"--arch={architecture}", "--foreign", "--variant=minbase",
        f"--include={','.join(PACKAGES)}", SUITE, target, MIRROR)  # fmt: skip
    emulation.enable(architecture, target)
    _sh("chroot", target, "/debootstrap/debootstrap", "--second-stage")
    for deb in (target / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def pi_tree(architecture: str) -> Path:
    final = stock.cache_dir() / f"pi-tree-{architecture}-{tree_key(architecture)}"
    with _building(final) as scratch:
        if scratch is not None:
            build_tree(scratch / "result", architecture)
    return final


def image_key(architecture: str) -> str:
    return stock._key(tree_key(architecture), Path(__file__).read_text())


def pi_image(architecture: str) -> Path:
    """The cached Raspberry Pi OS-like image for `architecture` (raw, sparse)."""
    tree = pi_tree(architecture)
    final = stock.cache_dir() / f"pi-{architecture}-{image_key(architecture)}.img"
    with _building(final) as scratch:
        if scratch is not None:
            build_image(tree, scratch / "result", scratch, architecture)
    return final


def build_image(tree: Path, image: Path, work: Path, architecture: str) -> None:
    root = work / "root.ext4"
    root_bytes = IMAGE_SIZE - ROOT_START * 512
    _sh("mkfs.ext4", "-q", "-U", ROOT_UUID, "-L", "rootfs", "-d", tree, root,
        f"{root_bytes // 1024}k")  # fmt: skip
    _customize_root(root, work)
    _sh("e2image", "-ra", "-O", str(ROOT_START * 512), root, image)
    os.truncate(image, IMAGE_SIZE)
    table = (
        f"label: dos\nlabel-id: 0x{DISK_ID}\n"
        f"start={BOOT[0]}, size={BOOT[1]}, type=c\nstart={ROOT_START}, type=83\n"
    )
    subprocess.run(["sfdisk", "-q", str(image)], input=table.encode(), check=True)
    boot = work / "boot.vfat"
    build_boot(boot, work, architecture)
    _sh("dd", f"if={boot}", f"of={image}", "bs=1M", f"seek={BOOT[0] * 512}",
        "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")  # fmt: skip


def _customize_root(root: Path, work: Path) -> None:
    """fstab as Raspberry Pi OS has it, and stand-ins of its first-boot hooks."""
    mountpoint = work / "root"
    mountpoint.mkdir()
    _sh("mount", "-o", "loop", root, mountpoint)
    try:
        (mountpoint / "etc/fstab").write_text(
            "proc            /proc           proc    defaults          0       0\n"
            f"PARTUUID={DISK_ID}-01  /boot/firmware  vfat    defaults          0       2\n"
            f"PARTUUID={DISK_ID}-02  /               ext4    defaults,noatime  0       1\n"
        )
        (mountpoint / "boot/firmware").mkdir(parents=True, exist_ok=True)
        (mountpoint / "etc/cloud/cloud.cfg.d").mkdir(parents=True, exist_ok=True)
        (mountpoint / "etc/hostname").write_text("raspberrypi\n")
        for name, text in STAND_INS.items():
            path = mountpoint / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755 if text.startswith("#!") else 0o644)
        for name, target in ENABLED.items():
            (mountpoint / name).parent.mkdir(parents=True, exist_ok=True)
            (mountpoint / name).symlink_to(target)
    finally:
        _sh("umount", mountpoint)


def boot_files(architecture: str) -> dict[str, bytes]:
    """The stock boot partition's files by path: fixed content, stand-in binaries."""
    kernel = KERNELS[architecture]

    def blob(name: str, size: int) -> bytes:
        seed = hashlib.sha256(name.encode()).digest()
        return (seed * (size // len(seed) + 1))[:size]

    files = {
        "config.txt": (
            "# For more options and information see http://rptl.io/configtxt\n"
            "dtparam=audio=on\ncamera_auto_detect=1\ndisplay_auto_detect=1\n"
            "auto_initramfs=1\ndtoverlay=vc4-kms-v3d\nmax_framebuffers=2\n"
            f"arm_64bit={1 if architecture == 'arm64' else 0}\n"
            "[cm4]\notg_mode=1\n[all]\n"
        ).encode(),
        "cmdline.txt": CMDLINE.encode(),
        kernel: blob(kernel, 300_000),
        kernel.replace("kernel", "initramfs").removesuffix(".img"): blob("initramfs", 90_000),
        "bcm2711-rpi-4-b.dtb": blob("bcm2711", 55_000),
        "bcm2712-rpi-5-b.dtb": blob("bcm2712", 75_000),
        "overlays/vc4-kms-v3d.dtbo": blob("vc4", 3_000),
        "overlays/README": b"overlays\n",
        "start4.elf": blob("start4", 200_000),
        "fixup4.dat": blob("fixup4", 5_000),
        "issue.txt": b"Raspberry Pi reference 2024-11-19 (stand-in)\n",
    }
    files.update({name: text.encode() for name, text in USER_FILES.items()})
    return files


def build_boot(boot: Path, work: Path, architecture: str) -> None:
    with boot.open("wb") as out:
        out.truncate(BOOT[1] * 512)
    _sh("mkfs.vfat", "-F", "32", "-s", "1", "-n", "bootfs", "-i", BOOT_SERIAL, boot)
    content = work / "bootfs"
    for name, data in boot_files(architecture).items():
        (content / name).parent.mkdir(parents=True, exist_ok=True)
        (content / name).write_bytes(data)
    for child in sorted(content.iterdir()):
        _sh("mcopy", "-s", "-i", boot, child, "::/", env=MTOOLS_ENV)


def dependency_debs(deb: Path, architecture: str) -> list[Path]:
    """What `deb` needs on `architecture` beyond the tree, downloaded once with a private apt.

    apt resolves against the tree's dpkg status and package lists of the architecture,
    kept in the cache (the host's apt configuration is not changed).
    """
    tree = pi_tree(architecture)
    depends = subprocess.run(
        ["dpkg-deb", "--field", deb, "Pre-Depends", "Depends"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    final = stock.cache_dir() / f"pi-debs-{architecture}-{stock._key(depends, tree.name)}"
    with _building(final) as scratch:
        if scratch is not None:
            archives = scratch / "result"
            for directory in (archives / "partial", scratch / "lists/partial"):
                directory.mkdir(parents=True)
            (scratch / "sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
            shutil.copy(tree / "var/lib/dpkg/status", scratch / "status")
            settings = {
                "Dir::Etc::SourceList": scratch / "sources.list",
                "Dir::Etc::SourceParts": scratch / "none",
                "Dir::State::Lists": scratch / "lists",
                "Dir::State::status": scratch / "status",
                "Dir::Cache::archives": archives,
                "Dir::Cache::pkgcache": "",
                "Dir::Cache::srcpkgcache": "",
                "APT::Architecture": architecture,
                "APT::Architectures::": architecture,
                "Debug::NoLocking": "1",
            }
            options = [w for key, value in settings.items() for w in ("-o", f"{key}={value}")]
            _sh("apt-get", *options, "update", "-qq")
            _sh("apt-get", *options, "install", "--download-only", "--yes",
                "--no-install-recommends", deb.resolve())  # fmt: skip
            shutil.rmtree(archives / "partial")
            (archives / "lock").unlink(missing_ok=True)
    return sorted(p for p in final.glob("*.deb") if not p.name.startswith("otad_"))


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    print(pi_image(sys.argv[1] if len(sys.argv) > 1 else "arm64"))
