"""The [server] table of otad.conf: which Mender server manages the device, and how often.

    [server]
    url = "https://hosted.mender.io"      # the server's base URL; plain http only where
                                          # [download] allows http (a lab server)
    tenant_token = "..."                  # hosted Mender and multi-tenant servers
    # tenant_token_file = "/etc/otad/tenant-token"   # or the token in a file (not both)
    device_key = "/data/otad/fleet/device-key.pem"   # the default: in data_dir; made
                                          # (mode 0600) the first time it is missing
    key_type = "rsa"                      # a new device key: rsa (3072 bits), ecdsa
                                          # (P-256) or ed25519
    identity_interface = "eth0"           # identity: {"mac": this interface's address}
    identity_script = "/usr/share/mender/identity/mender-device-identity"
                                          # its key=value lines are identity too
    inventory_dir = "/usr/share/mender/inventory"   # each executable's key=value lines
                                          # are inventory attributes
    poll_interval = 1800                  # seconds between checks for a deployment
                                          # (Mender: UpdatePollIntervalSeconds)
    inventory_interval = 28800            # seconds between inventory updates
                                          # (InventoryPollIntervalSeconds)
    retry_interval = 60                   # seconds before the first retry after a
                                          # failure (RetryPollIntervalSeconds); doubles
                                          # after each failure in a row, up to
    max_retry_interval = 1800             # this (default: poll_interval)
    # ca_bundle, pinned_sha256, client_cert, client_key: TLS for the server's API, as
    # in [download]; when [server] sets none of them, [download]'s apply. Artifacts
    # are always downloaded as [download] says (they may come from another host).

    [server.identity]                     # fixed identity attributes (a serial number)
    serial = "SN-0042"
    [server.inventory]                    # fixed inventory attributes
    site = "Hall 3"

The identity must not change over the device's life: the server knows a device by it.
At least one of identity_interface, identity_script and [server.identity] is required.
This module only parses; files and scripts are read when the daemon starts
(otad.fleet.service).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from otad.download import DownloadSettings, parse_download_settings
from otad.errors import ConfigError

WHERE = "server"
KEY_FILE = "device-key.pem"  # in <data_dir>/fleet unless device_key says otherwise
TLS_KEYS = ("ca_bundle", "pinned_sha256", "client_cert", "client_key")


class KeyType(enum.Enum):
    """The device key's algorithm; the value is the spelling in otad.conf."""

    RSA = "rsa"
    ECDSA = "ecdsa"
    ED25519 = "ed25519"


@dataclass(frozen=True)
class ServerConfig:
    url: str  # without a trailing slash
    tenant_token: str = ""
    tenant_token_file: Path | None = None  # read at start; excludes tenant_token
    device_key: Path | None = None  # None: <data_dir>/fleet/device-key.pem
    key_type: KeyType = KeyType.RSA
    identity: Mapping[str, str] = field(default_factory=dict)
    identity_interface: str | None = None
    identity_script: Path | None = None
    inventory: Mapping[str, str] = field(default_factory=dict)
    inventory_dir: Path | None = None
    poll_interval: float = 1800.0  # seconds
    inventory_interval: float = 28800.0  # seconds
    retry_interval: float = 60.0  # seconds
    max_retry_interval: float | None = None  # seconds; None: poll_interval
    # TLS for the API (and http allowed or not): [download]'s unless [server] sets some.
    tls: DownloadSettings = field(default_factory=DownloadSettings)
    tls_from_server: bool = False  # [server] set the TLS keys (for error messages)

    @property
    def backoff_limit(self) -> float:
        """The longest wait between retries, in seconds."""
        return self.max_retry_interval or self.poll_interval


_KEYS = {
    "url",
    "tenant_token",
    "tenant_token_file",
    "device_key",
    "key_type",
    "identity",
    "identity_interface",
    "identity_script",
    "inventory",
    "inventory_dir",
    "poll_interval",
    "inventory_interval",
    "retry_interval",
    "max_retry_interval",
    *TLS_KEYS,
}


