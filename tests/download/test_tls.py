"""Whom a download trusts: CAs, host names, pinned certificates, client certificates."""

from __future__ import annotations

import pytest

from otad.artifact.reader import VerifyPolicy, verify_artifact
from otad.download import DownloadError, HttpSource, UntrustedServer
from otad.errors import UsageError
from tests.download.conftest import settings_for
from tests.download.faults import Fault, FaultProxy, Kind
from tests.download.servers import Nginx, Pki


def _first_bytes(url: str, **settings: object) -> bytes:
    pki = settings.pop("pki")
    assert isinstance(pki, Pki)
    buffer = memoryview(bytearray(512))
    sleeps: list[float] = []
    with HttpSource(url, settings_for(pki, **settings), sleep=sleeps.append) as source:
        count = source.readinto(buffer)
    assert sleeps == [], "a TLS refusal must not be retried"
    return bytes(buffer[:count])


def test_wrong_ca_is_refused(nginx: Nginx, pki: Pki) -> None:
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with pytest.raises(UntrustedServer, match="certificate verify failed"):
        _first_bytes(url, pki=pki, ca_bundle=pki.other_ca)


def test_system_cas_do_not_know_the_test_ca(nginx: Nginx, pki: Pki) -> None:
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with pytest.raises(UntrustedServer):
        _first_bytes(url, pki=pki, ca_bundle=None)


def test_wrong_host_name_is_refused(nginx: Nginx, pki: Pki) -> None:
    url = f"https://127.0.0.1:{nginx.ports.tls}/artifact.mender"
    with pytest.raises(UntrustedServer, match="127.0.0.1"):
        _first_bytes(url, pki=pki)
    assert nginx.access_log() == []


def test_pinned_certificate_alone_is_trusted(nginx: Nginx, pki: Pki) -> None:
    url = f"https://127.0.0.1:{nginx.ports.tls}/artifact.mender"
    data = _first_bytes(url, pki=pki, ca_bundle=None, pinned_sha256=pki.server.sha256)
    assert data.startswith(b"version")


def test_pin_mismatch_is_refused(nginx: Nginx, pki: Pki) -> None:
    url = f"https://localhost:{nginx.ports.tls}/artifact.mender"
    with pytest.raises(UntrustedServer, match="Fingerprints did not match"):
        _first_bytes(url, pki=pki, pinned_sha256=pki.server2.sha256)


def test_pin_is_checked_again_when_resuming(
    nginx: Nginx, pki: Pki, policy: VerifyPolicy, sleeps: list[float]
) -> None:
    """The resume reaches a server with another certificate: the pin refuses it."""
    faults = [Fault(Kind.RESET, 1 << 20), Fault(upstream=nginx.ports.tls2)]
    settings = settings_for(pki, pinned_sha256=pki.server.sha256)
    with (
        FaultProxy(nginx.ports.tls, faults) as proxy,
        HttpSource(proxy.url("/artifact.mender"), settings, sleep=sleeps.append) as source,
        pytest.raises(UntrustedServer, match="Fingerprints did not match"),
    ):
        verify_artifact(source, policy)
    assert proxy.connections == 2


def test_resume_to_another_trusted_certificate_works_without_a_pin(
    nginx: Nginx, pki: Pki, policy: VerifyPolicy, sleeps: list[float]
) -> None:
    faults = [Fault(Kind.RESET, 1 << 20), Fault(upstream=nginx.ports.tls2)]
    with (
        FaultProxy(nginx.ports.tls, faults) as proxy,
        HttpSource(proxy.url("/artifact.mender"), settings_for(pki), sleep=sleeps.append) as source,
    ):
        _, files = verify_artifact(source, policy)
    assert files[0].verified


def test_mutual_tls(nginx: Nginx, pki: Pki, policy: VerifyPolicy) -> None:
    url = f"https://localhost:{nginx.ports.mtls}/artifact.mender"
    with pytest.raises(DownloadError, match="400"):
        _first_bytes(url, pki=pki)
    with pytest.raises(DownloadError, match="400"):
        _first_bytes(
            url, pki=pki, client_cert=pki.rogue_client.cert, client_key=pki.rogue_client.key
        )
    settings = settings_for(pki, client_cert=pki.client.cert, client_key=pki.client.key)
    with HttpSource(url, settings) as source:
        _, files = verify_artifact(source, policy)
    assert files[0].verified


def test_plain_http_only_when_allowed(nginx: Nginx, pki: Pki, policy: VerifyPolicy) -> None:
    url = f"http://127.0.0.1:{nginx.ports.plain}/artifact.mender"
    with pytest.raises(UsageError, match="allow_http"):
        HttpSource(url, settings_for(pki))
    assert nginx.access_log() == []
    with HttpSource(url, settings_for(pki, allow_http=True)) as source:
        _, files = verify_artifact(source, policy)
    assert files[0].verified


def test_redirect_to_plain_http_is_refused(nginx: Nginx, pki: Pki) -> None:
    url = f"https://localhost:{nginx.ports.tls}/moved.mender"
    with pytest.raises(UsageError, match="plain http is refused"):
        _first_bytes(url, pki=pki)
    assert all(f" {nginx.ports.plain} " not in line for line in nginx.access_log())
