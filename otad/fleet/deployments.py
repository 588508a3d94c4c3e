"""Deployments: ask for the next one, report its status, upload its log.

The paths are those of the deployments service's device APIs:

- POST /api/devices/v2/deployments/device/deployments/next with
  {"device_provides": {device_type, artifact_name, <provides of the running release>},
  "update_control_map": false}. A server without the v2 API answers 404; otad then
  uses v1, GET /api/devices/v1/deployments/device/deployments/next?artifact_name=&
  device_type=, for as long as this process runs. Both answer 204 (nothing to do) or
  200 with DeploymentInstructions {id, artifact: {artifact_name, source: {uri,
  expire}, device_types_compatible}}; 409 means the request conflicts with what the
  server knows of the device.
- PUT /api/devices/v1/deployments/device/deployments/{id}/status with {"status": s,
  "substate": ...}: 204; 404 (no such deployment for this device) and 409 (the
  deployment was aborted) end the deployment.
- PUT /api/devices/v1/deployments/device/deployments/{id}/log with {"messages":
  [{timestamp (RFC 3339), level, message}]}: 204.

otad never pauses a deployment (it has no update control maps), so the pause_* statuses
are listed for completeness but never sent.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from otad.fleet.client import BadReply, Client, ServerError

log = logging.getLogger(__name__)

NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
NEXT_V1 = "/api/devices/v1/deployments/device/deployments/next"
DEPLOYMENT_V1 = "/api/devices/v1/deployments/device/deployments/{id}"


class DeploymentStatus(enum.Enum):
    """A device's status in a deployment; the value is the API's spelling."""

    DOWNLOADING = "downloading"
    PAUSE_BEFORE_INSTALLING = "pause_before_installing"
    INSTALLING = "installing"
    PAUSE_BEFORE_REBOOTING = "pause_before_rebooting"
    REBOOTING = "rebooting"
    PAUSE_BEFORE_COMMITTING = "pause_before_committing"
    SUCCESS = "success"
    FAILURE = "failure"
    ALREADY_INSTALLED = "already-installed"


@dataclass(frozen=True)
class Deployment:
    """DeploymentInstructions: what the server wants installed, and where it is."""

    id: str
    artifact_name: str
    uri: str
    expire: str | None  # RFC 3339, as the server sent it
    device_types: tuple[str, ...]


@dataclass(frozen=True)
class LogMessage:
    time: float  # seconds since the epoch
    level: str  # INFO, WARNING, ERROR...
    message: str

    def to_json(self) -> dict[str, str]:
        stamp = datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")
        return {"timestamp": stamp.replace("+00:00", "Z"), "level": self.level,
                "message": self.message}  # fmt: skip


def log_message(level: str, message: str) -> LogMessage:
    return LogMessage(time.time(), level, message)


class DeploymentGone(ServerError):
    """404 or 409 on a status report: the deployment no longer exists or was aborted."""


def _text(value: Any, where: str, path: str, status: int) -> str:
    if not isinstance(value, str) or not value:
        raise BadReply("GET", path, status, f"{where} must be a non-empty string")
    return value


def parse_instructions(value: Any, path: str, status: int = 200) -> Deployment:
    """DeploymentInstructions from a 200 answer; BadReply names what is missing."""
    if not isinstance(value, dict) or not isinstance(value.get("artifact"), dict):
        raise BadReply("GET", path, status, "the answer has no artifact object")
    artifact = value["artifact"]
    source = artifact.get("source")
    if not isinstance(source, dict):
        raise BadReply("GET", path, status, "artifact.source must be an object")
    devices = artifact.get("device_types_compatible")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise BadReply("GET", path, status, "artifact.device_types_compatible must list strings")
    expire = source.get("expire")
    return Deployment(
        id=_text(value.get("id"), "id", path, status),
        artifact_name=_text(artifact.get("artifact_name"), "artifact.artifact_name", path, status),
        uri=_text(source.get("uri"), "artifact.source.uri", path, status),
        expire=expire if isinstance(expire, str) else None,
        device_types=tuple(devices),
    )


class DeploymentsApi:
    """The deployments service as one device sees it."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.uses_v2 = True  # until a server answers 404 to v2

    def next_deployment(self, provides: Mapping[str, str]) -> Deployment | None:
        """The deployment the server has for this device, or None.

        `provides` must hold device_type and artifact_name, and may hold the running
        release's other provides (rootfs-image.version...).
        """
        if self.uses_v2:
            body = {"device_provides": dict(provides), "update_control_map": False}
            try:
                reply = self.client.send(
                    "POST", NEXT_V2, expect=(200, 204), body=json.dumps(body).encode()
                )
            except ServerError as error:
                if error.status != 404:
                    raise
                log.info("the server has no v2 deployments API; using v1")
                self.uses_v2 = False
            else:
                return None if reply.status == 204 else parse_instructions(reply.json(), NEXT_V2)
        params = {
            "artifact_name": provides["artifact_name"],
            "device_type": provides["device_type"],
        }
        reply = self.client.send("GET", NEXT_V1, expect=(200, 204), params=params)
        return None if reply.status == 204 else parse_instructions(reply.json(), NEXT_V1)

    def report_status(
        self, deployment_id: str, status: DeploymentStatus, substate: str = ""
    ) -> None:
        """Tell the server where the device is; DeploymentGone on 404 and 409."""
        path = DEPLOYMENT_V1.format(id=quote(deployment_id, safe="")) + "/status"
        value = {"status": status.value}
        if substate:
            value["substate"] = substate[:200]
        try:
            self.client.send("PUT", path, expect=(200, 204), body=json.dumps(value).encode())
        except ServerError as error:
            if error.status in (404, 409):
                raise DeploymentGone(error.method, path, error.status, error.detail) from error
            raise
        log.info("deployment %s: reported %s", deployment_id, status.value)

    def upload_log(self, deployment_id: str, messages: Sequence[LogMessage]) -> None:
        """Upload the deployment's log (sent with a failure); DeploymentGone on 404."""
        path = DEPLOYMENT_V1.format(id=quote(deployment_id, safe="")) + "/log"
        value = {"messages": [message.to_json() for message in messages]}
        try:
            self.client.send("PUT", path, expect=(200, 204), body=json.dumps(value).encode())
        except ServerError as error:
            if error.status in (404, 409):
                raise DeploymentGone(error.method, path, error.status, error.detail) from error
            raise
