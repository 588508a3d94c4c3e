"""The file tree an update module works in, one per payload, on the data partition.

Layout, as the v3 file API specifies:

    version                      "3"
    current_artifact_name        what the device runs now (empty when unknown)
    current_artifact_group
    current_device_type
    header/artifact_name         the artifact being installed (no trailing newline)
    header/artifact_group
    header/payload_type
    header/header-info           JSON, as in the artifact's header.tar
    header/type-info             this payload's type-info, JSON
    header/meta-data             this payload's meta-data (otad's own keys left out)
    tmp/                         empty scratch space for the module
    stream-next, streams/NAME    FIFOs, only while Download runs
    files/NAME                   the payload files, when the module did not stream them

The tree lives at WORK_DIR/payloads/NNNN/tree, as under Mender, and survives a reboot so
that ArtifactVerifyReboot and later states find it again.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from otad.artifact.reader import ArtifactHeader, Payload
from otad.errors import EnvironmentProblem, UnsafePath

PROTOCOL_VERSION = 3


@dataclass(frozen=True)
class DeviceContext:
    """What the device runs now, as the `current_*` files tell a module."""

    device_type: str
    artifact_name: str | None = None
    artifact_group: str | None = None


def tree_path(work_dir: Path, payload_index: int) -> Path:
    return work_dir / "payloads" / f"{payload_index:04}" / "tree"


def check_file_name(name: str) -> str:
    """Return `name` if it is a plain file name that stays inside its directory."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"payload file name {name!r} would leave the module's file tree")
    return name


@dataclass(frozen=True)
class FileTree:
    """The paths of one payload's file tree."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def streams(self) -> Path:
        return self.root / "streams"

    @property
    def stream_next(self) -> Path:
        return self.root / "stream-next"

    def stream(self, name: str) -> Path:
        return self.streams / check_file_name(name)

    def file(self, name: str) -> Path:
        return self.files / check_file_name(name)

    def exists(self) -> bool:
        return self.root.is_dir()

    def remove(self) -> None:
        """Delete the whole tree; a tree that is already gone is fine."""
        try:
            shutil.rmtree(self.root)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise EnvironmentProblem(
                f"cannot remove the module file tree {self.root}: {error.strerror}"
            ) from None

    def remove_streams(self) -> None:
        self.stream_next.unlink(missing_ok=True)
        shutil.rmtree(self.streams, ignore_errors=True)


def header_files(header: ArtifactHeader, payload: Payload) -> dict[str, bytes]:
    """The files of `header/`, by name, for one payload of `header`."""
    info = header.header_info
    return {
        "artifact_name": info.artifact_name.encode(),
        "artifact_group": (info.artifact_group or "").encode(),
        "payload_type": (payload.type or "").encode(),
        "header-info": info.serialize(),
        "type-info": payload.type_info.serialize(),
        "meta-data": json.dumps(payload.user_meta_data, separators=(",", ":")).encode(),
    }


def device_files(device: DeviceContext) -> dict[str, bytes]:
    """The files at the top of the tree that describe the device and the protocol."""

    def line(value: str | None) -> bytes:
        return f"{value}\n".encode() if value else b""

    return {
        "version": f"{PROTOCOL_VERSION}\n".encode(),
        "current_artifact_name": line(device.artifact_name),
        "current_artifact_group": line(device.artifact_group),
        "current_device_type": line(device.device_type),
    }


def create_tree(
    root: Path, header: ArtifactHeader, payload: Payload, device: DeviceContext
) -> FileTree:
    """Lay out a fresh tree at `root`, replacing whatever an earlier update left there."""
    tree = FileTree(root)
    tree.remove()
    try:
        (root / "header").mkdir(mode=0o700, parents=True)
        tree.tmp.mkdir(mode=0o700)
        for name, data in device_files(device).items():
            _write_synced(root / name, data)
        for name, data in header_files(header, payload).items():
            _write_synced(root / "header" / name, data)
        for directory in (root / "header", root):
            fsync_directory(directory)
    except OSError as error:
        raise EnvironmentProblem(
            f"cannot create the module file tree {root}: {error.strerror}"
        ) from None
    return tree


def _write_synced(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
