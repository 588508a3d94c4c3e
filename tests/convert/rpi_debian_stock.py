"""Builds a small image laid out like Debian's own Raspberry Pi images (raspi.debian.net).

Those images (salsa.debian.org/raspi-team/image-specs) differ from Raspberry Pi OS: the
MBR's partition 1 is a FAT labelled RASPIFIRM, mounted at /boot/firmware, partition 2 an
ext4 labelled RASPIROOT; fstab names both by LABEL=, cmdline.txt boots
root=LABEL=RASPIROOT without init=. Debian's raspi-firmware package writes the boot
partition: its kernel and initramfs hooks copy the kernel, the initrd and the DTBs into
/boot/firmware and rewrite config.txt (kernel=vmlinuz-..., initramfs initrd.img-...)
and cmdline.txt, whose root= is ROOTPART from /etc/default/raspi-firmware (image-specs
sets LABEL=RASPIROOT there). First-boot units: rpi-set-sysconf.service (applies
/boot/firmware/sysconf.txt), rpi-generate-ssh-host-keys.service,
rpi-reconfigure-raspi-firmware.service (reruns the hook) and, in images built before
May 2021, rpi-resizerootfs.service, which grows partition 2 (newer images do that from
their initrd; see the converter's TODO).

The hooks and /etc/default/raspi-firmware are the real ones: Debian bookworm's
raspi-firmware .deb (non-free-firmware) is downloaded once with a private apt and
unpacked into the root with dpkg-deb (not registered with dpkg: its dependency
dosfstools is not in the tree, and an unmet dependency would stop the converter's apt).
The hook runs in a chroot of the root (qemu-user-static) to write config.txt and
cmdline.txt, then image-specs' edits are applied, as its recipe does. The kernel, the
initrd, the DTBs and the first-boot programs are stand-ins. The root is the Raspberry
Pi OS-like test image's debootstrap tree (tests/convert/rpi_stock.py), reused from
the cache; the image is cached under $OTAD_TEST_CACHE, keyed by what builds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from convert import emulation
from tests.convert import rpi_stock, stock

log = logging.getLogger(__name__)

ARCHITECTURE = "arm64"
DISK_ID = "a1b2c3d4"
IMAGE_SIZE = 900 << 20
BOOT = (8192, 131072)  # image-specs: from 4 MiB; here a 64 MiB FAT32
ROOT_START = BOOT[0] + BOOT[1]
ROOT_UUID = "3b0c6f7e-8d1a-4e2b-9f3c-5a6b7c8d9e0f"
BOOT_SERIAL = "5A4B3C2D"
BOOT_LABEL = "RASPIFIRM"
ROOT_LABEL = "RASPIROOT"
KERNEL_VERSION = "6.1.0-28-arm64"
FIRMWARE_PACKAGE = "raspi-firmware"
FIRMWARE_COMPONENT = "non-free-firmware"
SERIAL_CONSOLE = "ttyS1,115200"  # image-specs' for the Pi 3 and 4
HOOK = "etc/kernel/postinst.d/z50-raspi-firmware"
FSTAB = (
    "# The root file system has fs_passno=1 as per fstab(5) for automatic fsck.\n"
    f"LABEL={ROOT_LABEL} / ext4 rw 0 1\n"
    "# All other file systems have fs_passno=2 as per fstab(5) for automatic fsck.\n"
    f"LABEL={BOOT_LABEL} /boot/firmware vfat rw 0 2\n"
)
SYSCONF = (
    "# Stand-in of image-specs' sysconf.txt: key=value lines, applied at the next boot\n"
    "# by rpi-set-sysconf and then rewritten without them.\n"
    "#root_pw=FooBar\n#root_authorized_key=\n#hostname=rpi\n"
)
UNITS = {
    "rpi-set-sysconf.service": (
        "[Unit]\nDescription=Set up system configuration\n"
        "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/rpi-set-sysconf\n"
        "[Install]\nRequiredBy=basic.target\n",
        "basic.target.requires",
    ),
    "rpi-generate-ssh-host-keys.service": (
        "[Unit]\nDescription=generate SSH host keys\n"
        "ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key\n"
        "[Service]\nType=oneshot\n"
        "ExecStart=/usr/sbin/dpkg-reconfigure -fnoninteractive openssh-server\n"
        "[Install]\nRequiredBy=multi-user.target\n",
        "multi-user.target.requires",
    ),
    "rpi-reconfigure-raspi-firmware.service": (
        "[Unit]\nDescription=Reconfigure raspi-firmware to regenerate config.txt\n"
        "Before=sysinit.target\nDefaultDependencies=no\nRequiresMountsFor=/boot/firmware\n"
        "[Service]\nType=oneshot\nExecStart=/usr/sbin/dpkg-reconfigure raspi-firmware\n"
        "ExecStart=/bin/systemctl --no-reload disable %n\n"
        "[Install]\nRequiredBy=sysinit.target\n",
        "multi-user.target.requires",
    ),
    "rpi-resizerootfs.service": (  # images before May 2021
        "[Unit]\nDescription=resize root file system\nBefore=local-fs-pre.target\n"
        "DefaultDependencies=no\n"
        "[Service]\nType=oneshot\nExecStart=/usr/sbin/rpi-resizerootfs\n"
        "[Install]\nRequiredBy=local-fs-pre.target\n",
        "local-fs-pre.target.requires",
    ),
}
PROGRAMS = {
    "usr/local/sbin/rpi-set-sysconf": (
        "#!/bin/sh\n# Stand-in: applies the key=value lines of /boot/firmware/sysconf.txt\n"
        'conf=/boot/firmware/sysconf.txt\n[ -r "$conf" ] || exit 0\n'
        "grep -v '^#' \"$conf\" | grep '=' > /run/rpi-sysconf.applied || true\n"
    ),
    "usr/sbin/rpi-resizerootfs": "#!/bin/sh\n# Stand-in: grows partition 2 to the disk's end\n",
}


def firmware_deb() -> Path:
    """Debian bookworm's raspi-firmware .deb, downloaded once with a private apt."""
    final = stock.cache_dir() / (
        f"raspi-firmware-{stock._key(rpi_stock.SUITE, rpi_stock.MIRROR, FIRMWARE_COMPONENT)}"
    )
    with rpi_stock._building(final) as scratch:
        if scratch is not None:
            archives = scratch / "result"
            for directory in (archives / "partial", scratch / "lists/partial"):
                directory.mkdir(parents=True)
            (scratch / "sources.list").write_text(
                f"deb {rpi_stock.MIRROR} {rpi_stock.SUITE} {FIRMWARE_COMPONENT}\n"
            )
            settings = {
                "Dir::Etc::SourceList": scratch / "sources.list",
                "Dir::Etc::SourceParts": scratch / "none",
                "Dir::State::Lists": scratch / "lists",
                "Dir::State::status": "/dev/null",
                "Dir::Cache::archives": archives,
                "Dir::Cache::pkgcache": "",
                "Dir::Cache::srcpkgcache": "",
                "APT::Architecture": ARCHITECTURE,
                "Debug::NoLocking": "1",
                "APT::Sandbox::User": "root",
            }
            options = [w for key, value in settings.items() for w in ("-o", f"{key}={value}")]
            rpi_stock._sh("apt-get", *options, "update", "-qq")
            subprocess.run(["apt-get", *map(str, options), "download", FIRMWARE_PACKAGE],
                           cwd=archives, check=True, stdin=subprocess.DEVNULL)  # fmt: skip
            shutil.rmtree(archives / "partial")
    debs = sorted(final.glob(f"{FIRMWARE_PACKAGE}_*.deb"))
    assert len(debs) == 1, f"{final} should hold one {FIRMWARE_PACKAGE} .deb: {debs}"
    return debs[0]


