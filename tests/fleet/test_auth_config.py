"""The [server] table, the device key and the signed authentication request."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from otad.errors import ConfigError
from otad.fleet.auth import AUTH_PATH, authenticate, load_device_key, read_identity
from otad.fleet.client import Client, Unauthorized
from otad.fleet.config import KEY_FILE, KeyType, ServerConfig, parse_server_config
from tests.fleet.server import FakeMender


def test_server_table_parses_with_defaults() -> None:
    config = parse_server_config(
        {"url": "https://mender.example.com/", "identity": {"serial": "SN-1"}}
    )
    assert config == ServerConfig(url="https://mender.example.com", identity={"serial": "SN-1"})
    assert (config.poll_interval, config.inventory_interval, config.retry_interval) == (
        1800,
        28800,
        60,
    )


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"identity": {"id": "1"}}, "server.url"),
        ({"url": "http://mender.example.com", "identity": {"id": "1"}}, "server.url"),
        ({"url": "https://mender.example.com"}, "server.identity"),
        ({"url": "https://m.example.com", "identity": {"id": ""}}, "server.identity.id"),
        (
            {"url": "https://m.example.com", "identity_interface": "eth0", "key_type": "dsa"},
            "server.key_type",
        ),  # fmt: skip
        (
            {"url": "https://m.example.com", "identity_interface": "eth0", "poll_interval": 0},
            "server.poll_interval",
        ),  # fmt: skip
        (
            {"url": "https://m.example.com", "identity_interface": "eth0", "retry_interval": 9000},
            "server.retry_interval",
        ),  # fmt: skip
        (
            {
                "url": "https://m.example.com",
                "identity_interface": "eth0",
                "ca_bundle": "ca.pem",
            },
            "server.ca_bundle",
        ),  # fmt: skip
        (
            {"url": "https://m.example.com", "identity_interface": "eth0", "proxy": "x"},
            "server.proxy",
        ),  # fmt: skip
    ],
)
def test_bad_server_table_names_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_server_config(table)
    assert caught.value.key == key


def test_identity_reads_the_interface_mac(tmp_path: Path) -> None:
    (tmp_path / "eth0").mkdir()
    (tmp_path / "eth0" / "address").write_text("52:54:00:12:34:56\n")
    config = parse_server_config(
        {"url": "https://m.example.com", "identity_interface": "eth0", "identity": {"a": "b"}}
    )
    assert read_identity(config, tmp_path) == {"a": "b", "mac": "52:54:00:12:34:56"}


@pytest.mark.parametrize("key_type", list(KeyType))
def test_device_key_is_private_kept_and_signs_what_the_server_verifies(
    tmp_path: Path, server: FakeMender, key_type: KeyType
) -> None:
    key = load_device_key(tmp_path / "fleet" / KEY_FILE, key_type)
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    again = load_device_key(tmp_path / "fleet" / KEY_FILE, KeyType.RSA)  # the kept key wins
    assert again.public_pem() == key.public_pem()

    with contextlib.closing(Client(server.url)) as client:
        token = authenticate(client, {"mac": "52:54:00:12:34:56"}, key, "tenant-1")

    assert client.token == token
    assert token in server.tokens
    [request] = server.requests("POST", AUTH_PATH)
    assert request.body["pubkey"] == key.public_pem()
    assert request.body["tenant_token"] == "tenant-1"
    assert json.loads(request.body["id_data"]) == {"mac": "52:54:00:12:34:56"}
    assert request.headers["Content-Type"] == "application/json"


def test_not_accepted_device_gets_unauthorized(tmp_path: Path, server: FakeMender) -> None:
    server.script.refuse_auth = 1
    key = load_device_key(tmp_path / KEY_FILE, KeyType.ECDSA)
    with contextlib.closing(Client(server.url)) as client, pytest.raises(Unauthorized) as caught:
        authenticate(client, {"id": "1"}, key, "")

    assert caught.value.status == 401
    assert "device unauthorized" in str(caught.value)
    assert client.token is None
    assert "tenant_token" not in server.requests("POST", AUTH_PATH)[0].body
