"""The small text and JSON members of a Mender Artifact v3, parsed and serialized.

Each member is a frozen dataclass with a `parse` classmethod that takes the member's
raw bytes and refuses anything the format does not allow, and a `serialize` method that
writes the compact form mender-artifact writes. Field names follow the format's keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otad.errors import MalformedArtifact, UnknownFormat

FORMAT_NAME = "mender"
FORMAT_VERSION = 3
ROOTFS_IMAGE = "rootfs-image"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_STATE_SCRIPT = re.compile(
    r"(ArtifactInstall|ArtifactReboot|ArtifactCommit|ArtifactRollback|"
    r"ArtifactRollbackReboot|ArtifactFailure|Download)_(Enter|Leave|Error)_[0-9]{2}(_.*)?"
)

DependsValue = str | tuple[str, ...]


def compact_json(value: object) -> bytes:
    """Serialize as mender-artifact does: no spaces, keys in insertion order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _load_object(data: bytes, member: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise MalformedArtifact(f"{member} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        found = type(value).__name__
        raise MalformedArtifact(f"{member} must hold a JSON object, found {found}")
    return value


def _optional_object(value: dict[str, Any], key: str, member: str) -> dict[str, Any]:
    """The object under `key`; absent or null means empty."""
    item = value.get(key)
    if item is None:
        return {}
    if not isinstance(item, dict):
        raise MalformedArtifact(f"{member}: {key} must be an object, found {item!r}")
    return item


def _string_list(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise MalformedArtifact(f"{where} must be a string or a list of strings, found {value!r}")


def is_state_script_name(name: str) -> bool:
    """True for the state script names Mender clients run (ArtifactInstall_Enter_00...)."""
    return _STATE_SCRIPT.fullmatch(name) is not None


@dataclass(frozen=True)
class FormatVersion:
    """The `version` member: which format this archive is."""

    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @classmethod
    def parse(cls, data: bytes) -> FormatVersion:
        value = _load_object(data, "version")
        name, version = value.get("format"), value.get("version")
        if name != FORMAT_NAME:
            raise UnknownFormat(f"version: format is {name!r}, expected {FORMAT_NAME!r}")
        if version != FORMAT_VERSION:
            raise UnknownFormat(
                f"version: Mender Artifact version {version!r}, only {FORMAT_VERSION} is read"
            )
        return cls(name, version)

    def serialize(self) -> bytes:
        return compact_json({"format": self.format, "version": self.version})


@dataclass(frozen=True)
class Manifest:
    """The `manifest` member: SHA-256 of every other signed member, in sha256sum form."""

    checksums: Mapping[str, str]

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedArtifact("manifest is not ASCII text") from None
        checksums: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            digest, separator, name = line.partition("  ")
            if not separator or not _SHA256_HEX.fullmatch(digest) or not name:
                raise MalformedArtifact(
                    f"manifest line {number}: expected '<sha256 hex>  <name>', found {line!r}"
                )
            if name in checksums:
                raise MalformedArtifact(f"manifest lists {name} twice")
            checksums[name] = digest
        if not checksums:
            raise MalformedArtifact("manifest is empty")
        return cls(checksums)

    def serialize(self) -> bytes:
        lines = [f"{digest}  {name}\n" for name, digest in sorted(self.checksums.items())]
        return "".join(lines).encode("ascii")


@dataclass(frozen=True)
class HeaderInfo:
    """`header-info`: payload types and the artifact-wide provides and depends."""

    payload_types: tuple[str | None, ...]
    artifact_name: str
    artifact_group: str | None = None
    compatible_devices: tuple[str, ...] = ()
    depends_artifact_names: tuple[str, ...] = ()
    depends_groups: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: bytes) -> HeaderInfo:
        value = _load_object(data, "header-info")
        payloads = value.get("payloads")
        if not isinstance(payloads, list) or not payloads:
            raise MalformedArtifact("header-info: 'payloads' must be a non-empty list")
        types: list[str | None] = []
        for entry in payloads:
            # A missing type is no null type: Mender requires the key.
            missing = not isinstance(entry, dict) or "type" not in entry
            if missing or not isinstance(entry["type"], (str, type(None))):
                raise MalformedArtifact(f"header-info: payload entry {entry!r} has no type")
            types.append(entry["type"])
        provides = value.get("artifact_provides")
        depends = value.get("artifact_depends")
        if not isinstance(provides, dict) or not isinstance(depends, dict):
            raise MalformedArtifact(
                "header-info: 'artifact_provides' and 'artifact_depends' must be objects"
            )
        name = provides.get("artifact_name")
        if not isinstance(name, str) or not name:
            raise MalformedArtifact("header-info: artifact_provides.artifact_name is missing")
        group = provides.get("artifact_group")
        if group is not None and not isinstance(group, str):
            raise MalformedArtifact(f"header-info: artifact_group {group!r} is not a string")
        devices = _string_list(depends.get("device_type", []), "artifact_depends.device_type")
        if not devices:
            raise MalformedArtifact("header-info: artifact_depends.device_type is missing")
        return cls(
            payload_types=tuple(types),
            artifact_name=name,
            artifact_group=group or None,
            compatible_devices=devices,
            depends_artifact_names=_string_list(
                depends.get("artifact_name", []), "artifact_depends.artifact_name"
            ),
            depends_groups=_string_list(
                depends.get("artifact_group", []), "artifact_depends.artifact_group"
            ),
        )

    def serialize(self) -> bytes:
        provides: dict[str, str] = {"artifact_name": self.artifact_name}
        if self.artifact_group:
            provides["artifact_group"] = self.artifact_group
        depends: dict[str, list[str]] = {}
        if self.depends_artifact_names:
            depends["artifact_name"] = list(self.depends_artifact_names)
        depends["device_type"] = list(self.compatible_devices)
        if self.depends_groups:
            depends["artifact_group"] = list(self.depends_groups)
        return compact_json(
            {
                "payloads": [{"type": kind} for kind in self.payload_types],
                "artifact_provides": provides,
                "artifact_depends": depends,
            }
        )


@dataclass(frozen=True)
class TypeInfo:
    """`headers/NNNN/type-info`: the payload type and its own provides and depends.

    A type of None is an empty payload (bootstrap artifact). mender-artifact 3.9 writes
    an empty string for rootfs images; `parse` reads that as rootfs-image.
    """

    type: str | None
    provides: Mapping[str, str] = field(default_factory=dict)
    depends: Mapping[str, DependsValue] = field(default_factory=dict)
    clears_provides: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, data: bytes, member: str = "type-info") -> TypeInfo:
        value = _load_object(data, member)
        if "type" not in value or not isinstance(value["type"], (str, type(None))):
            raise MalformedArtifact(f"{member}: 'type' must be a string or null")
        kind = value["type"]
        if kind == "":
            kind = ROOTFS_IMAGE
        provides = _optional_object(value, "artifact_provides", member)
        if not all(isinstance(item, str) for item in provides.values()):
            raise MalformedArtifact(f"{member}: artifact_provides must map names to strings")
        depends_raw = _optional_object(value, "artifact_depends", member)
        depends: dict[str, DependsValue] = {}
        for key, item in depends_raw.items():
            listed = _string_list(item, f"{member}: artifact_depends.{key}")
            depends[key] = item if isinstance(item, str) else listed
        clears = value.get("clears_artifact_provides")
        return cls(
            type=kind,
            provides=dict(provides),
            depends=depends,
            clears_provides=None
            if clears is None
            else _string_list(clears, f"{member}: clears_artifact_provides"),
        )

    def serialize(self) -> bytes:
        value: dict[str, object] = {"type": self.type}
        if self.depends:
            value["artifact_depends"] = {
                key: item if isinstance(item, str) else list(item)
                for key, item in self.depends.items()
            }
        if self.provides:
            value["artifact_provides"] = dict(self.provides)
        if self.clears_provides is not None:
            value["clears_artifact_provides"] = list(self.clears_provides)
        return compact_json(value)


MetaDataValue = str | int | float | list[str | int | float]


def check_meta_data(value: Mapping[str, object], member: str) -> dict[str, MetaDataValue]:
    """Enforce the format's rule: top-level values are strings, numbers or lists of them."""
    checked: dict[str, MetaDataValue] = {}
    for key, item in value.items():
        scalar = (str, int, float)
        is_scalar = isinstance(item, scalar) and not isinstance(item, bool)
        is_list = isinstance(item, list) and all(
            isinstance(element, scalar) and not isinstance(element, bool) for element in item
        )
        if not (is_scalar or is_list):
            raise MalformedArtifact(
                f"{member}: key {key!r} holds {item!r}; "
                "values must be strings, numbers or lists of strings and numbers"
            )
        checked[key] = item  # type: ignore[assignment]
    return checked


def parse_meta_data(data: bytes, member: str = "meta-data") -> dict[str, MetaDataValue]:
    """Parse `headers/NNNN/meta-data`; an empty member means no meta-data."""
    if not data.strip():
        return {}
    return check_meta_data(_load_object(data, member), member)
