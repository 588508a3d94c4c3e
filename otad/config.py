"""The device configuration, /etc/otad/otad.conf (TOML).

The converter writes it and a person may edit it, so every problem is reported with the
key that holds it. An example, with the defaults of the optional keys:

    device_type = "qemux86-64"
    data_dir = "/data/otad"                  # on the data partition
    trusted_keys = ["/etc/otad/keys/release.pub"]
    health_timeout = 300                     # seconds a trial boot has to commit

    [bootloader]
    backend = "grub"                         # grub, uboot, rpi-tryboot or file
    # further keys are the backend's own, e.g. env_dir = "/boot/efi/EFI/otad"

    [slots.a]
    root = "PARTUUID=5b1c9e63-02"            # or "LABEL=root-a"; never /dev/sda2
    [slots.b]
    root = "PARTUUID=5b1c9e63-03"
    # boot = "PARTUUID=..."                  # a slot's own boot partition, where needed

    [install]
    verify_readback = false                  # read the slot back after writing
    fsync_interval = 67108864                # bytes written between fsyncs
    allow_downgrade = false                  # the default for installs that do not say

    [removable]
    enabled = false                          # watch for USB sticks and SD cards
    action = "announce"                      # or "install": install at once

    [download]                               # installs from https:// URLs
    # ca_bundle = "/etc/otad/server-ca.pem"  # trust these CAs instead of the system's
    # pinned_sha256 = "ab12..."              # or exactly this server certificate
    # client_cert = "/etc/otad/device.crt"   # mutual TLS: the device's identity
    # client_key = "/etc/otad/device.key"
    allow_http = false                       # plain http only if set; the signature
                                             # is what is trusted either way
    retries = 8                              # failed attempts in a row before giving up
    retry_time = 600                         # seconds of backoff in all
    connect_timeout = 15
    read_timeout = 60                        # a stall longer than this resumes
    resume_attempts = 3                      # automatic resumes at start, see otad.resume

    [server]                                 # a Mender server manages the device
    url = "https://hosted.mender.io"         # (without [server], none does); every
    tenant_token = "..."                     # key is in otad/fleet/config.py
    identity_interface = "eth0"
    poll_interval = 1800
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otad.bootloader.base import Slot
from otad.errors import ConfigError

if TYPE_CHECKING:
    from otad.download import DownloadSettings
    from otad.fleet.config import ServerConfig

DEFAULT_PATH = Path("/etc/otad/otad.conf")


class BackendName(enum.Enum):
    GRUB = "grub"
    UBOOT = "uboot"
    RPI_TRYBOOT = "rpi-tryboot"
    FILE = "file"


class RefKind(enum.Enum):
    PARTUUID = "PARTUUID"
    LABEL = "LABEL"


@dataclass(frozen=True)
class DeviceRef:
    """A partition named in a stable way: by partition UUID or by filesystem label."""

    kind: RefKind
    value: str

    @classmethod
    def parse(cls, text: str, key: str) -> DeviceRef:
        name, separator, value = text.partition("=")
        kinds = {kind.value: kind for kind in RefKind}
        if not separator or name not in kinds or not value:
            raise ConfigError(
                key,
                f"{text!r} must name a partition as PARTUUID=<uuid> or LABEL=<label> "
                "(kernel names such as /dev/sda2 change between boots)",
            )
        kind = kinds[name]
        return cls(kind, value.lower() if kind is RefKind.PARTUUID else value)

    def __str__(self) -> str:
        return f"{self.kind.value}={self.value}"


@dataclass(frozen=True)
class SlotConfig:
    root: DeviceRef
    boot: DeviceRef | None = None


@dataclass(frozen=True)
class BootloaderConfig:
    backend: BackendName
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstallConfig:
    verify_readback: bool = False
    fsync_interval: int = 64 << 20
    allow_downgrade: bool = False


class Action(enum.Enum):
    """What the daemon does with a verified artifact found on a removable medium."""

    INSTALL = "install"
    ANNOUNCE = "announce"


@dataclass(frozen=True)
class RemovableConfig:
    """The [removable] table of otad.conf (see otad.removable)."""

    enabled: bool = False
    action: Action = Action.ANNOUNCE


@dataclass(frozen=True)
class Config:
    device_type: str
    data_dir: Path
    trusted_keys: tuple[Path, ...]
    bootloader: BootloaderConfig
    slots: Mapping[Slot, SlotConfig]
    health_timeout: int = 300
    install: InstallConfig = field(default_factory=InstallConfig)
    removable: RemovableConfig = field(default_factory=RemovableConfig)
    # None: the defaults of otad.download.DownloadSettings (system CAs, https only).
    download: DownloadSettings | None = None
    # None: no Mender server manages the device (the fleet client does not run).
    server: ServerConfig | None = None


_TOP_KEYS = {
    "device_type",
    "data_dir",
    "trusted_keys",
    "health_timeout",
    "bootloader",
    "slots",
    "install",
    "removable",
    "download",
    "server",
}


def _take(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    name = f"{where}.{key}" if where else key
    if key not in table:
        if default is ...:
            raise ConfigError(name, "is required but missing")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(name, f"must be a {kind.__name__}, found {value!r}")
    return value


def _check_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise ConfigError(name, f"is not a known setting (known: {', '.join(sorted(known))})")


def _absolute(text: str, key: str) -> Path:
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(key, f"must be an absolute path, found {text!r}")
    return path


def _parse_slots(table: Mapping[str, Any]) -> dict[Slot, SlotConfig]:
    _check_unknown(table, {"a", "b"}, "slots")
    slots = {}
    for slot in Slot:
        where = f"slots.{slot.value}"
        entry = _take(table, slot.value, dict, "slots")
        _check_unknown(entry, {"root", "boot"}, where)
        root = DeviceRef.parse(_take(entry, "root", str, where), f"{where}.root")
        boot_text = _take(entry, "boot", str, where, None)
        boot = DeviceRef.parse(boot_text, f"{where}.boot") if boot_text else None
        slots[slot] = SlotConfig(root, boot)
    if slots[Slot.A].root == slots[Slot.B].root:
        raise ConfigError(
            "slots.b.root", f"names the same partition as slots.a.root ({slots[Slot.A].root})"
        )
    return slots


def _parse_bootloader(table: Mapping[str, Any]) -> BootloaderConfig:
    name = _take(table, "backend", str, "bootloader")
    try:
        backend = BackendName(name)
    except ValueError:
        choices = ", ".join(b.value for b in BackendName)
        raise ConfigError("bootloader.backend", f"{name!r} is not one of {choices}") from None
    options = {key: value for key, value in table.items() if key != "backend"}
    return BootloaderConfig(backend, options)


def _parse_install(table: Mapping[str, Any]) -> InstallConfig:
    _check_unknown(table, {"verify_readback", "fsync_interval", "allow_downgrade"}, "install")
    interval = _take(table, "fsync_interval", int, "install", InstallConfig.fsync_interval)
    if interval < 1 << 20:
        raise ConfigError("install.fsync_interval", f"must be at least 1 MiB, found {interval}")
    return InstallConfig(
        verify_readback=_take(table, "verify_readback", bool, "install", False),
        fsync_interval=interval,
        allow_downgrade=_take(table, "allow_downgrade", bool, "install", False),
    )


def parse_removable(table: Mapping[str, Any]) -> RemovableConfig:
    """Read the [removable] table; ConfigError names the offending key."""
    unknown = sorted(set(table) - {"enabled", "action"})
    if unknown:
        raise ConfigError(f"removable.{unknown[0]}", "is not a known setting")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("removable.enabled", f"must be true or false, found {enabled!r}")
    action = table.get("action", Action.ANNOUNCE.value)
    choices = {member.value: member for member in Action}
    if action not in choices:
        raise ConfigError("removable.action", f"must be 'install' or 'announce', found {action!r}")
    return RemovableConfig(enabled, choices[action])


def _parse_download(table: Mapping[str, Any]) -> DownloadSettings | None:
    if "download" not in table:
        return None
    # Imported here: it brings in requests, which a device that never downloads need
    # not load, and otad.download must not import this module back.
    from otad.download import parse_download_settings

    return parse_download_settings(_take(table, "download", dict, ""))


def _parse_server(
    table: Mapping[str, Any], download: DownloadSettings | None, data_dir: Path
) -> ServerConfig | None:
    if "server" not in table:
        return None
    # Imported here for the same reason as otad.download above.
    from otad.fleet.config import parse_server_config

    return parse_server_config(_take(table, "server", dict, ""), download, data_dir)


def parse_config(text: str, source: str = "otad.conf") -> Config:
    """Parse the TOML text of a configuration; ConfigError names the offending key."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"{source} is not valid TOML: {error}") from None
    _check_unknown(table, _TOP_KEYS, "")
    device_type = _take(table, "device_type", str, "")
    if not device_type.strip():
        raise ConfigError("device_type", "must not be empty")
    keys = _take(table, "trusted_keys", list, "")
    if not keys or not all(isinstance(key, str) for key in keys):
        raise ConfigError("trusted_keys", "must list at least one public key file")
    timeout = _take(table, "health_timeout", int, "", 300)
    if timeout <= 0:
        raise ConfigError(
            "health_timeout", f"must be a positive number of seconds, found {timeout}"
        )
    data_dir = _absolute(_take(table, "data_dir", str, ""), "data_dir")
    download = _parse_download(table)
    return Config(
        device_type=device_type,
        data_dir=data_dir,
        trusted_keys=tuple(_absolute(key, "trusted_keys") for key in keys),
        bootloader=_parse_bootloader(_take(table, "bootloader", dict, "")),
        slots=_parse_slots(_take(table, "slots", dict, "")),
        health_timeout=timeout,
        install=_parse_install(_take(table, "install", dict, "", {})),
        removable=parse_removable(_take(table, "removable", dict, "", {})),
        download=download,
        server=_parse_server(table, download, data_dir),
    )


def load_config(path: Path = DEFAULT_PATH) -> Config:
    """Read and parse the configuration file at `path`."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError("", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    return parse_config(text, str(path))
