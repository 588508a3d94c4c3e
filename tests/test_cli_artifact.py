"""otad-artifact as a person runs it: a real process, its output and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.artifact.conftest import make_payload

ROOT = Path(__file__).resolve().parent.parent


def otad_artifact(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "otad.cli.artifact", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "signing.key"
    result = otad_artifact("genkey", "-o", path, "--type", "ecdsa")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_payload(tmp_path / "rootfs.ext4", 200_000)


def test_write_read_validate(tmp_path: Path, key: Path, image: Path) -> None:
    artifact = tmp_path / "release-2.mender"

    written = otad_artifact(
        "write", "rootfs-image", "-n", "release-2", "-t", "qemux86-64", "-t", "pc",
        "-f", image, "-o", artifact, "-k", key, "--compression", "zstd",
        "-p", "custom.key:value", "-d", "rootfs-image.version:release-1", "-N", "release-1",
    )  # fmt: skip
    read = otad_artifact("read", "--json", "-k", f"{key}.pub", artifact)
    validated = otad_artifact("validate", "-k", f"{key}.pub", artifact)

    assert written.returncode == 0, written.stderr
    assert read.returncode == 0, read.stderr
    description = json.loads(read.stdout)
    assert description["name"] == "release-2"
    assert description["signature"]["status"] == "verified"
    assert description["compatible_devices"] == ["qemux86-64", "pc"]
    assert description["depends_artifact_names"] == ["release-1"]
    payload = description["payloads"][0]
    assert payload["software_version"] == "release-2"
    assert payload["provides"]["custom.key"] == "value"
    assert payload["depends"] == {"rootfs-image.version": "release-1"}
    assert payload["files"][0]["size"] == 200_000
    assert payload["files"][0]["verified"] is True
    assert validated.returncode == 0
    assert "signature verified" in validated.stdout


def test_validate_without_key_says_signature_unchecked(
    tmp_path: Path, key: Path, image: Path
) -> None:
    artifact = tmp_path / "a.mender"
    otad_artifact("write", "rootfs-image", "-n", "1.0", "-t", "d", "-f", image, "-o", artifact,
                  "-k", key)  # fmt: skip

    result = otad_artifact("validate", artifact)

    assert result.returncode == 0
    assert "signature NOT checked" in result.stdout


@pytest.mark.parametrize(
    ("damage", "code", "fragment"),
    [
        ("flip", 1, "checksum"),
        ("truncate", 1, "ends"),
        ("missing", 3, "No such file"),
    ],
)
def test_bad_artifact_is_one_line_and_exit_code(
    tmp_path: Path, key: Path, image: Path, damage: str, code: int, fragment: str
) -> None:
    artifact = tmp_path / "a.mender"
    otad_artifact("write", "rootfs-image", "-n", "1.0", "-t", "d", "-f", image, "-o", artifact,
                  "--compression", "none", "--no-chunk-index", "-k", key)  # fmt: skip
    data = bytearray(artifact.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
        artifact.write_bytes(data)
    elif damage == "truncate":
        artifact.write_bytes(data[: len(data) // 2])
    else:
        artifact.unlink()

    result = otad_artifact("validate", "-k", f"{key}.pub", artifact)

    assert result.returncode == code
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_wrong_key_is_refused(tmp_path: Path, key: Path, image: Path) -> None:
    other = tmp_path / "other.key"
    otad_artifact("genkey", "-o", other)
    artifact = tmp_path / "a.mender"
    otad_artifact("write", "rootfs-image", "-n", "1.0", "-t", "d", "-f", image, "-o", artifact,
                  "-k", other)  # fmt: skip

    result = otad_artifact("validate", "-k", f"{key}.pub", artifact)

    assert result.returncode == 1
    assert "does not verify with any trusted key" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--compression", "bzip2"], 2, "unknown compression 'bzip2'"),
        (["-n", "release 1", "--software-version", "1"], 2, "white space"),
        (["-n", "v1_0"], 2, "not an orderable version"),
        (["--software-version", "1 0"], 2, "cannot be ordered"),
        (["-k", "/nonexistent.key"], 3, "cannot read key"),
        (["-f", "/nonexistent.img"], 2, "not a regular file"),
    ],
)
def test_bad_write_options_fail_cleanly_and_leave_nothing(
    tmp_path: Path, image: Path, args: list[str], code: int, fragment: str
) -> None:
    output = tmp_path / "out" / "a.mender"
    output.parent.mkdir()
    base = ["write", "rootfs-image", "-n", "1.0", "-t", "d", "-f", str(image), "-o", str(output)]
    # A later option replaces the one in `base`: argparse keeps the last value.
    result = otad_artifact(*base, *args)

    assert result.returncode == code
    assert fragment in result.stderr
    assert list(output.parent.iterdir()) == []


def test_sign_refuses_to_replace_without_force(tmp_path: Path, key: Path, image: Path) -> None:
    artifact = tmp_path / "a.mender"
    otad_artifact("write", "rootfs-image", "-n", "1.0", "-t", "d", "-f", image, "-o", artifact)
    other = tmp_path / "other.key"
    otad_artifact("genkey", "-o", other)

    first = otad_artifact("sign", "-k", key, artifact)
    again = otad_artifact("sign", "-k", other, artifact)
    before = artifact.read_bytes()
    forced = otad_artifact("sign", "-k", other, "-F", artifact)

    assert first.returncode == 0
    assert again.returncode == 2
    assert "already signed" in again.stderr
    assert forced.returncode == 0
    assert artifact.read_bytes() != before
    assert otad_artifact("validate", "-k", f"{other}.pub", artifact).returncode == 0
    assert otad_artifact("validate", "-k", f"{key}.pub", artifact).returncode == 1


def test_genkey_never_overwrites(tmp_path: Path, key: Path) -> None:
    before = key.read_bytes()

    result = otad_artifact("genkey", "-o", key)

    assert result.returncode == 2
    assert key.read_bytes() == before
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_module_image_with_bad_meta_data(tmp_path: Path, image: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text('{"nested": {"not": "allowed"}}')

    result = otad_artifact("write", "module-image", "-T", "single-file", "-n", "m1", "-t", "d",
                           "-f", image, "-m", meta, "-o", tmp_path / "m.mender")  # fmt: skip

    assert result.returncode == 2
    assert "values must be strings, numbers or lists" in result.stderr


def test_otad_convert_describes_its_options() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "convert.cli", "--help"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    for option in ("--output", "--storage-size", "--data-size", "--device-type",
                   "--artifact-name", "--key", "--verify-key", "--deb", "--overlay",
                   "--bootloader", "--config"):  # fmt: skip
        assert option in result.stdout
