"""An https install killed with SIGKILL mid-download resumes after the restart.

A child process (tests/download/killable.py) installs from nginx with the real engine
onto a loop-device slot and pauses after each save of the resume record; the test kills
it there, restarts the engine as the daemon does (after a daemon restart or a power
cut), installs the same URL again or lets the Updater resume by itself, and checks from
nginx's access log how many bytes the second attempt fetched. Compressed artifacts
(gzip, zstd) resume at the last member that starts before what the slot holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.reader import PayloadFile, verify_artifact
from otad.artifact.writer import MEMBER_CHUNKS as DEFAULT_MEMBER_CHUNKS
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.bootloader.base import Slot
from otad.download import DownloadError, DownloadSettings, HttpSource
from otad.engine import Engine
from otad.errors import Cancelled, ChunkMismatch, StateCorrupt
from otad.resume import RECORD_NAME, Interrupted, ResumeRecord, ResumeStore, parse, serialize
from otad.state import SlotStatus
from otad.updater import ServiceState, Updater
from tests.conftest import KeyPair
from tests.download.conftest import CHUNK_SIZE, Artifact, Device, settings_for
from tests.download.faults import Fault, FaultProxy, Kind
from tests.download.servers import Nginx, Pki

ROOT = Path(__file__).resolve().parents[2]
BIG = 6 << 20  # bytes of random image: 24 chunks, 6 fsync watermarks of 1 MiB
FSYNC = 1 << 20
_LOG = re.compile(r'^\d+ (\d+) "([^"]*)" "([^"]*)" (\d+)$')


@dataclass(frozen=True)
class Big:
    path: Path
    image: bytes
    offset: int

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _write_signed(
    image: Path,
    path: Path,
    name: str,
    compression: Compression,
    keys: dict[str, KeyPair],
    member_chunks: int = DEFAULT_MEMBER_CHUNKS,
) -> PayloadFile:
    """Write `image` as the ECDSA-signed rootfs artifact `path` named `name` (its last
    character the software version); what verifying it says of the image file."""
    spec = ArtifactSpec(
        name=name,
        device_types=("otad-test",),
        payload=rootfs_image(image, software_version=name[-1], chunk_size=CHUNK_SIZE),
        compression=compression,
        member_chunks=member_chunks,
        signer=keys["ecdsa"].signer,
    )
    write_artifact(spec, path)
    with path.open("rb") as stream:
        _, files = verify_artifact(stream)
    return files[0]


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]) -> dict[str, Big]:
    """Two signed uncompressed artifacts of 6 MiB random images, release-4 and release-5."""
    directory = tmp_path_factory.mktemp("big-artifacts")
    made = {}
    for name, seed in (("release-4", 4), ("release-5", 5)):
        image = directory / f"{name}.img"
        image.write_bytes(random.Random(seed).randbytes(BIG))
        path = directory / f"{name}.mender"
        offset = _write_signed(image, path, name, Compression.NONE, keys).artifact_offset
        assert offset is not None
        made[name] = Big(path, image.read_bytes(), offset)
    return made


MEMBER_CHUNKS = 4  # a gzip member or zstd frame every MiB of the image


@dataclass(frozen=True)
class Packed:
    path: Path
    image: bytes
    member_offset: int  # where the compressed data member starts in the artifact

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@pytest.fixture(scope="session")
def packed(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair], big: dict[str, Big]
) -> dict[str, Packed]:
    """release-4's image as signed gzip and zstd artifacts, a member every MiB; and
    "gzip-zeros", whose image holds zeros from byte 2 MiB to byte 4 MiB."""
    directory = tmp_path_factory.mktemp("packed-artifacts")
    random_image = big["release-4"].image
    holey = random_image[: 2 << 20] + bytes(2 << 20) + random_image[4 << 20 :]
    made = {}
    for key, compression, content in (
        ("gzip", Compression.GZIP, random_image),
        ("zstd", Compression.ZSTD, random_image),
        ("gzip-zeros", Compression.GZIP, holey),
    ):
        image = directory / f"{key}.img"
        image.write_bytes(content)
        path = directory / f"release-4-{key}.mender"
        written = _write_signed(image, path, "release-4", compression, keys, MEMBER_CHUNKS)
        assert written.member_offset is not None
        made[key] = Packed(path, content, written.member_offset)
    return made


def _serve_packed(nginx: Nginx, artifact: Packed) -> str:
    shutil.copy(artifact.path, nginx.www / "packed.mender")
    return f"https://localhost:{nginx.ports.tls}/packed.mender"


def _probe_range(artifact: Packed, resume_at: int) -> str:
    """The Range of the request that checks the recorded boundary before the resume."""
    end = min(resume_at + CHUNK_SIZE + CHUNK_SIZE // 64 + 4096, artifact.size)
    return f"bytes={resume_at}-{end - 1}"


@pytest.fixture
def served(nginx: Nginx, big: dict[str, Big]) -> str:
    """The URL of release-4 on nginx."""
    shutil.copy(big["release-4"].path, nginx.www / "big.mender")
    return f"https://localhost:{nginx.ports.tls}/big.mender"


@pytest.fixture
def resumable(device: Device, pki: Pki) -> Device:
    """The device with fsyncs every MiB and the test CA trusted for downloads."""
    text = device.config_text + (
        f'[install]\nfsync_interval = {FSYNC}\n[download]\nca_bundle = "{pki.ca}"\n'
        "retries = 1\nconnect_timeout = 5\nread_timeout = 30\n"
    )
    return replace(device, config_text=text)


@dataclass(frozen=True)
class Request:
    status: int
    range: str
    sent: int


def _requests(nginx: Nginx, path: str) -> list[Request]:
    found = []
    for line in nginx.access_log():
        match = _LOG.match(line)
        if match and match.group(2) == path:
            found.append(Request(int(match.group(1)), match.group(3), int(match.group(4))))
    return found


def _wait_for_requests(nginx: Nginx, path: str, count: int) -> list[Request]:
    """The access log's requests of `path` once it has `count` (nginx logs each request
    when it ends, a killed client's when it notices); the bound is only a safety net."""
    deadline = time.monotonic() + 60
    while len(found := _requests(nginx, path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == count, found
    return found


def _kill_mid_download(device: Device, tmp_path: Path, pki: Pki, url: str, at: int) -> int:
    """Run the child install and SIGKILL it once the record holds `at` verified bytes.

    Returns the verified bytes the last saved record holds.
    """
    config = tmp_path / "otad.conf"
    config.write_text(device.config_text)
    setup = tmp_path / "setup.json"
    setup.write_text(
        json.dumps(
            {
                "config": str(config),
                "bootloader": str(device.bootloader.path),
                "proc": str(device.kernel.root),
                "data": str(device.store.directory),
                "key": device.verifier.source,
            }
        )
    )
    argv = [sys.executable, "-m", "tests.download.killable", str(setup), url, str(pki.ca)]
    with subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        for line in child.stdout:
            words = line.split()
            if words[:1] != ["point"]:
                continue
            if words[2] == "saved" and int(words[3]) >= at:
                child.send_signal(signal.SIGKILL)
                child.wait()
                return int(words[3])
            child.stdin.write("go\n")
            child.stdin.flush()
        _, stderr = child.communicate()
    raise AssertionError(f"the child ended before {at} bytes were recorded: {stderr}")


def _record(device: Device) -> ResumeRecord | None:
    return ResumeStore(device.store.directory).load()


def _check_installed(device: Device, image: bytes) -> None:
    assert device.bootloader.status().trial is Slot.B
    state = device.engine().snapshot().state
    assert state.slots[Slot.B].status is SlotStatus.TRIAL
    assert state.slots[Slot.A].status is SlotStatus.GOOD
    assert device.disk.partitions["b"].read_bytes()[: len(image)] == image
    assert not (device.store.directory / RECORD_NAME).exists()


@pytest.mark.parametrize("restart", ["daemon restart", "power cut"])
def test_a_killed_install_resumes_when_the_url_is_installed_again(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    big: dict[str, Big],
    served: str,
    restart: str,
) -> None:
    artifact = big["release-4"]
    running = resumable.slot_digest(Slot.A)
    recorded = _kill_mid_download(resumable, tmp_path, pki, served, at=4 << 20)
    record = _record(resumable)
    assert record is not None
    assert record.verified == recorded
    assert record.artifact_offset == artifact.offset
    assert record.target is Slot.B
    assert (os.stat(resumable.store.directory / RECORD_NAME).st_mode & 0o777) == 0o600
    assert len(_wait_for_requests(nginx, "/big.mender", 1)) == 1

    if restart == "power cut":
        engine = resumable.reboot()
    else:
        engine = resumable.engine()
        engine.recover()
    assert resumable.bootloader.status().trial is None
    with HttpSource(served, settings_for(pki)) as source:
        result = engine.install(source)

    assert result.resumed_from is not None
    assert recorded <= result.resumed_from < len(artifact.image)
    assert result.resumed_from % CHUNK_SIZE == 0
    resume_at = artifact.offset + result.resumed_from
    again = _wait_for_requests(nginx, "/big.mender", 3)[1:]
    assert [(r.status, r.range) for r in again] == [
        (206, f"bytes=0-{artifact.offset - 1}"),
        (206, f"bytes={resume_at}-"),
    ]
    fetched = sum(r.sent for r in again)
    assert fetched == artifact.offset + artifact.size - resume_at
    assert fetched < artifact.size // 3 + 64 * 1024
    _check_installed(resumable, artifact.image)
    assert resumable.slot_digest(Slot.A) == running


@pytest.mark.parametrize(
    ("compression", "restart"), [("gzip", "power cut"), ("zstd", "daemon restart")]
)
def test_a_killed_install_of_a_compressed_artifact_resumes_at_its_last_member(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    packed: dict[str, Packed],
    caplog: pytest.LogCaptureFixture,
    compression: str,
    restart: str,
) -> None:
    artifact = packed[compression]
    url = _serve_packed(nginx, artifact)
    running = resumable.slot_digest(Slot.A)
    recorded = _kill_mid_download(resumable, tmp_path, pki, url, at=4 << 20)
    record = _record(resumable)
    assert record is not None
    assert record.verified == recorded
    assert (record.artifact_offset, record.member_offset) == (None, artifact.member_offset)
    assert record.boundary_image is not None
    assert record.boundary_compressed is not None
    member = MEMBER_CHUNKS * CHUNK_SIZE
    assert recorded - member <= record.boundary_image <= recorded
    assert record.boundary_image % member == 0
    assert len(_wait_for_requests(nginx, "/packed.mender", 1)) == 1

    if restart == "power cut":
        engine = resumable.reboot()
    else:
        engine = resumable.engine()
        engine.recover()
    with caplog.at_level(logging.INFO), HttpSource(url, settings_for(pki)) as source:
        result = engine.install(source)

    assert result.resumed_from == record.boundary_image
    assert "goes on with the member that starts at byte" in caplog.text
    resume_at = artifact.member_offset + record.boundary_compressed
    again = _wait_for_requests(nginx, "/packed.mender", 4)[1:]
    assert [(r.status, r.range) for r in again] == [
        (206, f"bytes=0-{artifact.member_offset - 1}"),
        (206, _probe_range(artifact, resume_at)),
        (206, f"bytes={resume_at}-"),
    ]
    assert again[0].sent == artifact.member_offset
    assert again[2].sent == artifact.size - resume_at
    fetched = sum(r.sent for r in again)
    assert fetched < artifact.size - (3 << 20)  # the image is random: it does not compress
    _check_installed(resumable, artifact.image)
    assert resumable.slot_digest(Slot.A) == running


def test_no_resume_is_recorded_at_a_member_that_starts_with_a_repeated_chunk(
    resumable: Device, tmp_path: Path, pki: Pki, nginx: Nginx, packed: dict[str, Packed]
) -> None:
    """A member that starts with a chunk found elsewhere in the image (zeros) could be
    mistaken for another: the record keeps the last one that starts with a unique chunk."""
    artifact = packed["gzip-zeros"]
    url = _serve_packed(nginx, artifact)
    recorded = _kill_mid_download(resumable, tmp_path, pki, url, at=3 << 20)
    record = _record(resumable)
    assert record is not None
    assert recorded >= 3 << 20
    assert record.boundary_image == 1 << 20  # not 2 or 3 MiB, where zeros start members
    _wait_for_requests(nginx, "/packed.mender", 1)

    engine = resumable.reboot()
    with HttpSource(url, settings_for(pki)) as source:
        result = engine.install(source)
    assert result.resumed_from == 1 << 20
    _check_installed(resumable, artifact.image)


@pytest.mark.parametrize(
    ("lie", "why"),
    [
        ("compressed offset", "the recorded boundary is not usable: its compressed data at"),
        ("image offset", "does not decode to chunk"),
        ("past the slot", "is past the"),
        ("repeated chunk", "which is not unique in the image"),
    ],
)
def test_a_resume_record_with_a_wrong_boundary_starts_over(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    packed: dict[str, Packed],
    caplog: pytest.LogCaptureFixture,
    lie: str,
    why: str,
) -> None:
    """The boundary is not signed: one that does not decode to the signed chunk it
    claims is found before it is used, and the install starts over from byte 0."""
    artifact = packed["gzip-zeros" if lie == "repeated chunk" else "gzip"]
    url = _serve_packed(nginx, artifact)
    _kill_mid_download(resumable, tmp_path, pki, url, at=3 << 20)
    _wait_for_requests(nginx, "/packed.mender", 1)
    store = ResumeStore(resumable.store.directory)
    record = store.load()
    assert record is not None
    assert record.boundary_compressed is not None
    assert record.boundary_image is not None
    if lie == "repeated chunk":
        # The member at 3 MiB, said to be the one at 2 MiB: both start with zeros, so
        # the probe alone could not tell them apart.
        with artifact.path.open("rb") as stream:
            _, files = verify_artifact(stream)
        (at_3,) = [b for b in files[0].boundaries() if b.decompressed == 3 << 20]
        wrong = replace(record, boundary_compressed=at_3.compressed, boundary_image=2 << 20)
    elif lie == "compressed offset":
        wrong = replace(record, boundary_compressed=record.boundary_compressed + 1)
    elif lie == "image offset":
        wrong = replace(record, boundary_image=record.boundary_image - CHUNK_SIZE)
    else:
        wrong = replace(record, boundary_image=len(artifact.image) + CHUNK_SIZE)
    store.save(wrong)

    engine = resumable.reboot()
    with caplog.at_level(logging.INFO), HttpSource(url, settings_for(pki)) as source:
        result = engine.install(source)

    assert result.resumed_from is None
    assert "not resuming the download" in caplog.text
    assert why in caplog.text
    member = artifact.member_offset
    probed = 0 if lie in ("past the slot", "repeated chunk") else 1
    again = _wait_for_requests(nginx, "/packed.mender", 3 + probed)[1:]
    assert [(r.status, r.range) for r in again[:1] + again[1 + probed :]] == [
        (206, f"bytes=0-{member - 1}"),
        (206, f"bytes={member}-"),
    ]
    assert again[-1].sent == artifact.size - member
    _check_installed(resumable, artifact.image)


class _Listener:
    def __init__(self) -> None:
        self.states: list[tuple[ServiceState, str]] = []
        self.completions: list[tuple[Exception | None, str]] = []
        self.done = asyncio.Event()

    def status_changed(self, status: object) -> None:
        self.states.append((status.state, status.progress_message))  # type: ignore[attr-defined]

    def completed(self, job: str, error: Exception | None, message: str) -> None:
        self.completions.append((error, message))
        self.done.set()


async def _start_daemon(engine: Engine) -> tuple[Updater, _Listener, ServiceState]:
    listener = _Listener()
    updater = Updater(engine, reboot=lambda: None, listener=listener)
    status = await updater.start()
    return updater, listener, status.state


def test_the_daemon_resumes_a_killed_install_by_itself_when_it_starts(
    resumable: Device, tmp_path: Path, pki: Pki, nginx: Nginx, big: dict[str, Big], served: str
) -> None:
    artifact = big["release-4"]
    recorded = _kill_mid_download(resumable, tmp_path, pki, served, at=3 << 20)
    _wait_for_requests(nginx, "/big.mender", 1)

    async def restart() -> tuple[ServiceState, _Listener]:
        updater, listener, state = await _start_daemon(resumable.engine())
        await asyncio.wait_for(listener.done.wait(), 120)
        await updater.stop(10)
        return state, listener

    state, listener = asyncio.run(restart())

    assert state is ServiceState.INSTALLING
    assert any("resuming the interrupted download" in text for _, text in listener.states)
    assert listener.completions[0][0] is None, listener.completions
    again = _wait_for_requests(nginx, "/big.mender", 3)[1:]
    assert again[1].range.startswith("bytes=")
    resume_at = int(again[1].range.removeprefix("bytes=").rstrip("-"))
    assert resume_at >= artifact.offset + recorded
    assert sum(r.sent for r in again) == artifact.offset + artifact.size - resume_at
    _check_installed(resumable, artifact.image)


@pytest.mark.parametrize(
    ("replacement", "why"),
    [
        ("release-5", "the server now serves release-5"),  # another signed artifact
        ("release-4", "the server's etag"),  # the same bytes, served anew: validators
    ],
)
def test_a_replaced_artifact_starts_over(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    big: dict[str, Big],
    served: str,
    caplog: pytest.LogCaptureFixture,
    replacement: str,
    why: str,
) -> None:
    _kill_mid_download(resumable, tmp_path, pki, served, at=3 << 20)
    _wait_for_requests(nginx, "/big.mender", 1)
    new = nginx.www / "big.mender.new"
    shutil.copy(big[replacement].path, new)
    later = (nginx.www / "big.mender").stat().st_mtime + 100
    os.utime(new, (later, later))
    os.replace(new, nginx.www / "big.mender")

    engine = resumable.reboot()
    with caplog.at_level(logging.INFO), HttpSource(served, settings_for(pki)) as source:
        result = engine.install(source)

    assert result.artifact == replacement
    assert result.resumed_from is None
    assert "not resuming the download" in caplog.text
    assert why in caplog.text
    again = _wait_for_requests(nginx, "/big.mender", 3)[1:]
    assert sum(r.sent for r in again) == big[replacement].size
    _check_installed(resumable, big[replacement].image)


@pytest.mark.parametrize("damage", ["truncated", "edited", "empty"])
def test_a_damaged_resume_record_starts_over(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    big: dict[str, Big],
    served: str,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    artifact = big["release-4"]
    _kill_mid_download(resumable, tmp_path, pki, served, at=3 << 20)
    _wait_for_requests(nginx, "/big.mender", 1)
    path = resumable.store.directory / RECORD_NAME
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "edited":
        value = json.loads(text)
        value["verified"] += CHUNK_SIZE
        path.write_text(json.dumps(value))
    else:
        path.write_text("")

    engine = resumable.reboot()
    with caplog.at_level(logging.INFO), HttpSource(served, settings_for(pki)) as source:
        result = engine.install(source)

    assert result.resumed_from is None
    assert "resume record" in caplog.text
    assert "starts over" in caplog.text
    again = _wait_for_requests(nginx, "/big.mender", 2)[1:]
    assert [(r.status, r.range, r.sent) for r in again] == [(200, "-", artifact.size)]
    _check_installed(resumable, artifact.image)


def test_a_chunk_changed_in_the_slot_is_found_and_rewritten(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    big: dict[str, Big],
    served: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A slot that no longer holds what the record says was fsynced is not resumed from:
    the install starts over, verifies every chunk from the network and rewrites the
    changed one; nothing unverified is activated."""
    artifact = big["release-4"]
    _kill_mid_download(resumable, tmp_path, pki, served, at=3 << 20)
    _wait_for_requests(nginx, "/big.mender", 1)
    with resumable.disk.partitions["b"].open("r+b") as slot:
        slot.seek(CHUNK_SIZE + 100)
        slot.write(b"\x5a" * 4096)
        os.fsync(slot.fileno())

    engine = resumable.reboot()
    with caplog.at_level(logging.INFO), HttpSource(served, settings_for(pki)) as source:
        result = engine.install(source)

    assert result.resumed_from is None
    assert f"holds {CHUNK_SIZE} verified bytes of the image" in caplog.text
    assert "it was changed since" in caplog.text
    assert result.bytes_written >= CHUNK_SIZE
    again = _wait_for_requests(nginx, "/big.mender", 3)[1:]
    assert sum(r.sent for r in again) == artifact.size
    _check_installed(resumable, artifact.image)


def test_a_slot_changed_after_the_count_fails_verification_and_activates_nothing(
    resumable: Device,
    tmp_path: Path,
    pki: Pki,
    nginx: Nginx,
    big: dict[str, Big],
    served: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the slot changes between the check of its chunks and their use, the reader's own
    check of every chunk refuses them: the install fails, nothing is activated."""
    import otad.splice

    _kill_mid_download(resumable, tmp_path, pki, served, at=3 << 20)
    _wait_for_requests(nginx, "/big.mender", 1)
    counted = otad.splice.resume_point

    def count_then_change(*args: object, **kwargs: object) -> object:
        point = counted(*args, **kwargs)  # type: ignore[arg-type]
        with resumable.disk.partitions["b"].open("r+b") as slot:
            slot.write(b"\xa5" * 4096)
        return point

    monkeypatch.setattr(otad.splice, "resume_point", count_then_change)
    engine = resumable.reboot()
    with HttpSource(served, settings_for(pki)) as source, pytest.raises(ChunkMismatch):
        engine.install(source)

    assert resumable.bootloader.status().trial is None
    state = engine.snapshot().state
    assert state.slots[Slot.B].status is SlotStatus.EMPTY
    assert state.last is not None
    assert not state.last.success
    assert _record(resumable) is None  # a failed verification is not resumed


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
def test_a_cancel_clears_the_record_and_an_interruption_keeps_it(
    resumable: Device, pki: Pki, nginx: Nginx, big: dict[str, Big], served: str, stop: str
) -> None:
    artifact = big["release-4"]
    event = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 4 << 20:
            event.set()

    stops = {"cancel": event} if stop == "cancel" else {"interrupt": event}
    engine = resumable.engine()
    expected = Cancelled if stop == "cancel" else Interrupted
    with HttpSource(served, settings_for(pki)) as source, pytest.raises(expected) as raised:
        engine.install(source, progress=progress, **stops)  # type: ignore[arg-type]
    assert type(raised.value) is expected
    assert resumable.bootloader.status().trial is None

    record = _record(resumable)
    if stop == "cancel":
        assert record is None
        return
    assert record is not None
    assert record.verified >= 2 << 20
    assert not record.failed  # the daemon resumes it by itself at its next start
    with HttpSource(served, settings_for(pki)) as source:
        result = engine.install(source)
    assert result.resumed_from is not None
    assert result.resumed_from >= record.verified
    _check_installed(resumable, artifact.image)


def test_an_install_that_the_network_gave_up_on_resumes_when_installed_again(
    resumable: Device, pki: Pki, nginx: Nginx, big: dict[str, Big], served: str
) -> None:
    artifact = big["release-4"]
    with FaultProxy(nginx.ports.tls, [Fault(Kind.CLOSE, 4 << 20)]) as proxy:
        url = proxy.url("/big.mender")
        with (
            HttpSource(url, settings_for(pki, retries=0)) as source,
            pytest.raises(DownloadError),
        ):
            resumable.engine().install(source)
        record = _record(resumable)
        assert record is not None
        assert record.failed
        assert record.verified >= 1 << 20

        with HttpSource(url, settings_for(pki)) as source:
            result = resumable.engine().install(source)
    assert result.resumed_from is not None
    assert result.resumed_from >= record.verified
    _check_installed(resumable, artifact.image)


def test_with_no_resume_attempts_the_daemon_leaves_it_to_the_next_install(
    resumable: Device, tmp_path: Path, pki: Pki, nginx: Nginx, served: str
) -> None:
    _kill_mid_download(resumable, tmp_path, pki, served, at=2 << 20)
    record = _record(resumable)
    off = replace(resumable, config_text=resumable.config_text + "resume_attempts = 0\n")

    async def restart() -> ServiceState:
        updater, _, state = await _start_daemon(off.engine())
        await updater.stop(10)
        return state

    assert asyncio.run(restart()) is ServiceState.IDLE
    assert _record(resumable) == record
    with HttpSource(served, settings_for(pki)) as source:
        result = off.engine().install(source)
    assert result.resumed_from is not None


def test_the_daemon_gives_up_after_its_resume_attempts(
    resumable: Device, tmp_path: Path, pki: Pki, nginx: Nginx, served: str
) -> None:
    _kill_mid_download(resumable, tmp_path, pki, served, at=2 << 20)
    store = ResumeStore(resumable.store.directory)
    record = store.load()
    assert record is not None
    store.save(replace(record, attempts=DownloadSettings().resume_attempts))

    async def restart() -> tuple[Updater, ServiceState]:
        updater, _, state = await _start_daemon(resumable.engine())
        return updater, state

    updater, state = asyncio.run(restart())
    assert state is ServiceState.IDLE
    assert "gave up resuming the interrupted install" in updater.status.last_error
    assert store.load() is None
    assert resumable.bootloader.status().trial is None


def test_an_automatic_resume_that_fails_is_counted_and_kept(
    resumable: Device, tmp_path: Path, pki: Pki, nginx: Nginx, served: str
) -> None:
    """The network still down at the next start: the resume fails and counts as an
    attempt that got no further; the record stays for an install of the same URL, but
    the daemon does not resume a failure its client was told of by itself."""
    recorded = _kill_mid_download(resumable, tmp_path, pki, served, at=2 << 20)
    nginx.stop()

    async def restart() -> tuple[ServiceState, _Listener]:
        updater, listener, state = await _start_daemon(resumable.engine())
        await asyncio.wait_for(listener.done.wait(), 120)
        await updater.stop(10)
        return state, listener

    state, listener = asyncio.run(restart())

    assert state is ServiceState.INSTALLING
    assert isinstance(listener.completions[0][0], DownloadError)
    record = _record(resumable)
    assert record is not None
    assert (record.attempts, record.verified, record.failed) == (1, recorded, True)
    assert resumable.bootloader.status().trial is None

    async def start_again() -> ServiceState:
        updater, _, state = await _start_daemon(resumable.engine())
        await updater.stop(10)
        return state

    assert asyncio.run(start_again()) is ServiceState.IDLE
    assert _record(resumable) == record


@pytest.mark.parametrize("path", ["/artifact.mender", "/noranges/artifact.mender"])
def test_a_first_request_that_ends_early_goes_on_with_the_rest(
    nginx: Nginx, pki: Pki, artifacts: dict[str, Artifact], path: str
) -> None:
    data = artifacts["release-2"].data
    with HttpSource(f"https://localhost:{nginx.ports.tls}{path}", settings_for(pki)) as source:
        source.end_first_request_at(1000)
        received = bytearray()
        buffer = memoryview(bytearray(1 << 16))
        while count := source.readinto(buffer):
            received += buffer[:count]
    assert received == data
    if path.startswith("/noranges/"):
        # A server without ranges answers the first request with the whole artifact.
        expected = [(200, "bytes=0-999", len(data))]
    else:
        expected = [(206, "bytes=0-999", 1000), (206, "bytes=1000-", len(data) - 1000)]
    found = _wait_for_requests(nginx, path, len(expected))
    assert [(r.status, r.range, r.sent) for r in found] == expected


def test_a_resume_record_of_an_older_otad_still_parses() -> None:
    """Records written before compressed artifacts resumed lack the boundary fields."""
    from otad.resume import _digest

    value = json.loads(serialize(_RECORD))
    del value["digest"]
    for name in ("member_offset", "boundary_compressed", "boundary_image"):
        del value[name]
    value["digest"] = _digest(value)
    assert parse(json.dumps(value).encode(), "download.json") == _RECORD


_RECORD = ResumeRecord(
    url="https://updates.example/a.mender?X-Amz-Signature=secret",
    target=Slot.B,
    artifact="release-4",
    manifest_sha256="ab" * 32,
    size=6 << 20,
    etag='"65f0-600000"',
    last_modified=None,
    allow_downgrade=None,
    artifact_offset=10240,
    verified=3 << 20,
    attempts=1,
)


_PACKED_RECORD = replace(
    _RECORD, artifact_offset=None, member_offset=10240, boundary_compressed=4, boundary_image=1
)


@pytest.mark.parametrize("record", [_RECORD, _PACKED_RECORD])
def test_a_resume_record_round_trips_in_memory(record: ResumeRecord) -> None:
    assert parse(serialize(record), "download.json") == record


def test_half_a_boundary_is_refused() -> None:
    from otad.resume import _digest

    value = json.loads(serialize(_PACKED_RECORD))
    del value["digest"]
    value["boundary_image"] = None
    value["digest"] = _digest(value)
    with pytest.raises(StateCorrupt, match="boundary_compressed and boundary_image"):
        parse(json.dumps(value).encode(), "download.json")


def test_the_resume_record_round_trips(tmp_path: Path) -> None:
    assert parse(serialize(_RECORD), "download.json") == _RECORD
    store = ResumeStore(tmp_path)
    store.save(_RECORD)
    assert store.load() == _RECORD
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == [RECORD_NAME]
    store.clear("done")
    assert store.load() is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda v: v.update(verified=v["verified"] + 1), "digest does not match"),
        (lambda v: v.update(format=2), "format 2"),
        (lambda v: v.pop("digest"), "digest does not match"),
    ],
)
def test_a_damaged_resume_record_is_refused(edit: object, message: str) -> None:
    value = json.loads(serialize(_RECORD))
    edit(value)  # type: ignore[operator]
    with pytest.raises(StateCorrupt, match=message):
        parse(json.dumps(value).encode(), "download.json")


def test_a_record_with_a_wrong_type_is_refused_even_with_a_right_digest() -> None:
    from otad.resume import _digest

    value = json.loads(serialize(_RECORD))
    del value["digest"]
    value["verified"] = "3145728"
    value["digest"] = _digest(value)
    with pytest.raises(StateCorrupt, match="not a valid resume record"):
        parse(json.dumps(value).encode(), "download.json")