def _take(table: Mapping[str, Any], key: str, kinds: tuple[type, ...], default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise ConfigError(f"{WHERE}.{key}", f"must be a {names}, found {value!r}")
    return value


def _path(table: Mapping[str, Any], key: str) -> Path | None:
    text = _take(table, key, (str,), None)
    if text is None:
        return None
    if not text or not Path(text).is_absolute():
        raise ConfigError(f"{WHERE}.{key}", f"must be an absolute path, found {text!r}")
    return Path(text)


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
    if parts.scheme == "http" and not allow_http:
        raise ConfigError(
            f"{WHERE}.url", f"{text!r} is plain http: use https, or set download.allow_http"
        )
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{WHERE}.url", f"must be an https URL such as https://hosted.mender.io, "
                          f"found {text!r}")  # fmt: skip
    return text.rstrip("/")


def _attributes(table: Mapping[str, Any], key: str) -> dict[str, str]:
    attributes = _take(table, key, (dict,), {})
    for name, value in attributes.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{WHERE}.{key}.{name}", f"must be a non-empty string: {value!r}")
    return dict(attributes)


def _key_type(table: Mapping[str, Any]) -> KeyType:
    name = _take(table, "key_type", (str,), KeyType.RSA.value)
    try:
        return KeyType(name)
    except ValueError:
        choices = ", ".join(kind.value for kind in KeyType)
        raise ConfigError(f"{WHERE}.key_type", f"{name!r} is not one of {choices}") from None


def _tenant_token(table: Mapping[str, Any]) -> tuple[str, Path | None]:
    token: str = _take(table, "tenant_token", (str,), "")
    token_file = _path(table, "tenant_token_file")
    if token and token_file is not None:
        raise ConfigError(
            f"{WHERE}.tenant_token_file", "and server.tenant_token exclude each other"
        )
    return token.strip(), token_file


def _tls(table: Mapping[str, Any], download: DownloadSettings) -> DownloadSettings:
    """[download]'s settings, with the TLS trust [server] sets instead, if it sets any."""
    if not any(key in table for key in TLS_KEYS):
        return download
    own = parse_download_settings({key: table[key] for key in TLS_KEYS if key in table}, WHERE)
    return replace(
        download,
        ca_bundle=own.ca_bundle,
        pinned_sha256=own.pinned_sha256,
        client_cert=own.client_cert,
        client_key=own.client_key,
    )


def _intervals(table: Mapping[str, Any]) -> dict[str, Any]:
    poll = _seconds(table, "poll_interval", ServerConfig.poll_interval)
    retry = _seconds(table, "retry_interval", ServerConfig.retry_interval)
    limit = _seconds(table, "max_retry_interval", poll) if "max_retry_interval" in table else None
    if retry > (limit or poll):
        other = "max_retry_interval" if limit else "poll_interval"
        problem = f"({retry:g} s) must not exceed {other} ({limit or poll:g} s)"
        raise ConfigError(f"{WHERE}.retry_interval", problem)
    return {
        "poll_interval": poll,
        "inventory_interval": _seconds(
            table, "inventory_interval", ServerConfig.inventory_interval
        ),
        "retry_interval": retry,
        "max_retry_interval": limit,
    }


def parse_server_config(
    table: Mapping[str, Any],
    download: DownloadSettings | None = None,
    data_dir: Path | None = None,
) -> ServerConfig:
    """Read the [server] table; ConfigError names the offending key.

    `download` is the [download] table's settings (plain http, the TLS trust the server
    shares unless it sets its own); `data_dir` is where the device key is kept by default.
    """
    for key in table:
        if key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{WHERE}.{key}", f"is not a known setting (known: {known})")
    download = download or DownloadSettings()
    interface = _take(table, "identity_interface", (str,), None)
    identity = _attributes(table, "identity")
    script = _path(table, "identity_script")
    if not interface and not identity and script is None:
        raise ConfigError(
            f"{WHERE}.identity",
            "or server.identity_interface or server.identity_script is required: the "
            "server knows the device by its identity",
        )
    token, token_file = _tenant_token(table)
    device_key = _path(table, "device_key")
    if device_key is None and data_dir is not None:
        device_key = data_dir / "fleet" / KEY_FILE
    return ServerConfig(
        url=_url(table, download.allow_http),
        tenant_token=token,
        tenant_token_file=token_file,
        device_key=device_key,
        key_type=_key_type(table),
        identity=identity,
        identity_interface=interface or None,
        identity_script=script,
        inventory=_attributes(table, "inventory"),
        inventory_dir=_path(table, "inventory_dir"),
        tls=_tls(table, download),
        tls_from_server=any(key in table for key in TLS_KEYS),
        **_intervals(table),
    )
