"""A Mender deployment whose download a SIGKILL of the daemon cuts short.

The real otad on a private bus (tests/service/conftest.py) is managed by the fake Mender
server (tests/fleet/server.py), which hands the deployment out at every poll until it
gets a final status, each time with a fresh pre-signed query; the artifact comes from
nginx through a proxy that holds the first download after a given number of bytes, so
that the kill comes at a known place. After the restart no failure is reported: the next
poll hands the same deployment out again and the install resumes from the slot (an
uncompressed artifact with a chunk index; compressed ones written by otad-artifact
resume too, see test_restart.py) or starts over (a compressed one in one gzip member,
as other tools write it); nginx's access log tells how many bytes the second attempt
fetched. Success is reported after
the trial boot is committed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.reader import verify_artifact
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.bootloader.base import Slot
from otad.resume import RECORD_NAME, ResumeStore
from tests.conftest import KeyPair
from tests.download.conftest import CHUNK_SIZE
from tests.download.faults import Fault, FaultProxy, Kind
from tests.download.servers import Nginx, Pki
from tests.fleet.server import FakeMender, Offer
from tests.service.conftest import Daemon, MakeDaemon, bus, connect, make_daemon, run
from tests.service.test_fleet import properties, server_config, statuses, wait_until

__all__ = ["bus", "make_daemon"]  # the daemon's fixtures, used here over nginx's

IMAGE = 6 << 20  # bytes of random image: 24 chunks of 256 KiB
FSYNC = 1 << 20  # the slot writer's fsync watermark, where the resume record is saved
HELD_AFTER = 4 << 20  # bytes of the image the first download gets before it is held
_LOG = re.compile(r'^\d+ (\d+) "([^"?]*)(?:\?[^"]*)?" "([^"]*)" (\d+)$')


@dataclass(frozen=True)
class Release:
    path: Path
    image: bytes
    offset: int | None  # where the image starts in the artifact; None when compressed

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@pytest.fixture(scope="module")
def releases(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]
) -> dict[str, Release]:
    """release-4 with the same 6 MiB image twice: uncompressed (resumable) and gzip in
    one member, as tools other than otad-artifact write it (not resumable)."""
    directory = tmp_path_factory.mktemp("fleet-artifacts")
    image = directory / "release-4.img"
    image.write_bytes(random.Random(4).randbytes(IMAGE))
    made = {}
    for compression in (Compression.NONE, Compression.GZIP):
        spec = ArtifactSpec(
            name="release-4",
            device_types=("otad-test",),
            payload=rootfs_image(image, software_version="4", chunk_size=CHUNK_SIZE),
            compression=compression,
            signer=keys["ecdsa"].signer,
            member_chunks=0,
        )
        path = write_artifact(spec, directory / f"release-4-{compression.value}.mender").path
        with path.open("rb") as stream:
            _, files = verify_artifact(stream)
        made[compression.value] = Release(path, image.read_bytes(), files[0].artifact_offset)
    return made


@pytest.fixture
def server() -> Iterator[FakeMender]:
    mender = FakeMender()
    try:
        yield mender
    finally:
        mender.close()
    assert mender.violations == []


@dataclass(frozen=True)
class Request:
    status: int
    range: str
    sent: int


def _requests(nginx: Nginx, path: str) -> list[Request]:
    """nginx's log of `path`, whatever the query (each request is logged when it ends)."""
    found = []
    for line in nginx.access_log():
        match = _LOG.match(line)
        if match and match.group(2) == path:
            found.append(Request(int(match.group(1)), match.group(3), int(match.group(4))))
    return found


