"""Changes inside the root filesystem, made through a loop mount of the work copy.

fstab names the slot-independent mounts (ESP, data partition) by PARTUUID and the root
as /dev/root, whichever slot booted; nothing grows the root any more, a first-boot
unit grows the data partition instead; /etc/otad holds otad.conf and the trusted keys;
--deb packages are installed with dpkg in a chroot and --overlay trees copied in with
ownership, links, ACLs, xattrs and file capabilities.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from convert.errors import AlreadyConverted, ImageError, NotSupportedYet, PackageFailed
from convert.layout import Plan
from convert.mounts import chroot_mounts
from otad.errors import UsageError
from otad.process import run

log = logging.getLogger(__name__)

OTAD_CONF = Path("etc/otad/otad.conf")
KEYS_DIR = Path("etc/otad/keys")
DATA_MOUNT = "/data"
DATA_DIR = "/data/otad"
ESP_MOUNT = "/boot/efi"
ENV_DIR = "EFI/otad"  # on the ESP
GROW_UNIT = "otad-grow-data.service"
GROW_SCRIPT = Path("usr/local/lib/otad/otad-grow-data")
ELF_MACHINES = {0x3E: "amd64", 0xB7: "arm64", 0x28: "armhf", 0x03: "i386", 0xF3: "riscv64"}
_CMDLINE = re.compile(r"^\s*GRUB_CMDLINE_LINUX(?:_DEFAULT)?=(.*)$", re.MULTILINE)
_STAGING = "tmp/otad-convert-debs"  # in the root, while --deb packages install
UPDATE_INITRAMFS_CONF = Path("etc/initramfs-tools/update-initramfs.conf")
_INITRAMFS_PACKAGES = ("initramfs-tools", "initramfs-tools-core")  # own that conffile
_INITRAMFS_DEFERRED = "update-initramfs: Not updating initramfs."  # what the trigger says
_SAFE_ARG = re.compile(r"[A-Za-z0-9_./,:+=@-]+")


@dataclass(frozen=True)
class Kernel:
    """How GRUB finds a slot's kernel and initrd, as paths inside the slot."""

    kernel: str
    initrd: str | None
    arguments: str


# Everything the converter writes into the root, or reads from it as root on the host:
# none of it may be a symbolic link, which the host would resolve outside the image.
WRITTEN_PATHS = (
    "etc", "etc/fstab", "etc/growroot-disabled", "etc/default", "etc/otad", "etc/otad/keys",
    "etc/otad/otad.conf", "etc/cloud", "etc/cloud/cloud.cfg.d", "etc/systemd",
    "etc/systemd/system", "etc/systemd/system/local-fs.target.wants",
    f"etc/systemd/system/{GROW_UNIT}", "usr", "usr/local", "usr/local/lib",
    "usr/local/lib/otad", str(GROW_SCRIPT), "usr/sbin", "usr/sbin/policy-rc.d", "usr/lib",
    "usr/lib/grub", "usr/lib/grub/i386-pc", "tmp", "boot", "boot/efi", "data",
    "etc/otad/watchdog", "etc/systemd/system.conf.d", "etc/initramfs-tools",
    str(UPDATE_INITRAMFS_CONF),
    "etc/systemd/system.conf.d/50-otad-watchdog.conf",
)  # fmt: skip


def check_convertible(root: Path) -> None:
    """Refuse a root otad already runs on, one for another architecture, or one with links
    where the converter writes."""
    for relative in WRITTEN_PATHS:
        if (root / relative).is_symlink():
            raise ImageError(
                f"/{relative} in the root filesystem is a symbolic link; otad-convert writes "
                "there and does not follow links that could lead out of the image"
            )
    if (root / OTAD_CONF).exists():
        raise AlreadyConverted(f"the root filesystem already has /{OTAD_CONF}")
    machine = _elf_machine(root / "usr/bin/dpkg")
    if machine != "amd64":
        raise NotSupportedYet(f"the root filesystem is for {machine}; only amd64 is supported yet")


