"""Fixtures of the converter's tests: the stock image, one conversion, and ways to look inside.

Everything is inspected from outside the converter: sfdisk, blkid, read-only loop mounts
of ext4, mtools for the ESP. The conversion runs once per session (about a minute); the
stock image comes from the cache that tests/convert/stock.py fills.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import KeyPair, require_tool
from tests.convert import stock

ROOT = Path(__file__).resolve().parents[2]
TOOLS = (
    "debootstrap", "sfdisk", "losetup", "mount", "e2image", "e2fsck", "resize2fs", "tune2fs",
    "mkfs.ext4", "mkfs.vfat", "mcopy", "mmd", "mtype", "mdir", "grub-mkimage", "blkid",
    "setcap", "getcap", "setfacl", "getfacl", "setfattr", "getfattr", "dpkg-deb", "xz", "zstd",
)  # fmt: skip
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}
STORAGE = "2200M"


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("converting images needs root (loop devices, mounts, chroot)")
    for tool in TOOLS:
        require_tool(tool)


def otad_convert(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "convert.cli", *map(str, args)],
        capture_output=True, text=True, env=environment, check=False,
    )  # fmt: skip


def sh(*argv: str | Path, **kwargs: str) -> str:
    env = {**os.environ, **kwargs} if kwargs else None
    result = subprocess.run([str(a) for a in argv], capture_output=True, check=True, env=env)
    return result.stdout.decode()


def sha256(path: Path, offset: int = 0, size: int | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(offset)
        left = size if size is not None else path.stat().st_size - offset
        while left > 0 and (block := stream.read(min(left, 1 << 20))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Part:
    number: int
    start: int
    size: int
    type: str
    uuid: str
    name: str

    @property
    def offset(self) -> int:
        return self.start * 512


def partitions(image: Path) -> dict[str, Part]:
    """The partitions of `image` by GPT name, read with sfdisk --json."""
    table = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    found = {}
    for entry in table["partitions"]:
        number = int(entry["node"][len(str(image)) :])
        found[entry.get("name", str(number))] = Part(
            number, entry["start"], entry["size"], entry["type"], entry["uuid"].lower(),
            entry.get("name", ""),
        )  # fmt: skip
    return found


@contextlib.contextmanager
def mounted_read_only(image: Path, part: Part, where: Path) -> Iterator[Path]:
    """Partition `part` of `image` mounted read-only (no journal replay) at `where`."""
    device = sh("losetup", "--find", "--show", "--read-only", "--offset", str(part.offset),
                "--sizelimit", str(part.size * 512), image).strip()  # fmt: skip
    try:
        where.mkdir(parents=True, exist_ok=True)
        sh("mount", "-o", "ro,noload", device, where)
        try:
            yield where
        finally:
            sh("umount", where)
    finally:
        sh("losetup", "--detach", device)


def esp_read(image: Path, esp: Part, path: str) -> bytes:
    result = subprocess.run(
        ["mtype", "-i", f"{image}@@{esp.offset}", f"::/{path}"],
        capture_output=True, check=True, env=MTOOLS_ENV,
    )  # fmt: skip
    return result.stdout


def leftovers(directory: Path) -> tuple[list[str], list[str]]:
    """Loop devices and mounts that still refer to `directory`."""
    loops = json.loads(sh("losetup", "--json", "--list") or '{"loopdevices": []}')
    devices = [
        entry["name"]
        for entry in loops.get("loopdevices", [])
        if str(directory) in (entry.get("back-file") or "")
    ]
    mounts = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(directory) in line
    ]  # fmt: skip
    return devices, mounts


@pytest.fixture(scope="session")
def stock_image() -> Path:
    require_root_and_tools()
    started = time.monotonic()
    # A built image is renamed into place whole: no need to wait for the cache's lock,
    # which a fixture building something else may hold for minutes.
    built = stock.cache_dir() / f"stock-{stock.image_key()}.img"
    image = built if built.exists() else stock.stock_image()
    print(f"stock image {image} ready in {time.monotonic() - started:.1f} s")
    return image


def build_deb(directory: Path, name: str, depends: str | None = None) -> Path:
    """A tiny .deb that installs /usr/share/doc/<name>/hello (and may depend on something)."""
    tree = directory / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / f"usr/share/doc/{name}").mkdir(parents=True)
    (tree / f"usr/share/doc/{name}/hello").write_text("hello\n")
    control = (
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: otad <otad@example.org>\n"
        f"Description: otad converter test package\n"
    )
    if depends:
        control += f"Depends: {depends}\n"
    (tree / "DEBIAN/control").write_text(control)
    deb = directory / f"{name}.deb"
    sh("dpkg-deb", "--root-owner-group", "--build", tree, deb)
    shutil.rmtree(tree)
    return deb


def build_overlay(directory: Path) -> Path:
    """A tree with a capability, an ACL, a user xattr, hard and symbolic links and an owner."""
    overlay = directory / "overlay"
    tools = overlay / "usr/local/bin"
    tools.mkdir(parents=True)
    shutil.copy("/usr/bin/true", tools / "otad-ping")
    sh("setcap", "cap_net_raw+ep", tools / "otad-ping")
    os.link(tools / "otad-ping", tools / "otad-ping-hardlink")
    (tools / "otad-ping-symlink").symlink_to("otad-ping")
    settings = overlay / "etc/otad-test"
    settings.mkdir(parents=True)
    (settings / "secret").write_text("s3cret\n")
    os.chown(settings / "secret", 1234, 4321)
    (settings / "secret").chmod(0o640)
    sh("setfacl", "-m", "u:1235:r", settings / "secret")
    sh("setfattr", "-n", "user.otad", "-v", "kept", settings / "secret")
    return overlay


@dataclass(frozen=True)
class Conversion:
    work: Path
    stock: Path
    stock_sha256: str
    output: Path
    artifact: Path
    keys: KeyPair
    report: str
    log: str
    seconds: float


@pytest.fixture(scope="session")
def conversion(
    stock_image: Path, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]
) -> Conversion:
    """One conversion with every option, shared by the tests that inspect its result."""
    work = tmp_path_factory.mktemp("conversion")
    before = sha256(stock_image)
    config = work / "convert.toml"
    config.write_text(f'storage_size = "{STORAGE}"\ndevice_type = "qemux86-64"\n')
    output = work / "device.img"
    started = time.monotonic()
    result = otad_convert(
        stock_image, "-o", output, "--config", config, "--artifact-name", "release-1",
        "--key", keys["ecdsa"].private, "--verify-key", keys["ecdsa"].public,
        "--deb", build_deb(work, "otad-test-good"), "--overlay", build_overlay(work),
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    return Conversion(
        work, stock_image, before, output, work / "device.mender", keys["ecdsa"],
        result.stdout, result.stderr, seconds,
    )  # fmt: skip
