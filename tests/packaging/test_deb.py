"""The Debian package end to end: build it with tools/build-deb, lint it, install it with apt
into a minimal bookworm tree, and run the installed commands there.

The tree comes from debootstrap once and is cached as a tarball outside the checkout, in
${OTAD_TEST_CACHE:-/var/cache/otad-test}, together with apt's downloaded archives, so
later runs download almost nothing. Each run unpacks a fresh copy: the package's
dependencies must come from Debian alone. Needs root (chroot, mounts) and the archive.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool

pytestmark = pytest.mark.slow

MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_ARGS = ("--variant=minbase", "bookworm", MIRROR)
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
UNITS = ("otad.service", "otad-commit.service", "otad-health-example.service")
MODULES = ("deb", "directory", "script", "single-file")


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, but CI must be able to run this test")
    pytest.skip(reason)


def require_archive() -> None:
    """Skip (fail under CI) when the Debian archive cannot be reached."""
    url = f"{MIRROR}/dists/bookworm/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            response.read(1)
    except OSError as error:
        skip_or_fail(f"the Debian archive is not reachable ({url}: {error})")


def run(
    argv: Sequence[str | Path], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `argv`; on failure the assertion shows its output."""
    result = subprocess.run(
        [str(arg) for arg in argv], env=env, capture_output=True, text=True, check=False
    )
    assert (
        result.returncode == 0
    ), f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


# -- the cached tree ------------------------------------------------------------------


