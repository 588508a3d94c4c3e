"""Removable media end to end: real kernel events, real loop devices, real mounts."""

from __future__ import annotations

import os
import queue
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otad.artifact.reader import VerifyPolicy, verify_artifact
from otad.artifact.signing import Verifier
from otad.artifact.streams import Readable
from otad.config import Action, RemovableConfig
from otad.removable import (
    MediumArtifact,
    MediumFile,
    MediumTracker,
    MediumWatcher,
    Outcome,
    RemovableUpdates,
    Status,
    default_source,
    is_removable,
)
from tests.conftest import require_tool
from tests.removable.conftest import EVENT_DEADLINE, Artifacts, Bench, mounts_under, sha256

INSTALL = RemovableConfig(enabled=True, action=Action.INSTALL)
ANNOUNCE = RemovableConfig(enabled=True, action=Action.ANNOUNCE)


@dataclass
class Installer:
    """The install callable: verifies what it is handed, as Engine.install would, and
    records what the mount looked like while it ran."""

    bench: Bench
    verifier: Verifier
    installed: list[str] = field(default_factory=list)
    mount_options: list[set[str]] = field(default_factory=list)
    mount_modes: list[int] = field(default_factory=list)
    during: Callable[[Readable], Readable] | None = None

    def __call__(self, stream: Readable) -> None:
        (mount,) = mounts_under(self.bench.media_dir)
        self.mount_options.append(set(mount[5].split(",")))
        point = Path(mount[4])
        # The mount covers its directory's own mode; the 0700 parent is what keeps others out.
        self.mount_modes.append(stat.S_IMODE(os.stat(point.parent).st_mode))
        source = self.during(stream) if self.during else stream
        header, _ = verify_artifact(source, VerifyPolicy((self.verifier,), require_signature=True))
        self.installed.append(header.name)


def _updates(
    bench: Bench, artifacts: Artifacts, installer: Installer, config: RemovableConfig = INSTALL
) -> tuple[RemovableUpdates, list[MediumArtifact]]:
    announced: list[MediumArtifact] = []
    updates = RemovableUpdates(
        config,
        (artifacts.verifier,),
        install=installer,
        announce=announced.append,
        media_dir=bench.media_dir,
    )
    return updates, announced


def _assert_released(bench: Bench) -> None:
    assert mounts_under(bench.media_dir) == []
    assert not bench.media_dir.exists() or list(bench.media_dir.iterdir()) == []


def _two(tree: Path, a: Artifacts) -> None:
    shutil.copy(a.good, tree / "a.mender")
    shutil.copy(a.second, tree / "b.MENDER")


Fill = Callable[[Path, Artifacts], object]
# case: (what the medium holds, expected status, words the outcome's message contains)
TREES: dict[str, tuple[Fill, Status, str]] = {
    "good": (lambda t, a: shutil.copy(a.good, t / "update.mender"), Status.INSTALLED, "release-2"),
    "unsigned": (lambda t, a: shutil.copy(a.unsigned, t / "u.mender"), Status.REFUSED, "signature"),
    "tampered": (lambda t, a: shutil.copy(a.tampered, t / "t.mender"), Status.REFUSED, "checksum"),
    "untrusted key": (
        lambda t, a: shutil.copy(a.untrusted, t / "x.mender"),
        Status.REFUSED,
        "trusted key",
    ),
    "empty": (lambda t, a: None, Status.NO_ARTIFACT, "no *.mender file"),
    "only hidden": (
        lambda t, a: shutil.copy(a.good, t / "._update.mender"),
        Status.NO_ARTIFACT,
        "no *.mender file",
    ),
    "in a directory": (
        lambda t, a: shutil.copytree(a.good.parent, t / "updates"),
        Status.NO_ARTIFACT,
        "no *.mender file",
    ),
    "two artifacts": (_two, Status.AMBIGUOUS, "2 artifacts (a.mender, b.MENDER)"),
    "symlink out of the medium": (
        lambda t, a: (t / "update.mender").symlink_to(a.good),
        Status.REFUSED,
        "symbolic link",
    ),
    "directory named like one": (
        lambda t, a: (t / "update.mender").mkdir(),
        Status.REFUSED,
        "not a regular file",
    ),
}