def image_key() -> str:
    return stock._key(
        rpi_stock.tree_key(ARCHITECTURE), firmware_deb().name, Path(__file__).read_text()
    )


def debian_pi_image() -> Path:
    """The cached Debian-Pi-like arm64 image (raw, sparse)."""
    tree = rpi_stock.pi_tree(ARCHITECTURE)
    deb = firmware_deb()
    final = stock.cache_dir() / f"debian-pi-{ARCHITECTURE}-{image_key()}.img"
    with rpi_stock._building(final) as scratch:
        if scratch is not None:
            build_image(tree, deb, scratch / "result", scratch)
    return final


def build_image(tree: Path, deb: Path, image: Path, work: Path) -> None:
    root = work / "root.ext4"
    root_bytes = IMAGE_SIZE - ROOT_START * 512
    rpi_stock._sh("mkfs.ext4", "-q", "-U", ROOT_UUID, "-L", ROOT_LABEL, "-d", tree, root,
                  f"{root_bytes // 1024}k")  # fmt: skip
    boot_content = work / "bootfs"
    _customize_root(root, deb, work, boot_content)
    rpi_stock._sh("e2image", "-ra", "-O", str(ROOT_START * 512), root, image)
    os.truncate(image, IMAGE_SIZE)
    table = (
        f"label: dos\nlabel-id: 0x{DISK_ID}\n"
        f"start={BOOT[0]}, size={BOOT[1]}, type=c\nstart={ROOT_START}, type=83\n"
    )
    subprocess.run(["sfdisk", "-q", str(image)], input=table.encode(), check=True)
    boot = work / "boot.vfat"
    with boot.open("wb") as out:
        out.truncate(BOOT[1] * 512)
    rpi_stock._sh("mkfs.vfat", "-F", "32", "-n", BOOT_LABEL, "-i", BOOT_SERIAL, boot)
    for child in sorted(boot_content.iterdir()):
        rpi_stock._sh("mcopy", "-s", "-i", boot, child, "::/", env=rpi_stock.MTOOLS_ENV)
    rpi_stock._sh("dd", f"if={boot}", f"of={image}", "bs=1M", f"seek={BOOT[0] * 512}",
                  "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")  # fmt: skip