def _elf_machine(binary: Path) -> str:
    try:
        header = binary.read_bytes()[:20]
    except OSError:
        return "an unknown architecture (no /usr/bin/dpkg)"
    if header[:4] != b"\x7fELF":
        return "an unknown architecture (/usr/bin/dpkg is not ELF)"
    number = int.from_bytes(header[18:20], "little")
    return ELF_MACHINES.get(number, f"ELF machine {number:#x}")


def find_kernel(root: Path) -> Kernel:
    """The slot's kernel: Debian's /vmlinuz link when present, so new kernels need no edit."""
    for kernel, initrd in (("vmlinuz", "initrd.img"), ("boot/vmlinuz", "boot/initrd.img")):
        if (root / kernel).is_symlink() or (root / kernel).is_file():
            found = (
                f"/{initrd}" if (root / initrd).exists() or (root / initrd).is_symlink() else None
            )
            return Kernel(f"/{kernel}", found, kernel_arguments(root))
    versions = sorted((root / "boot").glob("vmlinuz-*"))
    if not versions:
        raise NotSupportedYet("the root filesystem has no kernel (/vmlinuz or /boot/vmlinuz-*)")
    newest = versions[-1]
    newest_initrd = root / "boot" / newest.name.replace("vmlinuz", "initrd.img", 1)
    # TODO: follow kernel upgrades inside a slot when the image has no /vmlinuz link.
    log.warning(
        "no /vmlinuz link: the boot entries name %s, a new kernel needs a new entry", newest
    )
    return Kernel(
        f"/boot/{newest.name}",
        f"/boot/{newest_initrd.name}" if newest_initrd.exists() else None,
        kernel_arguments(root),
    )


def kernel_arguments(root: Path) -> str:
    """`ro` and the stock GRUB_CMDLINE_LINUX(_DEFAULT) words GRUB can take literally."""
    words = ["ro"]
    default = root / "etc/default/grub"
    sources = [default] if default.exists() else []
    sources += sorted((root / "etc/default/grub.d").glob("*.cfg"))
    for source in sources:
        for value in _CMDLINE.findall(source.read_text(errors="replace")):
            try:
                parts = shlex.split(value, comments=True)
            except ValueError:
                continue
            for word in " ".join(parts).split():
                if not _SAFE_ARG.fullmatch(word) or word.startswith(("root=", "otad.slot=")):
                    log.warning("kernel argument %r from %s is left out", word, source)
                elif word not in words:
                    words.append(word)
    return " ".join(words)


def rewrite_fstab(root: Path, plan: Plan) -> None:
    """Name the ESP and data partition by PARTUUID, the root as /dev/root, drop growfs."""
    path = root / "etc/fstab"
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for line in lines:
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            kept.append(line)
            continue
        mountpoint = fields[1]
        if mountpoint in ("/", ESP_MOUNT, DATA_MOUNT):
            continue
        kept.append(line)
    root_options = _options_of(lines, "/") or "defaults"
    esp_options = _options_of(lines, ESP_MOUNT) or "umask=0077"
    entries = [
        "# Written by otad-convert: the root is the slot the bootloader chose.",
        f"/dev/root {'/':<10} ext4 {root_options} 0 1",
        f"PARTUUID={plan.esp.uuid} {ESP_MOUNT:<10} vfat {esp_options} 0 2",
        f"PARTUUID={plan.data.uuid} {DATA_MOUNT:<10} ext4 defaults 0 2",
    ]
    path.write_text("\n".join([*entries, *kept]) + "\n")
    (root / ESP_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / DATA_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)


def _options_of(lines: list[str], mountpoint: str) -> str | None:
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and not fields[0].startswith("#") and fields[1] == mountpoint:
            options = [o for o in fields[3].split(",") if o != "x-systemd.growfs"]
            return ",".join(options) or None
    return None