def _wait_for_requests(nginx: Nginx, path: str, count: int) -> list[Request]:
    deadline = time.monotonic() + 60
    while len(found := _requests(nginx, path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == count, found
    return found


class Hold:
    """The proxy's fault: the first download stops after a number of bytes until released."""

    def __init__(self) -> None:
        self.struck = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:  # on the proxy's thread, just before the fault
        self.struck.set()
        self.released.wait(60)


def _daemon(make_daemon: MakeDaemon, server: FakeMender, pki: Pki) -> Daemon:
    download = f'ca_bundle = "{pki.ca}"\nconnect_timeout = 5\nread_timeout = 120\n'
    config = server_config(server, download=download)
    config += f"\n[install]\nfsync_interval = {FSYNC}\n"
    daemon = make_daemon(extra_config=config)
    daemon.start()
    return daemon


def _saved(daemon: Daemon) -> int | None:
    """The verified bytes of the last resume record the daemon logged it saved."""
    found = re.findall(r"resume record saved: (\d+) bytes", daemon.log_text())
    return int(found[-1]) if found else None


def _progress(daemon: Daemon) -> int:
    """The last install progress (percent) the daemon told systemd."""
    found = re.findall(r"STATUS=installing, .*, install (\d+)%", daemon.log_text())
    return int(found[-1]) if found else 0


def _kill_while_held(daemon: Daemon, hold: Hold, logged: Callable[[], bool]) -> None:
    """SIGKILL the daemon once its download is held and `logged()` holds.

    The daemon cannot get past the held byte, so the kill comes at a known place of the
    download; how far the record got by then depends on the slot writer's fsyncs, which
    run on a thread of their own, so the tests check the resume against the record and
    the slot rather than against a fixed figure.
    """
    wait_until("the download held by the proxy", hold.struck.is_set, daemon)
    wait_until("the log line awaited", logged, daemon)
    daemon.kill()
    hold.released.set()


def _slot_b_holds(daemon: Daemon, image: bytes) -> bool:
    with daemon.device.disk.partitions["b"].open("rb") as slot:
        return slot.read(len(image)) == image


def _commit_after_the_reboot(daemon: Daemon, server: FakeMender, deployment: str) -> None:
    assert daemon.reboot_device() is Slot.B

    async def commit() -> None:
        client = await connect(daemon.bus)
        await client.commit()
        await client.close()

    run(commit())
    wait_until("success reported", lambda: statuses(server, deployment)[-1:] == ["success"],
               daemon)  # fmt: skip


def _fleet_record(daemon: Daemon) -> dict[str, object]:
    path = daemon.device.store.path.parent / "fleet" / "deployment.json"
    value: dict[str, object] = json.loads(path.read_text())
    return value


def test_a_deployment_killed_mid_download_resumes_from_the_slot_at_the_next_poll(
    make_daemon: MakeDaemon, server: FakeMender, nginx: Nginx, pki: Pki,
    releases: dict[str, Release],
) -> None:  # fmt: skip
    release = releases["none"]
    assert release.offset is not None
    shutil.copy(release.path, nginx.www / "big.mender")
    hold = Hold()
    held = Fault(Kind.STALL, after=release.offset + HELD_AFTER, before=hold)
    with FaultProxy(nginx.ports.tls, [held]) as proxy:
        server.script.offers.append(Offer("fl-1", "release-4", None, url=proxy.url("/big.mender")))
        daemon = _daemon(make_daemon, server, pki)
        running = daemon.device.slot_digest(Slot.A)
        # Past a third of the image: at least 2 MiB of it are in the slot (page cache).
        _kill_while_held(daemon, hold, lambda: _progress(daemon) >= 33)

        assert statuses(server, "fl-1") == ["downloading", "installing"]
        record = ResumeStore(daemon.device.store.path.parent).load()
        assert record is not None
        assert (record.deployment, record.target) == ("fl-1", Slot.B)
        assert record.artifact_offset == release.offset
        assert record.verified == _saved(daemon)
        assert record.url == server.handed_out[0][1]
        _wait_for_requests(nginx, "/big.mender", 1)

        daemon.start()
        wait_until("the reboot after the install", daemon.reboots.exists, daemon)

    assert statuses(server, "fl-1") == ["downloading", "installing", "rebooting"]
    assert "fl-1" not in server.logs  # nothing was reported failed
    [(_, uri_1), (_, uri_2)] = server.handed_out
    assert uri_1.split("?")[0] == uri_2.split("?")[0]
    assert uri_1 != uri_2
    log = daemon.log_text()
    assert "resumes when the Mender server hands the deployment out again" in log
    assert "resuming the interrupted install" not in log  # not by the Updater at start
    assert "resuming the download of" in log
    again = _wait_for_requests(nginx, "/big.mender", 3)[1:]
    assert again[0] == Request(206, f"bytes=0-{release.offset - 1}", release.offset)
    assert again[1].status == 206
    resume_at = int(again[1].range.removeprefix("bytes=").rstrip("-"))
    assert resume_at >= release.offset + record.verified
    fetched = sum(request.sent for request in again)
    assert fetched == release.offset + release.size - resume_at
    assert fetched <= release.size - FSYNC
    assert _slot_b_holds(daemon, release.image)
    assert daemon.device.slot_digest(Slot.A) == running
    assert not (daemon.device.store.path.parent / RECORD_NAME).exists()
    assert (_fleet_record(daemon)["stage"], _fleet_record(daemon)["interruptions"]) == (
        "rebooting",
        1,
    )

    _commit_after_the_reboot(daemon, server, "fl-1")
    assert statuses(server, "fl-1") == ["downloading", "installing", "rebooting", "success"]
    values = properties(daemon)
    assert (values["CurrentArtifact"], values["DeploymentStatus"]) == ("release-4", "success")
    assert server.script.offers == deque()  # ended by the success
    assert len(server.handed_out) == 2


def test_a_compressed_deployment_killed_mid_download_starts_over_at_the_next_poll(
    make_daemon: MakeDaemon, server: FakeMender, nginx: Nginx, pki: Pki,
    releases: dict[str, Release],
) -> None:  # fmt: skip
    release = releases["gzip"]
    shutil.copy(release.path, nginx.www / "big.mender")
    hold = Hold()
    held = Fault(Kind.STALL, after=release.size // 2, before=hold)
    with FaultProxy(nginx.ports.tls, [held]) as proxy:
        server.script.offers.append(Offer("fl-2", "release-4", None, url=proxy.url("/big.mender")))
        daemon = _daemon(make_daemon, server, pki)
        _kill_while_held(daemon, hold, lambda: (_saved(daemon) or 0) >= FSYNC)

        assert statuses(server, "fl-2") == ["downloading", "installing"]
        record = ResumeStore(daemon.device.store.path.parent).load()
        assert record is not None
        assert record.member_offset is not None
        assert (record.artifact_offset, record.boundary_image) == (None, None)
        _wait_for_requests(nginx, "/big.mender", 1)

        daemon.start()
        wait_until("the reboot after the install", daemon.reboots.exists, daemon)

    assert statuses(server, "fl-2") == ["downloading", "installing", "rebooting"]
    assert "fl-2" not in server.logs
    log = daemon.log_text()
    assert "not resuming the download of" in log
    assert "has no gzip member, xz stream or zstd frame that starts on a chunk" in log
    member = record.member_offset
    again = _wait_for_requests(nginx, "/big.mender", 3)[1:]
    assert [(r.status, r.range, r.sent) for r in again] == [
        (206, f"bytes=0-{member - 1}", member),
        (206, f"bytes={member}-", release.size - member),
    ]
    assert _slot_b_holds(daemon, release.image)

    _commit_after_the_reboot(daemon, server, "fl-2")
    assert statuses(server, "fl-2") == ["downloading", "installing", "rebooting", "success"]