def blob(name: str, size: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def stand_in_kernel_files() -> dict[str, bytes]:
    """The kernel package's files the hook reads: kernel, initrd and DTBs (stand-ins)."""
    dtbs = f"usr/lib/linux-image-{KERNEL_VERSION}/broadcom"
    return {
        f"boot/vmlinuz-{KERNEL_VERSION}": blob("vmlinuz", 400_000),
        f"{dtbs}/bcm2711-rpi-4-b.dtb": blob("bcm2711-rpi-4-b", 50_000),
        f"{dtbs}/bcm2837-rpi-3-b.dtb": blob("bcm2837-rpi-3-b", 30_000),
    }


# What image-specs' initrd holds of its first-boot resize: initramfs-tools' ORDER runs
# the local-bottom script, which grows partition 2 to the end of the disk.
INITRD_FILES = {
    "init": "#!/bin/sh\n# stand-in of initramfs-tools' init\n",
    "scripts/local-bottom/ORDER": (
        '/scripts/local-bottom/rpi-resizerootfs "$@"\n'
        "[ -e /conf/param.conf ] && . /conf/param.conf\n"
    ),
    "scripts/local-bottom/rpi-resizerootfs": (
        "#!/bin/sh\n# stand-in: parted resizepart 2 100%, resize2fs\nexit 0\n"
    ),
    "conf/initramfs.conf": "MODULES=most\nCOMPRESS=zstd\n",
}


def build_initrd(work: Path) -> bytes:
    """A zstd-compressed newc cpio archive, as bookworm's update-initramfs makes them."""
    tree = work / "initrd"
    for name, text in INITRD_FILES.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
        (tree / name).chmod(0o755 if text.startswith("#!") else 0o644)
    names = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*"))
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "--reproducible", "--owner=0:0"],
        cwd=tree, input="\n".join(names).encode(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    return subprocess.run(["zstd", "-q", "-c"], input=archive, capture_output=True,
                          check=True).stdout  # fmt: skip


def _customize_root(root: Path, deb: Path, work: Path, boot_content: Path) -> None:
    """raspi-firmware, its hook run as on install, image-specs' files and edits; the boot
    partition's files moved out of /boot/firmware into `boot_content`."""
    mountpoint = work / "root"
    mountpoint.mkdir()
    rpi_stock._sh("mount", "-o", "loop", root, mountpoint)
    try:
        # Unpacked beside the root, then copied in: tar would replace the usrmerge link
        # /lib by the package's directory lib/.
        unpacked = work / "deb"
        rpi_stock._sh("dpkg-deb", "-x", deb, unpacked)
        for top, inside in (("etc", "etc"), ("usr", "usr"), ("lib", "usr/lib")):
            if (unpacked / top).is_dir():
                rpi_stock._sh("cp", "-a", f"{unpacked / top}/.", mountpoint / inside)
        for name, data in stand_in_kernel_files().items():
            (mountpoint / name).parent.mkdir(parents=True, exist_ok=True)
            (mountpoint / name).write_bytes(data)
        (mountpoint / f"boot/initrd.img-{KERNEL_VERSION}").write_bytes(build_initrd(work))
        firmware = mountpoint / "boot/firmware"
        firmware.mkdir(parents=True, exist_ok=True)
        for blob_file in (mountpoint / "usr/lib/raspi-firmware").iterdir():  # the postinst
            shutil.copy(blob_file, firmware / blob_file.name)
        _run_hook(mountpoint)
        _apply_image_specs_edits(mountpoint)
        (mountpoint / "etc/fstab").write_text(FSTAB)
        (mountpoint / "etc/hostname").write_text("rpi_4-20241109\n")
        units = mountpoint / "etc/systemd/system"
        for unit, (text, wanted_by) in UNITS.items():
            (units / unit).write_text(text)
            (units / wanted_by).mkdir(parents=True, exist_ok=True)
            (units / wanted_by / unit).symlink_to(f"/etc/systemd/system/{unit}")
        for name, text in PROGRAMS.items():
            (mountpoint / name).parent.mkdir(parents=True, exist_ok=True)
            (mountpoint / name).write_text(text)
            (mountpoint / name).chmod(0o755)
        (firmware / "sysconf.txt").write_text(SYSCONF)
        shutil.copytree(firmware, boot_content)
        for child in firmware.iterdir():
            child.unlink()
    finally:
        rpi_stock._sh("umount", mountpoint)


def _run_hook(root: Path) -> None:
    """The raspi-firmware kernel hook in a chroot of `root`, as its postinst runs it."""
    emulation.enable(ARCHITECTURE, root)
    (root / "proc").mkdir(exist_ok=True)
    rpi_stock._sh("mount", "-t", "proc", "proc", root / "proc")
    try:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEB_MAINT_PARAMS": "configure"}
        rpi_stock._sh("chroot", root, f"/{HOOK}", env=env)
    finally:
        rpi_stock._sh("umount", root / "proc")


def _apply_image_specs_edits(root: Path) -> None:
    """What image-specs' recipe does after the packages: serial console, root by label."""
    cmdline = root / "boot/firmware/cmdline.txt"
    words = []
    for word in cmdline.read_text().split():
        if word.startswith("root="):
            words += [f"console={SERIAL_CONSOLE}", f"root=LABEL={ROOT_LABEL}"]
        elif not word.startswith("cma="):  # removed for the Pi 4
            words.append(word)
    cmdline.write_text(" ".join(words) + "\n")
    default = root / "etc/default/raspi-firmware"
    lines = [
        f"ROOTPART=LABEL={ROOT_LABEL}" if line.startswith("#ROOTPART=") else line
        for line in default.read_text().splitlines()
    ]
    default.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(debian_pi_image())