@pytest.mark.parametrize("case", list(TREES))
def test_a_medium_is_installed_or_refused(bench: Bench, artifacts: Artifacts, case: str) -> None:
    fill, status, words = TREES[case]
    tree = bench.root / "tree"
    tree.mkdir()
    fill(tree, artifacts)
    image = bench.image(tree)
    before = sha256(image)
    installer = Installer(bench, artifacts.verifier)
    updates, announced = _updates(bench, artifacts, installer)

    _, medium = bench.insert(image)
    outcome = updates.handle(medium)

    assert outcome.status is status, outcome.message
    assert words in outcome.message
    assert outcome.medium == medium.name
    assert installer.installed == (["release-2"] if status is Status.INSTALLED else [])
    assert announced == []
    _assert_released(bench)
    assert sha256(image) == before  # mounting read-only wrote nothing to the medium


def test_the_first_mountable_partition_is_searched(bench: Bench, artifacts: Artifacts) -> None:
    for tool in ("sfdisk", "partx"):
        require_tool(tool)
    tree = bench.root / "tree"
    tree.mkdir()
    shutil.copy(artifacts.good, tree / "update.mender")
    installer = Installer(bench, artifacts.verifier)
    updates, _ = _updates(bench, artifacts, installer)
    _, medium = bench.insert(bench.partitioned_image(tree), partitions=True)

    outcome = updates.handle(medium)

    assert outcome.status is Status.INSTALLED, outcome.message
    assert outcome.artifact is not None
    assert outcome.artifact.volume == f"{medium.name}p2"
    assert installer.installed == ["release-2"]
    _assert_released(bench)


def test_the_medium_is_mounted_private_read_only_and_noexec(
    bench: Bench, artifacts: Artifacts
) -> None:
    canary = bench.root / "canary"
    tree = bench.root / "tree"
    tree.mkdir()
    shutil.copy(artifacts.good, tree / "update.mender")
    for name in ("autorun.sh", "update.sh", "otad-install"):
        script = tree / name
        script.write_text(f"#!/bin/sh\ntouch {canary}\n")
        script.chmod(0o755)
    tried: list[str] = []

    def try_to_run(stream: Readable) -> Readable:
        (mount,) = mounts_under(bench.media_dir)
        with pytest.raises(PermissionError):
            subprocess.run([Path(mount[4]) / "update.sh"], check=False)
        tried.append(mount[4])
        return stream

    installer = Installer(bench, artifacts.verifier, during=try_to_run)
    updates, _ = _updates(bench, artifacts, installer)
    _, medium = bench.insert(bench.image(tree))

    outcome = updates.handle(medium)

    assert outcome.status is Status.INSTALLED, outcome.message
    assert tried == [str(bench.media_dir / medium.name)]
    (options,) = installer.mount_options
    assert {"ro", "nosuid", "nodev", "noexec", "nosymfollow"} <= options
    assert installer.mount_modes == [0o700]
    assert not canary.exists()
    _assert_released(bench)


