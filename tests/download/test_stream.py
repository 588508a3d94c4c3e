"""Downloads from a real nginx through a proxy that cuts, stalls and truncates.

Every download feeds the real ArtifactReader; the ones that fail also show that the
consumer received only verified data, and, on a loop-device slot, that the engine
activated nothing and recorded the failure.
"""

from __future__ import annotations

import os

import pytest

from otad.artifact.reader import ArtifactReader, VerifyPolicy, verify_artifact
from otad.artifact.streams import Readable
from otad.bootloader.base import Slot
from otad.download import ArtifactChanged, DownloadError, HttpSource, Overlong, ResumeRefused
from otad.errors import OtadError
from otad.state import Phase
from tests.download.conftest import CHUNK_SIZE, Artifact, Device, settings_for
from tests.download.faults import Fault, FaultProxy, Kind
from tests.download.servers import Nginx, Pki


def consume(source: Readable, policy: VerifyPolicy) -> tuple[bytearray, BaseException | None]:
    """What a consumer of the reader received of the image, and the error that stopped it."""
    received = bytearray()
    reader = ArtifactReader(source, policy)
    try:
        for payload_file in reader.payload_files():
            for block in payload_file.blocks():
                received += block
        reader.finish()
    except OtadError as error:
        return received, error
    return received, None


def assert_nothing_activated(device: Device, before: dict[Slot, str]) -> str:
    """The engine requested no trial, left the running slot alone, recorded a failure."""
    status = device.bootloader.status()
    assert status.trial is None
    assert status.default is Slot.A
    assert device.slot_digest(Slot.A) == before[Slot.A]
    state = device.store.load()
    assert state is not None
    assert state.phase is Phase.IDLE
    assert state.last is not None
    assert not state.last.success
    return state.last.message


def test_clean_download_verifies(
    nginx: Nginx, pki: Pki, policy: VerifyPolicy, artifacts: dict[str, Artifact]
) -> None:
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with HttpSource(url, settings_for(pki)) as source:
        header, files = verify_artifact(source, policy)
        assert source.requests == 1
        assert source.retries == 0
        assert source.identity.size == len(artifacts["release-2"].data)
    assert header.name == "release-2"
    assert files[0].verified


@pytest.mark.parametrize(
    ("faults", "scheme"),
    [
        pytest.param([Fault(Kind.RESET, 1 << 20)], "https", id="one-cut"),
        pytest.param([Fault(Kind.RESET, 1 << 19)] * 4, "https", id="cuts"),
        pytest.param([Fault(Kind.CLOSE, 700_000)], "https", id="tls-eof"),
        pytest.param([Fault(Kind.CLOSE, 700_000)], "http", id="truncated-body"),
        pytest.param([Fault(Kind.STALL, 700_000, stall=4.0)], "https", id="stall"),
    ],
)
def test_interrupted_download_resumes_and_verifies(
    nginx: Nginx,
    pki: Pki,
    policy: VerifyPolicy,
    artifacts: dict[str, Artifact],
    sleeps: list[float],
    faults: list[Fault],
    scheme: str,
) -> None:
    port = nginx.ports.tls if scheme == "https" else nginx.ports.plain
    settings = settings_for(pki, read_timeout=0.5, allow_http=scheme == "http")
    size = len(artifacts["release-2"].data)
    with (
        FaultProxy(port, faults) as proxy,
        HttpSource(proxy.url("/artifact.mender", scheme), settings, sleep=sleeps.append) as source,
    ):
        header, files = verify_artifact(source, policy)
        assert source.requests == len(faults) + 1
        assert source.position == size
    assert files[0].verified
    assert header.name == "release-2"
    assert len(sleeps) == len(faults)
    ranges = nginx.wait_for_log(" 206 ")
    assert len(ranges) >= len(faults) - 1
    assert all('"bytes=' in line for line in ranges)


def test_changed_artifact_is_cut_off_and_nothing_unverified_is_used(
    nginx: Nginx, pki: Pki, policy: VerifyPolicy, artifacts: dict[str, Artifact]
) -> None:
    served = nginx.www / "artifact.mender"

    def replace() -> None:
        replacement = served.with_name("new.mender")
        replacement.write_bytes(artifacts["release-3"].data)
        mtime = served.stat().st_mtime + 100
        os.utime(replacement, (mtime, mtime))
        replacement.replace(served)

    image = artifacts["release-2"].image
    with (
        FaultProxy(nginx.ports.tls, [Fault(Kind.RESET, 5 << 19, before=replace)]) as proxy,
        HttpSource(
            proxy.url("/artifact.mender"), settings_for(pki), sleep=lambda _: None
        ) as source,
    ):
        received, error = consume(source, policy)
    assert isinstance(error, ArtifactChanged)
    assert "etag" in str(error)
    assert 0 < len(received) < len(image)
    assert received == image[: len(received)]
    assert len(received) % CHUNK_SIZE == 0


