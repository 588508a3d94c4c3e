"""The modules otad ships, run through ModuleRunner from real artifacts: what each
installs, what rollback restores, and what a refused payload leaves behind."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from otad.artifact.headers import MetaDataValue
from otad.errors import ModuleError
from otad.modules.runner import ModuleRunner
from tests.conftest import require_tool
from tests.modules.conftest import SHIPPED, Setup, download, make_artifact


def shipped(setup: Setup) -> Setup:
    setup.environment.clear()
    return setup


def run(setup: Setup, artifact: Path) -> ModuleRunner:
    runner, _ = download(artifact, setup.config((SHIPPED,)))
    return runner


# -- single-file -------------------------------------------------------------------------


def single_file_artifact(tmp_path: Path, dest_dir: Path, style: str, data: bytes) -> Path:
    if style == "meta-data":
        return make_artifact(
            tmp_path,
            "single-file",
            {"app.conf": data},
            meta_data={"dest_dir": str(dest_dir), "permissions": "0640"},
        )
    # what Mender's single-file-artifact-gen writes
    files = {
        "app.conf": data,
        "dest_dir": f"{dest_dir}\n".encode(),
        "filename": b"app.conf\n",
        "permissions": b"640\n",
    }
    return make_artifact(tmp_path, "single-file", files)


@pytest.mark.parametrize("style", ["meta-data", "mender-files"])
@pytest.mark.parametrize("had_previous", [True, False])
def test_single_file_installs_and_rolls_back(
    setup: Setup, tmp_path: Path, style: str, had_previous: bool
) -> None:
    dest_dir = tmp_path / "etc" / "app"
    dest = dest_dir / "app.conf"
    if had_previous:
        dest_dir.mkdir(parents=True)
        dest.write_bytes(b"old\n")
    runner = run(shipped(setup), single_file_artifact(tmp_path, dest_dir, style, b"new\n"))

    assert runner.supports_rollback()
    runner.install()
    assert dest.read_bytes() == b"new\n"
    assert dest.stat().st_mode & 0o777 == 0o640
    runner.rollback()
    runner.cleanup()

    if had_previous:
        assert dest.read_bytes() == b"old\n"
    else:
        assert not dest.exists()
    assert sorted(path.name for path in dest_dir.iterdir()) == (
        ["app.conf"] if had_previous else []
    )


def test_single_file_commit_drops_the_backup(setup: Setup, tmp_path: Path) -> None:
    dest_dir = tmp_path / "etc"
    dest_dir.mkdir()
    (dest_dir / "app.conf").write_bytes(b"old\n")
    runner = run(shipped(setup), single_file_artifact(tmp_path, dest_dir, "meta-data", b"new\n"))

    runner.install()
    runner.commit()
    runner.cleanup()

    assert [path.name for path in dest_dir.iterdir()] == ["app.conf"]
    assert (dest_dir / "app.conf").read_bytes() == b"new\n"


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"dest_dir": "relative/dir"}, "must be an absolute path"),
        ({"permissions": "rw-r--r--"}, "not an octal mode"),
        ({"filename": "../escape"}, "must be a plain name"),
    ],
)
def test_single_file_refuses_bad_settings(
    setup: Setup, tmp_path: Path, settings: dict[str, str], problem: str
) -> None:
    dest_dir = tmp_path / "dest"
    meta_data = {"dest_dir": str(dest_dir), **settings}
    artifact = make_artifact(tmp_path, "single-file", {"app.conf": b"x"}, meta_data=meta_data)
    runner = run(shipped(setup), artifact)

    with pytest.raises(ModuleError, match="ArtifactInstall") as caught:
        runner.install()

    assert problem in caught.value.stderr
    assert caught.value.exit_code == 1
    runner.rollback()  # nothing was changed, so there is nothing to undo
    assert not dest_dir.exists()
    assert not (tmp_path / "escape").exists()


# -- directory ---------------------------------------------------------------------------


def tarball(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def tree_of(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("style", ["meta-data", "mender-files"])
def test_directory_installs_and_rolls_back(setup: Setup, tmp_path: Path, style: str) -> None:
    dest = tmp_path / "srv" / "www"
    dest.mkdir(parents=True)
    (dest / "index.html").write_bytes(b"old")
    (dest / "stale.css").write_bytes(b"old")
    new = {"index.html": b"new", "img/logo.png": b"\x89PNG"}
    if style == "meta-data":
        archive = tarball(tmp_path / "site.tar.gz", new)
        files = {"site.tar.gz": archive.read_bytes()}
        artifact = make_artifact(tmp_path, "directory", files, meta_data={"dest_dir": str(dest)})
    else:
        archive = tarball(tmp_path / "update.tar", new, "w")
        files = {"update.tar": archive.read_bytes(), "dest_dir": f"{dest}\n".encode()}
        artifact = make_artifact(tmp_path, "directory", files)
    runner = run(shipped(setup), artifact)

    runner.install()
    assert tree_of(dest) == new
    assert runner.supports_rollback()
    runner.rollback()
    runner.cleanup()

    assert tree_of(dest) == {"index.html": b"old", "stale.css": b"old"}
    assert sorted(path.name for path in dest.parent.iterdir()) == ["www"]


def test_directory_commit_keeps_only_the_new_tree(setup: Setup, tmp_path: Path) -> None:
    dest = tmp_path / "www"
    archive = tarball(tmp_path / "site.tar", {"a.txt": b"a"}, "w")
    artifact = make_artifact(
        tmp_path, "directory", {"site.tar": archive.read_bytes()}, meta_data={"dest_dir": str(dest)}
    )
    runner = run(shipped(setup), artifact)

    runner.install()
    runner.commit()
    runner.cleanup()

    assert tree_of(dest) == {"a.txt": b"a"}
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("climbing", "leaves the destination"),
        ("absolute", "leaves the destination"),
        ("through-symlink", "through a symlink"),
        ("device", "device or FIFO"),
    ],
)
def test_directory_refuses_unsafe_tarballs(
    setup: Setup, tmp_path: Path, kind: str, problem: str
) -> None:
    dest = tmp_path / "www"
    dest.mkdir()
    (dest / "index.html").write_bytes(b"old")
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as archive:
        archive.addfile(tarfile.TarInfo("fine.txt"), io.BytesIO(b""))
        if kind in ("climbing", "absolute"):
            name = "../outside.txt" if kind == "climbing" else str(tmp_path / "outside.txt")
            archive.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
        elif kind == "through-symlink":
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
            archive.addfile(link)
            archive.addfile(tarfile.TarInfo("link/outside.txt"), io.BytesIO(b""))
        else:
            device = tarfile.TarInfo("null")
            device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
            archive.addfile(device)
    artifact = make_artifact(
        tmp_path, "directory", {"evil.tar": path.read_bytes()}, meta_data={"dest_dir": str(dest)}
    )
    runner = run(shipped(setup), artifact)

    with pytest.raises(ModuleError, match="ArtifactInstall") as caught:
        runner.install()
    runner.rollback()
    runner.cleanup()

    assert problem in caught.value.stderr
    assert tree_of(dest) == {"index.html": b"old"}
    assert not (tmp_path / "outside.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- script ------------------------------------------------------------------------------


def test_script_runs_every_payload_file_in_order(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = {
        "20-second": f"#!/bin/sh\necho second >> {out}\n".encode(),
        "10-first": f"#!/bin/sh\necho first >> {out}\n".encode(),
    }
    runner = run(shipped(setup), make_artifact(tmp_path, "script", files))

    assert not runner.supports_rollback()
    runner.install()

    assert out.read_text() == "first\nsecond\n"


def test_script_failure_fails_the_install(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = {
        "10-fails": b"#!/bin/sh\necho broken >&2\nexit 7\n",
        "20-never": f"#!/bin/sh\necho ran >> {out}\n".encode(),
    }
    runner = run(shipped(setup), make_artifact(tmp_path, "script", files))

    with pytest.raises(ModuleError, match="exited with 7") as caught:
        runner.install()

    assert caught.value.exit_code == 7
    assert "broken" in caught.value.stderr
    assert not out.exists()


# -- deb ---------------------------------------------------------------------------------


def native_architecture() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def build_deb(directory: Path, package: str, version: str, architecture: str) -> bytes:
    require_tool("dpkg-deb")
    source = directory / f"{package}-{version}-{architecture}"
    (source / "DEBIAN").mkdir(parents=True)
    (source / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: {architecture}\n"
        "Maintainer: otad tests <tests@example.org>\nDescription: a test package\n"
    )
    content = source / "usr" / "share" / package
    content.mkdir(parents=True)
    (content / "version").write_text(f"{version}\n")
    output = directory / f"{source.name}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(source), str(output)],
        capture_output=True,
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    return output.read_bytes()


@pytest.fixture
def dpkg_root(tmp_path: Path, setup: Setup) -> Path:
    """A throwaway root with an empty dpkg database, which the deb module acts on."""
    require_tool("dpkg")
    if os.geteuid() != 0:
        pytest.skip("dpkg --root installs need root (file ownership)")
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    for name in ("info", "updates", "triggers"):
        (admin / name).mkdir(parents=True)
    (admin / "status").touch()
    shipped(setup).environment["OTAD_DPKG_ROOT"] = str(root)
    return root


def installed(root: Path, package: str) -> str | None:
    result = subprocess.run(
        ["dpkg-query", f"--root={root}", "-W", "-f=${db:Status-Status} ${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = result.stdout.partition(" ")
    return version if result.returncode == 0 and status == "installed" else None


@pytest.mark.parametrize(
    ("meta_data", "provides"),
    [
        ({}, {}),
        ({"packages": "otad-hello=1.0-1"}, {}),
        ({"packages": ["otad-hello"]}, {"deb.otad-hello.version": "1.0-1"}),
    ],
)
def test_deb_installs_and_rolls_back(
    setup: Setup,
    tmp_path: Path,
    dpkg_root: Path,
    meta_data: dict[str, MetaDataValue],
    provides: dict[str, str],
) -> None:
    deb = build_deb(tmp_path, "otad-hello", "1.0-1", "all")
    artifact = make_artifact(
        tmp_path, "deb", {"hello.deb": deb}, meta_data=meta_data, provides=provides
    )
    runner = run(setup, artifact)

    runner.install()
    assert installed(dpkg_root, "otad-hello") == "1.0-1"
    assert (dpkg_root / "usr/share/otad-hello/version").read_text() == "1.0-1\n"
    assert runner.needs_reboot().value == "No"
    assert runner.supports_rollback()
    runner.rollback()
    runner.cleanup()

    assert installed(dpkg_root, "otad-hello") is None
    assert not (dpkg_root / "usr/share/otad-hello").exists()


def test_deb_upgrades_cannot_roll_back(setup: Setup, tmp_path: Path, dpkg_root: Path) -> None:
    architecture = native_architecture()
    for version in ("1.0-1", "2.0-1"):
        deb = build_deb(tmp_path / version, "otad-hello", version, architecture)
        runner = run(setup, make_artifact(tmp_path / version, "deb", {"hello.deb": deb}))
        runner.install()

    assert installed(dpkg_root, "otad-hello") == "2.0-1"
    assert not runner.supports_rollback()
    with pytest.raises(ModuleError, match="ArtifactRollback"):
        runner.rollback()
    assert installed(dpkg_root, "otad-hello") == "2.0-1"


@pytest.mark.parametrize(
    ("architecture", "meta_data", "provides", "problem"),
    [
        ("wrong", {}, {}, "this device is"),
        ("all", {"packages": "otad-hello=2.0"}, {}, "meta-data wants otad-hello 2.0"),
        ("all", {"packages": ["other"]}, {}, "meta-data lists packages ['other']"),
        ("all", {}, {"deb.otad-hello.version": "0.9"}, "type-info provides otad-hello 0.9"),
        ("all", {}, {"deb.other.version": "1"}, "the payload lacks it"),
    ],
)
def test_deb_checks_the_package_before_dpkg(
    setup: Setup,
    tmp_path: Path,
    dpkg_root: Path,
    architecture: str,
    meta_data: dict[str, MetaDataValue],
    provides: dict[str, str],
    problem: str,
) -> None:
    if architecture == "wrong":
        architecture = "armhf" if native_architecture() != "armhf" else "arm64"
    deb = build_deb(tmp_path, "otad-hello", "1.0-1", architecture)
    artifact = make_artifact(
        tmp_path, "deb", {"hello.deb": deb}, meta_data=meta_data, provides=provides
    )
    runner = run(setup, artifact)
    status = (dpkg_root / "var/lib/dpkg/status").read_bytes()

    with pytest.raises(ModuleError, match="ArtifactInstall") as caught:
        runner.install()

    assert problem in caught.value.stderr
    assert installed(dpkg_root, "otad-hello") is None
    assert (dpkg_root / "var/lib/dpkg/status").read_bytes() == status
    assert not (dpkg_root / "usr").exists()


def test_deb_refuses_a_file_that_is_no_package(
    setup: Setup, tmp_path: Path, dpkg_root: Path
) -> None:
    runner = run(setup, make_artifact(tmp_path, "deb", {"hello.deb": b"!<arch>\nnonsense"}))

    with pytest.raises(ModuleError, match="ArtifactInstall") as caught:
        runner.install()

    assert "is not a Debian package" in caught.value.stderr
    assert not (dpkg_root / "usr").exists()
