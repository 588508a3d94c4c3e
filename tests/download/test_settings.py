"""The [download] table, URL checks and the retry bounds, without a server."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from otad.download import (
    DownloadError,
    DownloadSettings,
    HttpSource,
    check_url,
    parse_download_settings,
)
from otad.errors import ConfigError, UsageError

PIN = "AB:" * 31 + "AB"


def test_defaults_and_full_table() -> None:
    assert parse_download_settings({}) == DownloadSettings()
    table = tomllib.loads(
        f"""
ca_bundle = "/etc/otad/ca.pem"
pinned_sha256 = "{PIN}"
client_cert = "/etc/otad/device.pem"
client_key = "/etc/otad/device.key"
allow_http = true
retries = 3
retry_time = 30
connect_timeout = 5
read_timeout = 7.5
resume_attempts = 0
"""
    )
    assert parse_download_settings(table) == DownloadSettings(
        ca_bundle=Path("/etc/otad/ca.pem"),
        pinned_sha256="ab" * 32,
        client_cert=Path("/etc/otad/device.pem"),
        client_key=Path("/etc/otad/device.key"),
        allow_http=True,
        retries=3,
        retry_time=30.0,
        connect_timeout=5.0,
        read_timeout=7.5,
        resume_attempts=0,
    )


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"proxy": "x"}, "download.proxy"),
        ({"ca_bundle": "ca.pem"}, "download.ca_bundle"),
        ({"ca_bundle": 3}, "download.ca_bundle"),
        ({"pinned_sha256": "abcd"}, "download.pinned_sha256"),
        ({"pinned_sha256": "zz" * 32}, "download.pinned_sha256"),
        ({"client_key": "/k.pem"}, "download.client_key"),
        ({"allow_http": "yes"}, "download.allow_http"),
        ({"retries": -1}, "download.retries"),
        ({"retries": True}, "download.retries"),
        ({"retry_time": 0}, "download.retry_time"),
        ({"read_timeout": -2.5}, "download.read_timeout"),
        ({"connect_timeout": "10"}, "download.connect_timeout"),
        ({"resume_attempts": -1}, "download.resume_attempts"),
        ({"resume_attempts": 1.5}, "download.resume_attempts"),
    ],
)
def test_bad_settings_name_their_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_download_settings(table)
    assert caught.value.key == key


def test_missing_files_are_named(tmp_path: Path) -> None:
    settings = DownloadSettings(ca_bundle=tmp_path / "absent.pem")
    with pytest.raises(ConfigError) as caught:
        HttpSource("https://localhost/a.mender", settings)
    assert caught.value.key == "download.ca_bundle"


@pytest.mark.parametrize(
    ("url", "allow_http", "refused"),
    [
        ("https://updates.example/a.mender", False, False),
        ("http://updates.example/a.mender", False, True),
        ("http://updates.example/a.mender", True, False),
        ("ftp://updates.example/a.mender", True, True),
        ("file:///srv/a.mender", True, True),
    ],
)
def test_schemes(url: str, allow_http: bool, refused: bool) -> None:
    settings = DownloadSettings(allow_http=allow_http)
    if refused:
        with pytest.raises(UsageError):
            check_url(url, settings)
    else:
        check_url(url, settings)


def test_query_is_kept_out_of_messages() -> None:
    with pytest.raises(UsageError) as caught:
        HttpSource("http://u:secret@host/a.mender?X-Amz-Signature=secret", DownloadSettings())
    assert "secret" not in str(caught.value)


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port: int = listener.getsockname()[1]
    return port


def test_retries_back_off_exponentially_and_stop() -> None:
    sleeps: list[float] = []
    settings = DownloadSettings(retries=4, first_backoff=0.5, max_backoff=3.0, connect_timeout=2)
    url = f"https://localhost:{_closed_port()}/a.mender"
    with HttpSource(url, settings, sleep=sleeps.append) as source:
        with pytest.raises(DownloadError, match="gave up after 5 failed attempts"):
            source.readinto(memoryview(bytearray(16)))
        assert source.requests == 5
    assert sleeps == [0.5, 1.0, 2.0, 3.0]


def test_retry_time_bounds_the_waiting() -> None:
    sleeps: list[float] = []
    settings = DownloadSettings(retries=100, first_backoff=1.0, retry_time=10.0)
    url = f"https://localhost:{_closed_port()}/a.mender"
    with (
        HttpSource(url, settings, sleep=sleeps.append) as source,
        pytest.raises(DownloadError, match="waited 7 s of the 10 s"),
    ):
        source.readinto(memoryview(bytearray(16)))
    assert sleeps == [1.0, 2.0, 4.0]
