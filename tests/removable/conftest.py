"""Real media for the removable-update tests: ext4 images on loop devices.

A "stick" is a sparse image with an ext4 filesystem made from a prepared tree
(`mkfs.ext4 -d`), attached with `losetup --find --show`. Attaching makes the kernel send
real uevents, which the watcher under test receives on netlink. Loop devices are not
removable in sysfs, so the tests give the watcher a predicate that accepts exactly the
loop devices they attached; the real predicate is tested against a prepared sysfs tree.
Other processes on this machine may attach loop devices meanwhile: the predicate keeps
their events out.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.signing import Signer, Verifier
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.removable import Medium, MediumWatcher
from tests.artifact.conftest import make_payload
from tests.conftest import KeyPair, require_tool

IMAGE_SIZE = 32 << 20
PAYLOAD_SIZE = 6 << 20  # several read blocks, so that a medium can vanish mid-read
EVENT_DEADLINE = 10.0  # seconds to wait for the kernel's event about a new loop device


@dataclass(frozen=True)
class Artifacts:
    """Artifacts made once per session: good ones, an unsigned, a tampered, an untrusted."""

    good: Path
    second: Path
    unsigned: Path
    tampered: Path
    untrusted: Path
    verifier: Verifier


def _write(directory: Path, name: str, payload: Path, signer: Signer | None) -> Path:
    spec = ArtifactSpec(
        name=name,
        device_types=("qemux86-64",),
        payload=rootfs_image(payload, software_version=name),
        compression=Compression.NONE,
        signer=signer,
    )
    return write_artifact(spec, directory / f"{name}.mender").path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]) -> Artifacts:
    directory = tmp_path_factory.mktemp("artifacts")
    payload = make_payload(directory / "rootfs.img", PAYLOAD_SIZE)
    signer = keys["ecdsa"].signer
    good = _write(directory, "release-2", payload, signer)
    tampered = directory / "tampered.mender"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the payload: the manifest's checksum fails
    tampered.write_bytes(data)
    return Artifacts(
        good=good,
        second=_write(directory, "release-3", payload, signer),
        unsigned=_write(directory, "unsigned-2", payload, None),
        tampered=tampered,
        untrusted=_write(directory, "untrusted-2", payload, keys["other"].signer),
        verifier=keys["ecdsa"].verifier,
    )


def _run(*argv: str | Path) -> str:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def mounts_under(directory: Path) -> list[list[str]]:
    """The /proc/self/mountinfo lines (split) of mounts at or below `directory`."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = Path(fields[4])
        if point == directory or directory in point.parents:
            found.append(fields)
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Bench:
    """Makes sticks, attaches them, and cleans up whatever a test left."""

    root: Path
    media_dir: Path
    loops: list[Path] = field(default_factory=list)

    def accepts(self, disk_dir: Path, properties: Mapping[str, str]) -> bool:
        """The tests' detection predicate: loop devices backed by this bench's images.

        Decided from sysfs, not from the name losetup prints: the event may be handled
        (by a serving thread) before losetup has returned.
        """
        try:
            backing = Path((disk_dir / "loop" / "backing_file").read_text().strip())
        except OSError:
            return False
        return self.root in backing.parents

    def image(self, tree: Path, name: str = "stick", size: int = IMAGE_SIZE) -> Path:
        image = self.root / f"{name}.img"
        with image.open("wb") as out:
            out.truncate(size)
        _run("mkfs.ext4", "-q", "-F", "-L", "OTADSTICK", "-d", tree, image)
        return image

    def attach(self, image: Path) -> Path:
        loop = Path(_run("losetup", "--find", "--show", image))
        self.loops.append(loop)
        return loop

    def partitioned_image(self, tree: Path) -> Path:
        """A GPT disk: partition 1 without a filesystem, partition 2 ext4 made from `tree`."""
        image = self.root / "disk.img"
        with image.open("wb") as out:
            out.truncate(IMAGE_SIZE)
        layout = "label: gpt\nsize=4M, name=blank\nsize=20M, name=updates\n"
        subprocess.run(["sfdisk", "-q", str(image)], input=layout, text=True, check=True)
        table = json.loads(_run("sfdisk", "--json", image))["partitiontable"]
        sector = table.get("sectorsize", 512)
        second = table["partitions"][1]
        volume = self.image(tree, "volume", second["size"] * sector)
        with image.open("r+b") as out:
            out.seek(second["start"] * sector)
            out.write(volume.read_bytes())
        return image

    def add_partitions(self, loop: Path) -> None:
        """Tell the kernel about the partitions (it does not scan loop devices here)."""
        _run("partx", "-a", loop)

    def detach(self, loop: Path) -> None:
        # Partitions added by partx outlive the loop device unless they are dropped.
        subprocess.run(["partx", "-d", str(loop)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", str(loop)], capture_output=True, check=False)

    def insert(
        self, image: Path, watcher: MediumWatcher | None = None, *, partitions: bool = False
    ) -> tuple[Path, Medium]:
        """Attach `image` and wait for the watcher to report it as a medium."""
        own = watcher or MediumWatcher(self.accepts, source="kernel")
        try:
            loop = self.attach(image)
            if partitions:
                self.add_partitions(loop)
            medium = own.next_medium(EVENT_DEADLINE)
        finally:
            if watcher is None:
                own.close()
        assert medium is not None, f"no kernel event for {loop} within {EVENT_DEADLINE} s"
        assert medium.name == loop.name
        return loop, medium

    def cleanup(self) -> None:
        for fields in reversed(mounts_under(self.media_dir)):
            subprocess.run(["umount", "--lazy", fields[4]], capture_output=True, check=False)
        for loop in self.loops:
            self.detach(loop)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "blkid"):
        require_tool(tool)
    bench = Bench(tmp_path, tmp_path / "run" / "media")
    try:
        yield bench
    finally:
        bench.cleanup()