def disable_root_growth(root: Path) -> None:
    """Stop cloud-init and cloud-initramfs-growroot from growing the root partition."""
    (root / "etc/growroot-disabled").write_text("")
    cloud = root / "etc/cloud/cloud.cfg.d"
    if (root / "etc/cloud").is_dir():
        cloud.mkdir(parents=True, exist_ok=True)
        (cloud / "90-otad-no-growroot.cfg").write_text(
            "# Written by otad-convert: the slots keep their size; the data partition grows.\n"
            "growpart:\n  mode: 'off'\nresize_rootfs: false\n"
        )
    for unit in ("systemd-growfs-root.service", "systemd-repart.service"):
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def install_data_growth(root: Path) -> None:
    """Ship and enable the first-boot unit that grows the data partition."""
    data = importlib.resources.files("convert") / "data"
    script = root / GROW_SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_bytes((data / "otad-grow-data").read_bytes())
    script.chmod(0o755)
    units = root / "etc/systemd/system"
    (units / GROW_UNIT).write_bytes((data / GROW_UNIT).read_bytes())
    wants = units / "local-fs.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / GROW_UNIT).unlink(missing_ok=True)
    (wants / GROW_UNIT).symlink_to(f"/etc/systemd/system/{GROW_UNIT}")


def otad_conf_head(device_type: str, key_names: Sequence[str]) -> str:
    """The top-level keys of otad.conf that every layout writes alike."""
    keys = ", ".join(f'"/{KEYS_DIR}/{name}"' for name in key_names)
    return (
        "# Written by otad-convert.\n"
        f'device_type = "{device_type}"\n'
        f'data_dir = "{DATA_DIR}"\n'
        f"trusted_keys = [{keys}]\n"
    )


def render_otad_conf(plan: Plan, device_type: str, key_names: Sequence[str]) -> str:
    """otad.conf for the new layout (parsed back by the tests with otad.config)."""
    return (
        otad_conf_head(device_type, key_names) + "\n[bootloader]\n"
        'backend = "grub"\n'
        f'env_dir = "{ESP_MOUNT}/{ENV_DIR}"\n'
        "\n[slots.a]\n"
        f'root = "PARTUUID={plan.slot_a.uuid}"\n'
        "\n[slots.b]\n"
        f'root = "PARTUUID={plan.slot_b.uuid}"\n'
    )


def install_otad_config(
    root: Path, plan: Plan, device_type: str, keys: Sequence[tuple[str, bytes]]
) -> None:
    """Write /etc/otad/otad.conf for the GPT layout and the trusted keys in /etc/otad/keys."""
    check_device_type(device_type)
    write_otad_config(root, render_otad_conf(plan, device_type, [n for n, _ in keys]), keys)


def check_device_type(device_type: str) -> None:
    """Refuse a device type that otad.conf's quoted string could not hold as it is."""
    if '"' in device_type or "\\" in device_type or not device_type.strip():
        raise UsageError(f"device type {device_type!r} must be a plain, non-empty word")


def write_otad_config(root: Path, conf: str, keys: Sequence[tuple[str, bytes]]) -> None:
    """Write `conf` as /etc/otad/otad.conf and each (name, PEM) key into /etc/otad/keys."""
    directory = root / KEYS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for name, pem in keys:
        (directory / name).write_bytes(pem)
        (directory / name).chmod(0o644)
    path = root / OTAD_CONF
    path.write_text(conf)
    path.chmod(0o644)


def install_debs(root: Path, debs: Sequence[Path], defer_initramfs: bool = False) -> bool:
    """Install `debs` with dpkg in a chroot of `root`, no network, no services started.

    With `defer_initramfs`, packages that ask initramfs-tools for a rebuild do not get one
    (a new kernel's initramfs is still made); True when one asked, and the caller owes it.
    """
    if not debs:
        return False
    with _initramfs_updates_deferred(root, debs, defer_initramfs) as deferred:
        output = _install_debs(root, debs)
    return deferred and _INITRAMFS_DEFERRED in output