def test_server_without_ranges_is_cut_off(
    nginx: Nginx, pki: Pki, policy: VerifyPolicy, artifacts: dict[str, Artifact]
) -> None:
    image = artifacts["release-2"].image
    with (
        FaultProxy(nginx.ports.tls, [Fault(Kind.RESET, 1 << 20)]) as proxy,
        HttpSource(
            proxy.url("/noranges/artifact.mender"), settings_for(pki), sleep=lambda _: None
        ) as source,
    ):
        received, error = consume(source, policy)
    assert isinstance(error, ResumeRefused)
    assert "(200)" in str(error)
    assert received == image[: len(received)]


@pytest.mark.parametrize("kind", [Kind.CHUNKED_EXTRA, Kind.CLOSE_EXTRA])
def test_too_many_bytes_are_cut_off(
    nginx: Nginx,
    pki: Pki,
    policy: VerifyPolicy,
    artifacts: dict[str, Artifact],
    kind: Kind,
) -> None:
    size = len(artifacts["release-2"].data)
    settings = settings_for(pki, allow_http=True)
    with (
        FaultProxy(nginx.ports.plain, [Fault(kind)]) as proxy,
        HttpSource(proxy.url("/artifact.mender", "http"), settings, expected_size=size) as source,
    ):
        _, error = consume(source, policy)
        assert source.position == size
    assert isinstance(error, Overlong)
    assert f"{size} bytes" in str(error)


def test_announced_size_must_match_the_expected_one(nginx: Nginx, pki: Pki) -> None:
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with (
        HttpSource(url, settings_for(pki), expected_size=1000) as source,
        pytest.raises(Overlong, match="1000 were expected"),
    ):
        source.readinto(memoryview(bytearray(10)))


def test_missing_artifact_is_not_retried(nginx: Nginx, pki: Pki, sleeps: list[float]) -> None:
    url = f"https://localhost:{nginx.ports.tls}/absent.mender"
    with (
        HttpSource(url, settings_for(pki), sleep=sleeps.append) as source,
        pytest.raises(DownloadError, match="404"),
    ):
        source.readinto(memoryview(bytearray(10)))
    assert sleeps == []


def test_server_that_drops_every_connection_is_given_up(
    nginx: Nginx, pki: Pki, sleeps: list[float]
) -> None:
    faults = [Fault(Kind.RESET, 0)] * 10
    with (
        FaultProxy(nginx.ports.tls, faults) as proxy,
        HttpSource(
            proxy.url("/artifact.mender"), settings_for(pki, retries=3), sleep=sleeps.append
        ) as source,
        pytest.raises(DownloadError, match="gave up after 4 failed attempts"),
    ):
        source.readinto(memoryview(bytearray(10)))
    assert sleeps == [1.0, 2.0, 4.0]


# -- the real engine on a loop-device slot ------------------------------------------


@pytest.mark.slow
def test_engine_installs_over_a_cut_download(
    nginx: Nginx, pki: Pki, device: Device, artifacts: dict[str, Artifact]
) -> None:
    with (
        FaultProxy(nginx.ports.tls, [Fault(Kind.RESET, 1 << 20)]) as proxy,
        HttpSource(
            proxy.url("/artifact.mender"), settings_for(pki), sleep=lambda _: None
        ) as source,
    ):
        result = device.engine().install(source)
    assert result.slot is Slot.B
    assert device.bootloader.status().trial is Slot.B
    image = artifacts["release-2"].image
    assert device.disk.partitions["b"].read_bytes()[: len(image)] == image


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["changed", "overlong", "cut-no-retries"])
def test_engine_activates_nothing_when_the_download_fails(
    nginx: Nginx, pki: Pki, device: Device, artifacts: dict[str, Artifact], failure: str
) -> None:
    served = nginx.www / "artifact.mender"

    def replace() -> None:
        data = artifacts["release-3"].data
        served.with_name("new.mender").write_bytes(data)
        os.utime(served.with_name("new.mender"), (1, 1))
        served.with_name("new.mender").replace(served)

    size = len(artifacts["release-2"].data)
    port, scheme, expected = nginx.ports.tls, "https", None
    settings = settings_for(pki)
    if failure == "changed":
        faults = [Fault(Kind.RESET, 2 << 20, before=replace)]
    elif failure == "overlong":
        faults = [Fault(Kind.CLOSE_EXTRA)]
        port, scheme, expected = nginx.ports.plain, "http", size
        settings = settings_for(pki, allow_http=True)
    else:
        faults = [Fault(Kind.RESET, 2 << 20)]
        settings = settings_for(pki, retries=0)
    before = {slot: device.slot_digest(slot) for slot in (Slot.A,)}
    with (
        FaultProxy(port, faults) as proxy,
        HttpSource(
            proxy.url("/artifact.mender", scheme),
            settings,
            expected_size=expected,
            sleep=lambda _: None,
        ) as source,
        pytest.raises(DownloadError) as caught,
    ):
        device.engine().install(source)
    message = assert_nothing_activated(device, before)
    assert message == str(caught.value)
    state = device.store.load()
    assert state is not None
    assert state.slots[Slot.B].release is None