def test_a_medium_pulled_while_reading_fails_cleanly(bench: Bench, artifacts: Artifacts) -> None:
    tree = bench.root / "tree"
    tree.mkdir()
    shutil.copy(artifacts.good, tree / "update.mender")
    image = bench.image(tree)
    loop, medium = bench.insert(image)

    class PullAfterFirstBlock:
        """Reads one block, then takes the device's backing away as a pulled stick does."""

        def __init__(self, stream: MediumFile) -> None:
            self.stream = stream
            self.read = 0

        def readinto(self, buffer: memoryview, /) -> int:
            count = self.stream.readinto(buffer)
            self.read += count
            if self.read >= 1 << 20 and image.stat().st_size:
                os.truncate(image, 0)
                subprocess.run(["losetup", "--set-capacity", str(loop)], check=True)
                # The first (verifying) pass left the file in the page cache: drop it,
                # so that the next reads reach the device that is no longer there.
                os.posix_fadvise(self.stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return count

    def pull(stream: Readable) -> Readable:
        assert isinstance(stream, MediumFile)
        return PullAfterFirstBlock(stream)

    installer = Installer(bench, artifacts.verifier, during=pull)
    updates, _ = _updates(bench, artifacts, installer)

    outcome = updates.handle(medium)

    assert outcome.status is Status.FAILED
    assert "removed or failing" in outcome.message
    assert installer.installed == []
    _assert_released(bench)


def test_announce_then_install_once_confirmed(bench: Bench, artifacts: Artifacts) -> None:
    tree = bench.root / "tree"
    tree.mkdir()
    shutil.copy(artifacts.good, tree / "release.mender")
    installer = Installer(bench, artifacts.verifier)
    updates, announced = _updates(bench, artifacts, installer, ANNOUNCE)
    loop, medium = bench.insert(bench.image(tree))

    outcome = updates.handle(medium)

    assert outcome.status is Status.ANNOUNCED, outcome.message
    (offer,) = announced
    assert (offer.file, offer.volume, offer.artifact, offer.version) == (
        "release.mender",
        medium.name,
        "release-2",
        "release-2",
    )
    assert offer.size == artifacts.good.stat().st_size
    assert installer.installed == []
    _assert_released(bench)  # nothing stays mounted while a person decides

    confirmed = updates.install_offered(offer)

    assert confirmed.status is Status.INSTALLED, confirmed.message
    assert installer.installed == ["release-2"]
    _assert_released(bench)

    bench.detach(loop)
    replaced = updates.install_offered(offer)

    assert replaced.status is Status.FAILED
    assert "removed or replaced" in replaced.message
    assert installer.installed == ["release-2"]
    _assert_released(bench)


def test_serve_installs_what_is_inserted(bench: Bench, artifacts: Artifacts) -> None:
    tree = bench.root / "tree"
    tree.mkdir()
    shutil.copy(artifacts.good, tree / "update.mender")
    image = bench.image(tree)
    installer = Installer(bench, artifacts.verifier)
    updates, _ = _updates(bench, artifacts, installer)
    outcomes: queue.Queue[Outcome] = queue.Queue()
    stop = threading.Event()
    with MediumWatcher(bench.accepts, source="kernel") as watcher:
        thread = threading.Thread(target=updates.serve, args=(watcher, stop, outcomes.put, 0.2))
        thread.start()
        try:
            loop = bench.attach(image)
            outcome = outcomes.get(timeout=EVENT_DEADLINE)
        finally:
            stop.set()
            thread.join(timeout=EVENT_DEADLINE)
    assert not thread.is_alive()
    assert (outcome.medium, outcome.status) == (loop.name, Status.INSTALLED)
    assert installer.installed == ["release-2"]
    _assert_released(bench)


def test_disabled_serve_returns_at_once(bench: Bench, artifacts: Artifacts) -> None:
    installer = Installer(bench, artifacts.verifier)
    updates, _ = _updates(bench, artifacts, installer, RemovableConfig(enabled=False))
    with MediumWatcher(bench.accepts, source="kernel") as watcher:
        updates.serve(watcher, threading.Event(), None, 0.1)


def test_without_udev_the_kernel_events_are_used() -> None:
    assert default_source(Path("/nonexistent/udev/control")) == "kernel"


def test_a_loop_device_is_not_removable_storage(bench: Bench, artifacts: Artifacts) -> None:
    tree = bench.root / "tree"
    tree.mkdir()
    loop = bench.attach(bench.image(tree))
    sys_dir = Path("/sys/class/block", loop.name).resolve()
    assert not is_removable(sys_dir, {})
    devpath = "/" + str(sys_dir.relative_to("/sys"))
    properties = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVPATH": devpath}
    assert MediumTracker().consider("change", properties) is None


def test_the_watcher_waits_no_longer_than_asked(bench: Bench) -> None:
    with MediumWatcher(bench.accepts, source="kernel") as watcher:
        assert watcher.next_medium(0.3) is None