@contextlib.contextmanager
def _initramfs_updates_deferred(root: Path, debs: Sequence[Path], defer: bool) -> Iterator[bool]:
    """update_initramfs=no in update-initramfs.conf, which initramfs-tools documents as
    "no update beside kernel upgrades", for the duration; the file restored byte for byte
    (and its times). Not when a package would replace that conffile; yields whether set."""
    conf = root / UPDATE_INITRAMFS_CONF
    if (
        not defer
        or not conf.is_file()
        or any(_package_of(deb) in _INITRAMFS_PACKAGES for deb in debs)
    ):
        yield False
        return
    original = conf.read_bytes()
    times = conf.stat()
    conf.write_bytes(original + b"\n# otad-convert: while packages install\nupdate_initramfs=no\n")
    log.debug("initramfs rebuilds deferred while packages install")
    try:
        yield True
    finally:
        conf.write_bytes(original)
        os.utime(conf, ns=(times.st_atime_ns, times.st_mtime_ns))


def _package_of(deb: Path) -> str:
    return run(["dpkg-deb", "--field", deb, "Package"]).stdout.decode().strip()


def _install_debs(root: Path, debs: Sequence[Path]) -> str:
    """Install `debs` (see install_debs); what apt or dpkg printed."""
    staging = root / _STAGING
    staging.mkdir(parents=True)
    policy = root / "usr/sbin/policy-rc.d"
    had_policy = policy.exists()
    try:
        names = []
        for deb in debs:
            run(["cp", deb, staging / deb.name])
            names.append(f"/{_STAGING}/{deb.name}")
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        with chroot_mounts(root):
            log.info("installing %s", ", ".join(deb.name for deb in debs))
            result = run(
                ["chroot", root, *_install_command(root, names)],
                env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin"},
                check=False,
            )
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        if result.returncode != 0:
            raise PackageFailed(
                f"{', '.join(deb.name for deb in debs)} did not install: {_dpkg_reason(output)}"
            )
    finally:
        run(["rm", "-rf", staging])
        if not had_policy:
            policy.unlink(missing_ok=True)
    return output


def _install_command(root: Path, names: Sequence[str]) -> list[str]:
    """apt-get when the image has it: it configures pre-dependencies before unpacking what
    needs them (python3-minimal pre-depends on python3.11-minimal), where one `dpkg
    --install` of the set fails. apt sees no sources and no package lists, only the given
    files and what is installed, so nothing is downloaded; its caches and the copies of
    the files it makes stay in the staging directory, which goes away afterwards."""
    if not (root / "usr/bin/apt-get").exists():
        return ["dpkg", "--install", *names]
    inside = f"/{_STAGING}"
    for directory in ("lists/partial", "archives/partial"):
        (root / _STAGING / directory).mkdir(parents=True)
    (root / _STAGING / "sources.list").write_text("")
    settings = {
        "Dir::Etc::SourceList": f"{inside}/sources.list",
        "Dir::Etc::SourceParts": f"{inside}/lists",
        "Dir::State::Lists": f"{inside}/lists",
        "Dir::Cache::archives": f"{inside}/archives",
        "Dir::Cache::pkgcache": "",
        "Dir::Cache::srcpkgcache": "",
    }
    options = [word for key, value in settings.items() for word in ("-o", f"{key}={value}")]
    return ["apt-get", "install", "--yes", "--no-install-recommends", *options, *names]


def _dpkg_reason(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "Depends:" in line or "depends on" in line or "error" in line.lower():
            return line
    return lines[-1] if lines else "dpkg gave no reason"


def copy_overlay(root: Path, overlay: Path) -> None:
    """Copy the tree `overlay` over `root`, keeping owners, links, ACLs, xattrs, capabilities.

    The tree is archived on the host and unpacked by the image's own tar in a chroot, so
    that symbolic links in the image resolve inside it. Directories the image already
    has keep their owner and mode; numeric owners are kept as they are.
    """
    if not overlay.is_dir():
        raise UsageError(f"overlay {overlay} is not a directory")
    log.info("copying overlay %s", overlay)
    archive = root / "tmp/otad-convert-overlay.tar"
    attributes = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
    try:
        run(["tar", "--create", "--file", archive, *attributes, "-C", overlay, "."])
        run(["chroot", root, "tar", "--extract", "--file", "/tmp/otad-convert-overlay.tar",
             *attributes, "--preserve-permissions", "--no-overwrite-dir", "-C", "/"])  # fmt: skip
    finally:
        archive.unlink(missing_ok=True)
