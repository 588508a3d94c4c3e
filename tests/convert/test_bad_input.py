"""Inputs the converter must refuse: a clear error, non-zero exit, nothing left behind.

Each case checks the output directory (no image, no artifact, no work directory), that
no loop device or mount refers to it, and that the input is unchanged. Most cases use
small hand-made images; the ones that need a real root filesystem use the stock image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from convert.pipeline import TOOLS
from tests.conftest import KeyPair
from tests.convert import stock
from tests.convert.conftest import (
    MTOOLS_ENV,
    build_deb,
    leftovers,
    otad_convert,
    require_root_and_tools,
    sh,
    sha256,
)

MIB = 1 << 20
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS = "21686148-6449-6E6F-744E-656564454649"
ROOT = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
ARM64_ROOT = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    require_root_and_tools()


def _table(image: Path, size: int, script: str) -> None:
    with image.open("wb") as out:
        out.truncate(size)
    sh("sh", "-c", f"printf '%s' '{script}' | sfdisk -q '{image}'")


def _cloud_like(image: Path, esp_files: dict[str, bytes], dpkg: bytes | None) -> None:
    """A 96 MiB cloud-like GPT image with a tiny root and an ESP holding `esp_files`."""
    work = image.parent / "parts"
    work.mkdir()
    tree = work / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    if dpkg is not None:
        (tree / "usr/bin/dpkg").write_bytes(dpkg)
    root = work / "root.ext4"
    sh("mkfs.ext4", "-q", "-d", tree, root, "48M")
    esp = work / "esp.img"
    with esp.open("wb") as out:
        out.truncate(16 * MIB)
    sh("mkfs.vfat", esp)
    for name, data in esp_files.items():
        local = work / "file"
        local.write_bytes(data)
        parts = name.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            subprocess.run(["mmd", "-i", esp, f"::/{directory}"], env=MTOOLS_ENV,
                           capture_output=True, check=False)  # fmt: skip
        subprocess.run(["mcopy", "-o", "-i", esp, local, f"::/{name}"], env=MTOOLS_ENV,
                       check=True)  # fmt: skip
    _table(
        image,
        96 * MIB,
        f"label: gpt\n14: start=2048, size=2048, type={BIOS}\n"
        f"15: start=4096, size=32768, type={ESP}\n1: start=36864, size=98304, type={ROOT}\n",
    )
    sh("dd", f"if={esp}", f"of={image}", "bs=512", "seek=4096", "conv=notrunc", "status=none")
    sh("dd", f"if={root}", f"of={image}", "bs=512", "seek=36864", "conv=notrunc", "status=none")
    shutil.rmtree(work)


GRUB_ESP = {"EFI/BOOT/BOOTX64.EFI": b"MZ", "EFI/debian/grub.cfg": b"configfile x\n"}
ARM64_ELF = b"\x7fELF\x02\x01\x01" + bytes(11) + (0xB7).to_bytes(2, "little") + bytes(40)


def unknown_layout(image: Path) -> None:
    _table(image, 32 * MIB, f"label: gpt\nstart=2048, type={ROOT}\n")


def raspberry_pi(image: Path) -> None:
    _table(image, 32 * MIB, "label: dos\nstart=2048, size=16384, type=c\nstart=18432, type=83\n")


def arm64_gpt(image: Path) -> None:
    _table(image, 32 * MIB, f"label: gpt\nstart=2048, size=2048, type={BIOS}\n"
           f"start=4096, size=8192, type={ESP}\nstart=12288, type={ARM64_ROOT}\n")  # fmt: skip


def arm64_root(image: Path) -> None:
    _cloud_like(image, GRUB_ESP, ARM64_ELF)


def no_grub(image: Path) -> None:
    _cloud_like(image, {"EFI/BOOT/BOOTX64.EFI": b"MZ"}, Path("/usr/bin/dpkg").read_bytes())


def truncated(image: Path) -> None:
    _cloud_like(image, GRUB_ESP, Path("/usr/bin/dpkg").read_bytes())
    os.truncate(image, 64 * MIB)


def no_filesystem(image: Path) -> None:
    _table(image, 64 * MIB, f"label: gpt\n14: start=2048, size=2048, type={BIOS}\n"
           f"15: start=4096, size=8192, type={ESP}\n1: start=12288, type={ROOT}\n")  # fmt: skip


def corrupt_xz(image: Path) -> None:
    unknown_layout(image)
    sh("xz", "-k", "-0", image)
    compressed = image.with_name(image.name + ".xz")
    data = compressed.read_bytes()
    compressed.write_bytes(data[: len(data) // 2])


def not_an_image(image: Path) -> None:
    image.write_bytes(b"just some text, no partition table\n" * 100)


CASES: dict[str, tuple[Callable[[Path], None], int, str]] = {
    "unknown layout": (unknown_layout, 1, "unknown partition layout"),
    "raspberry pi without a FAT filesystem": (raspberry_pi, 1, "should hold the FAT boot files"),
    "arm64 partition type": (arm64_gpt, 1, "only amd64 is supported yet"),
    "arm64 root filesystem": (arm64_root, 1, "for arm64; only amd64 is supported yet"),
    "no GRUB on the ESP": (no_grub, 1, "only GRUB images are supported yet"),
    "truncated": (truncated, 1, "truncated or its GPT is damaged"),
    "no root filesystem": (no_filesystem, 1, "should hold the ext4 root filesystem"),
    "corrupt xz": (corrupt_xz, 1, "does not decompress"),
    "not an image": (not_an_image, 1, "no partition table"),
}


def _assert_nothing_left(directory: Path, expected: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == expected
    assert leftovers(directory) == ([], [])


@pytest.mark.parametrize("case", CASES)
def test_bad_image_is_refused(case: str, tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    build, code, message = CASES[case]
    image = tmp_path / "input.img"
    build(image)
    if image.with_name("input.img.xz").exists():
        image.unlink()
        image = image.with_name("input.img.xz")
    before = sha256(image)

    result = otad_convert(image, "-o", tmp_path / "out.img", "--storage-size", "300M",
                          "--verify-key", keys["ecdsa"].public)  # fmt: skip

    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or "Traceback" not in result.stderr
    assert sha256(image) == before
    _assert_nothing_left(tmp_path, {image.name})


def test_missing_tool_is_named_before_anything_happens(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    image = tmp_path / "input.img"
    unknown_layout(image)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (t for t in TOOLS if t != "mtype"):
        path = shutil.which(tool)
        assert path is not None
        (bin_dir / tool).symlink_to(path)

    result = otad_convert(image, "-o", tmp_path / "out.img", "--verify-key",
                          keys["ecdsa"].public, env={"PATH": str(bin_dir)})  # fmt: skip

    assert result.returncode == 3
    assert "required tool 'mtype' is not installed" in result.stderr
    _assert_nothing_left(tmp_path, {"input.img", "bin"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--bootloader", "uboot"], "invalid choice: 'uboot'"),
        (["--storage-size", "lots"], "is not a size"),
        (["--deb", "/nonexistent.deb"], "does not exist"),
        ([], "must trust at least one key"),
    ],
)
def test_bad_options_are_refused(arguments: list[str], message: str, tmp_path: Path) -> None:
    image = tmp_path / "input.img"
    unknown_layout(image)

    result = otad_convert(image, "-o", tmp_path / "out.img", *arguments)

    assert result.returncode == 2
    assert message in result.stderr
    _assert_nothing_left(tmp_path, {"input.img"})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("400M", "leaves no room for two slots"),
        ("1600M", "cannot hold the root filesystem"),
    ],
)
def test_storage_too_small(
    size: str, message: str, stock_image: Path, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    result = otad_convert(stock_image, "-o", tmp_path / "out.img", "--storage-size", size,
                          "--data-size", "256M", "--verify-key", keys["ecdsa"].public)  # fmt: skip

    assert result.returncode == 1
    assert message in result.stderr
    assert "--storage-size" in result.stderr
    _assert_nothing_left(tmp_path, set())


@pytest.mark.slow
def test_a_deb_that_does_not_install(
    stock_image: Path, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = build_deb(debs, "otad-test-broken", depends="otad-no-such-package")

    result = otad_convert(stock_image, "-o", tmp_path / "out.img", "--storage-size", "2200M",
                          "--verify-key", keys["ecdsa"].public, "--deb", deb)  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert "otad-test-broken.deb did not install" in result.stderr
    assert "otad-no-such-package" in result.stderr
    _assert_nothing_left(tmp_path, {"debs"})


def test_stock_builder_is_keyed_by_what_builds_it() -> None:
    assert stock.tree_key() != stock.image_key()
    assert len(stock.tree_key()) == 16


@pytest.mark.slow
def test_an_artifact_the_trusted_keys_do_not_verify_is_not_published(
    stock_image: Path, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    key, trusted = keys["ecdsa"].private, keys["other"].public
    result = otad_convert(stock_image, "-o", tmp_path / "out.img", "--storage-size", "2200M",
                          "--key", key, "--verify-key", trusted)  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert "does not verify with the keys the device will trust" in result.stderr
    _assert_nothing_left(tmp_path, set())