def cache_dir() -> Path:
    path = Path(os.environ.get("OTAD_TEST_CACHE", "/var/cache/otad-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def tree_tarball() -> Path:
    """The cached minimal bookworm tree, made by debootstrap the first time."""
    digest = hashlib.sha256("\0".join(DEBOOTSTRAP_ARGS).encode()).hexdigest()[:16]
    tarball = cache_dir() / f"bookworm-minbase-{digest}.tar"
    with (cache_dir() / "bookworm-minbase.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it
        if not tarball.exists():
            build_tree_tarball(tarball)
    return tarball


def build_tree_tarball(tarball: Path) -> None:
    debootstrap = require_tool("debootstrap")
    scratch = Path(f"{tarball}.building")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        run([debootstrap, *DEBOOTSTRAP_ARGS[:2], scratch, *DEBOOTSTRAP_ARGS[2:]])
        # debootstrap leaves no package lists; fetch them once for every later run.
        with mounted_chroot(scratch):
            run(["chroot", scratch, "apt-get", "update", "-q"], env=CHROOT_ENV)
        partial = Path(f"{tarball}.partial")
        run(["tar", "--numeric-owner", "-C", scratch, "-cf", partial, "."])
        partial.rename(tarball)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- mounts ---------------------------------------------------------------------------


def is_mount_point(path: Path) -> bool:
    return os.path.ismount(path)


def bind_read_only(source: Path, target: Path, stack: ExitStack) -> None:
    """Bind `source` at `target`, read-only so that deleting the tree cannot reach it."""
    run(["mount", "--bind", source, target])
    stack.callback(unmount, target)
    run(["mount", "-o", "remount,bind,ro", target])


def unmount(target: Path) -> None:
    if subprocess.run(["umount", target], check=False).returncode != 0:
        subprocess.run(["umount", "--lazy", target], check=False)


@contextmanager
def mounted_chroot(root: Path, archives: Path | None = None) -> Iterator[Path]:
    """`root` with /proc and /dev bound in (and apt's archive cache, when given)."""
    with ExitStack() as stack:
        bind_read_only(Path("/proc"), root / "proc", stack)
        bind_read_only(Path("/dev"), root / "dev", stack)
        if archives is not None:
            run(["mount", "--bind", archives, root / "var/cache/apt/archives"])
            stack.callback(unmount, root / "var/cache/apt/archives")
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        yield root


def remove_tree(root: Path) -> None:
    """Delete the unpacked tree, but never through a mount that is still there."""
    for sub in ("proc", "dev", "var/cache/apt/archives"):
        assert not is_mount_point(root / sub), f"{root / sub} is still mounted; not deleting"
    shutil.rmtree(root)


# -- the test -------------------------------------------------------------------------


@dataclass(frozen=True)
class Chroot:
    root: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run(["chroot", self.root, *argv], env=CHROOT_ENV)

    def status(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", self.root, *argv],
            env=CHROOT_ENV,
            capture_output=True,
            text=True,
            check=False,
        )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    require_tool("dpkg-buildpackage")
    output = tmp_path_factory.mktemp("deb")

    run([repo_root / "tools/build-deb", output])

    (package,) = output.glob("otad_*_all.deb")
    return package


def test_lintian_reports_no_errors_or_warnings(deb: Path) -> None:
    lintian = require_tool("lintian")
    (changes,) = deb.parent.glob("otad_*.changes")

    result = subprocess.run(
        [lintian, "--pedantic", changes], capture_output=True, text=True, check=False
    )

    complaints = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert complaints == [], result.stdout


def test_installing_the_initramfs_hook_rebuilds_the_initramfs(deb: Path) -> None:
    triggers = run(["dpkg-deb", "--info", deb, "triggers"]).stdout

    assert "activate-noawait update-initramfs" in triggers.splitlines()


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroot]:
    if os.geteuid() != 0:
        skip_or_fail("installing into a chroot needs root")
    require_tool("chroot")
    require_archive()
    tarball = tree_tarball()
    archives = cache_dir() / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("bookworm") / "root"
    root.mkdir()
    run(["tar", "--numeric-owner", "-C", root, "-xf", tarball])
    shutil.copy(deb, root / "tmp" / deb.name)
    try:
        with mounted_chroot(root, archives):
            chroot = Chroot(root)
            chroot.run("apt-get", "update", "-q")
            chroot.run("apt-get", "install", "-y", "-q", f"/tmp/{deb.name}")
            yield chroot
    finally:
        remove_tree(root)


def test_installed_commands_run(installed: Chroot) -> None:
    assert "write" in installed.run("otad-artifact", "--help").stdout
    assert "commit" in installed.run("otactl", "--help").stdout
    assert "--config" in installed.run("otad", "--help").stdout
    assert "--storage-size" in installed.run("otad-convert", "--help").stdout


def test_installed_artifact_tool_writes_and_validates(installed: Chroot) -> None:
    installed.run("sh", "-c", "echo payload > /tmp/payload.txt")

    installed.run("otad-artifact", "genkey", "-o", "/tmp/release.key")
    installed.run(
        "otad-artifact",
        "write",
        "module-image",
        "-T",
        "single-file",
        "-n",
        "test-1.0",
        "-t",
        "chroot",
        "-f",
        "/tmp/payload.txt",
        "-k",
        "/tmp/release.key",
        "-o",
        "/tmp/test.mender",
    )
    validated = installed.run(
        "otad-artifact", "validate", "/tmp/test.mender", "-k", "/tmp/release.key.pub"
    )

    assert "signature verified with /tmp/release.key.pub" in validated.stdout


def test_autopkgtest_passes_in_the_tree(installed: Chroot, repo_root: Path) -> None:
    shutil.copy(repo_root / "debian/tests/installed-commands", installed.root / "tmp")

    result = installed.run("/tmp/installed-commands")

    assert result.stdout.endswith("installed-commands: ok\n")


def test_files_landed(installed: Chroot) -> None:
    root = installed.root
    for unit in UNITS:
        assert (root / "usr/lib/systemd/system" / unit).is_file(), unit
    for module in MODULES:
        path = root / "usr/share/otad/modules/v3" / module
        assert path.is_file(), module
        assert os.access(path, os.X_OK), module
    for name in (
        "usr/share/dbus-1/system.d/org.otad.Updater1.conf",
        "usr/share/dbus-1/system-services/org.otad.Updater1.service",
        "usr/share/dbus-1/interfaces/org.otad.Updater1.xml",
        "usr/share/polkit-1/actions/org.otad.policy",
        "usr/lib/sysusers.d/otad.conf",
        "usr/libexec/otad/health-example",
        "usr/share/man/man8/otad.8.gz",
        "usr/share/man/man1/otactl.1.gz",
        "usr/share/man/man1/otad-artifact.1.gz",
        "usr/share/man/man1/otad-convert.1.gz",
    ):
        assert (root / name).is_file(), name
    for name in (
        "usr/share/initramfs-tools/hooks/otad-watchdog",
        "usr/share/initramfs-tools/scripts/init-top/otad-watchdog",
    ):
        assert os.access(root / name, os.X_OK), name
    conffiles = installed.run("dpkg-query", "-W", "-f", "${Conffiles}", "otad").stdout
    assert "/etc/otad/otad.conf" in conffiles
    assert "/etc/default/otad-health-example" in conffiles
    assert installed.run("getent", "group", "otad").stdout.startswith("otad:")


def test_units_enabled_as_packaged(installed: Chroot) -> None:
    states = {
        unit: installed.status("systemctl", "is-enabled", unit).stdout.strip() for unit in UNITS
    }

    assert states == {
        "otad.service": "enabled",
        "otad-commit.service": "enabled",
        "otad-health-example.service": "disabled",
    }


def test_installed_units_verify(installed: Chroot) -> None:
    result = installed.status(
        "systemd-analyze",
        "verify",
        "--man=no",
        *(f"/usr/lib/systemd/system/{unit}" for unit in UNITS),
    )

    assert (result.returncode, result.stdout + result.stderr) == (0, "")
