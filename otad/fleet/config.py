"""The [server] table of otad.conf: which Mender server manages the device, and how often.

    [server]
    url = "https://hosted.mender.io"   # the server's base URL (https; http only with
                                       # allow_http, for a lab server)
    tenant_token = "..."               # hosted Mender and multi-tenant servers; "" if none
    poll_interval = 1800               # seconds between checks for a deployment
    inventory_interval = 28800         # seconds between inventory updates
    retry_interval = 60                # seconds before the first retry after a failure;
                                       # doubles after each failure in a row, up to
                                       # poll_interval
    server_certificate = "/etc/otad/server.crt"   # a CA bundle to trust instead of the
                                                   # system's (a self-hosted server)
    key_type = "rsa"                   # the device key: rsa (3072 bits), ecdsa (P-256)
                                       # or ed25519
    identity_interface = "eth0"        # identity: {"mac": this interface's address}
    allow_http = false

    [server.identity]                  # fixed identity attributes (serial numbers, a
    serial = "SN-0042"                 # test id); added to the mac, if any

The identity must not change over the device's life: the server knows a device by it.
At least one of identity_interface and [server.identity] is required.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from otad.errors import ConfigError

WHERE = "server"


class KeyType(enum.Enum):
    """The device key's algorithm; the value is the spelling in otad.conf."""

    RSA = "rsa"
    ECDSA = "ecdsa"
    ED25519 = "ed25519"


@dataclass(frozen=True)
class ServerConfig:
    url: str  # without a trailing slash
    tenant_token: str = ""
    poll_interval: float = 1800.0  # seconds
    inventory_interval: float = 28800.0  # seconds
    retry_interval: float = 60.0  # seconds
    server_certificate: Path | None = None
    key_type: KeyType = KeyType.RSA
    identity_interface: str | None = None
    identity: Mapping[str, str] = field(default_factory=dict)
    allow_http: bool = False


_KEYS = {
    "url",
    "tenant_token",
    "poll_interval",
    "inventory_interval",
    "retry_interval",
    "server_certificate",
    "key_type",
    "identity_interface",
    "identity",
    "allow_http",
}


def _take(table: Mapping[str, Any], key: str, kinds: tuple[type, ...], default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise ConfigError(f"{WHERE}.{key}", f"must be a {names}, found {value!r}")
    return value


def _seconds(table: Mapping[str, Any], key: str, default: float) -> float:
    value = float(_take(table, key, (int, float), default))
    if not 1 <= value <= 7 * 86400:
        raise ConfigError(f"{WHERE}.{key}", f"must be between 1 s and 7 days, found {value:g}")
    return value


def _url(table: Mapping[str, Any], allow_http: bool) -> str:
    if "url" not in table:
        raise ConfigError(f"{WHERE}.url", "is required but missing")
    text: str = _take(table, "url", (str,), "")
    parts = urlsplit(text)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.hostname or parts.query or parts.fragment:
        expected = "an https URL" + (" (or http)" if allow_http else "")
        raise ConfigError(f"{WHERE}.url", f"must be {expected} such as https://hosted.mender.io")
    return text.rstrip("/")


def _identity(table: Mapping[str, Any]) -> dict[str, str]:
    identity = _take(table, "identity", (dict,), {})
    for key, value in identity.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{WHERE}.identity.{key}", f"must be a non-empty string: {value!r}")
    return dict(identity)


def parse_server_config(table: Mapping[str, Any]) -> ServerConfig:
    """Read the [server] table; ConfigError names the offending key."""
    for key in table:
        if key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{WHERE}.{key}", f"is not a known setting (known: {known})")
    allow_http = _take(table, "allow_http", (bool,), False)
    certificate = _take(table, "server_certificate", (str,), None)
    if certificate is not None and not Path(certificate).is_absolute():
        raise ConfigError(
            f"{WHERE}.server_certificate", f"must be an absolute path, found {certificate!r}"
        )
    key_name = _take(table, "key_type", (str,), KeyType.RSA.value)
    try:
        key_type = KeyType(key_name)
    except ValueError:
        choices = ", ".join(kind.value for kind in KeyType)
        raise ConfigError(f"{WHERE}.key_type", f"{key_name!r} is not one of {choices}") from None
    interface = _take(table, "identity_interface", (str,), None)
    identity = _identity(table)
    if not interface and not identity:
        raise ConfigError(
            f"{WHERE}.identity",
            "or server.identity_interface is required: the server "
            "knows the device by its identity",
        )
    poll = _seconds(table, "poll_interval", ServerConfig.poll_interval)
    retry = _seconds(table, "retry_interval", ServerConfig.retry_interval)
    if retry > poll:
        raise ConfigError(
            f"{WHERE}.retry_interval", f"({retry:g} s) must not exceed poll_interval ({poll:g} s)"
        )
    return ServerConfig(
        url=_url(table, allow_http),
        tenant_token=_take(table, "tenant_token", (str,), ""),
        poll_interval=poll,
        inventory_interval=_seconds(table, "inventory_interval", ServerConfig.inventory_interval),
        retry_interval=retry,
        server_certificate=Path(certificate) if certificate else None,
        key_type=key_type,
        identity_interface=interface or None,
        identity=identity,
        allow_http=allow_http,
    )
