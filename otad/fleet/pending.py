"""The deployment in progress, kept in the data directory across restarts and reboots.

A deployment outlives the process that started it: the device reboots into the new
release, and success or failure is known only after the trial. So before each step
that changes the device the poller saves what it is doing, atomically, and after a
restart it reads the engine's last outcome to finish the deployment's story on the
server.

An install that a restart of otad cut short (stage `installing` with no outcome for it)
is not a failure: the server hands the deployment out again until the device reports a
final status, so the record goes to stage `interrupted` and the next poll installs the
deployment again, resuming the download where otad.resume allows it. `interruptions`
counts these, and `reported` keeps the statuses the server already has, so that none is
sent twice.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from otad.fleet.deployments import DeploymentStatus, LogMessage

log = logging.getLogger(__name__)

FILE_NAME = "deployment.json"
FORMAT = 1
MAX_LOG_MESSAGES = 200


class Stage(enum.Enum):
    """How far the device got; the value is the on-disk spelling."""

    INSTALLING = "installing"  # downloading and writing (one pass: the artifact streams)
    INTERRUPTED = "interrupted"  # a restart cut the install short: install it again
    REBOOTING = "rebooting"  # installed, reboot requested, waiting for the trial's end
    REPORTING = "reporting"  # the final status is known and must reach the server


@dataclass(frozen=True)
class Pending:
    deployment_id: str
    artifact_name: str
    stage: Stage
    started: float  # seconds since the epoch, comparable with the engine's Outcome.time
    final: DeploymentStatus | None = None
    log: tuple[LogMessage, ...] = field(default_factory=tuple)
    interruptions: int = 0  # installs of this deployment that a restart cut short
    reported: tuple[DeploymentStatus, ...] = ()  # the step statuses the server has

    def noted(self, message: LogMessage) -> Pending:
        return replace(self, log=(*self.log, message)[-MAX_LOG_MESSAGES:])

    def has_reported(self, status: DeploymentStatus) -> bool:
        return status in self.reported


def serialize(pending: Pending) -> bytes:
    value = {
        "format": FORMAT,
        "deployment_id": pending.deployment_id,
        "artifact_name": pending.artifact_name,
        "stage": pending.stage.value,
        "started": pending.started,
        "final": pending.final.value if pending.final else None,
        "log": [[m.time, m.level, m.message] for m in pending.log],
        "interruptions": pending.interruptions,
        "reported": [status.value for status in pending.reported],
    }
    return json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"


def parse(data: bytes) -> Pending:
    value = json.loads(data)
    if value.get("format") != FORMAT:
        raise ValueError(f"format {value.get('format')!r}, expected {FORMAT}")
    return Pending(
        deployment_id=str(value["deployment_id"]),
        artifact_name=str(value["artifact_name"]),
        stage=Stage(value["stage"]),
        started=float(value["started"]),
        final=DeploymentStatus(value["final"]) if value.get("final") else None,
        log=tuple(LogMessage(float(t), str(lv), str(m)) for t, lv, m in value.get("log", [])),
        interruptions=int(value.get("interruptions", 0)),
        reported=tuple(DeploymentStatus(status) for status in value.get("reported", [])),
    )


class PendingStore:
    """Loads, saves and clears the pending deployment in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME

    def load(self) -> Pending | None:
        """The saved deployment; None when there is none or the record is unreadable
        (logged: the server then times the deployment out on its side)."""
        try:
            return parse(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.error("%s is not a deployment record (%s); forgetting it", self.path, error)
            return None

    def save(self, pending: Pending) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.directory / f".{FILE_NAME}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, serialize(pending))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, self.path)
        self._sync_directory()

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        self._sync_directory()

    def _sync_directory(self) -> None:
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
