"""The request and response shapes of the Mender device APIs otad uses, written by hand
from the OpenAPI files (deviceauth, deployments and inventory docs/devices_api.yml), and
a small checker for them. Only what the server side of the tests needs is modelled."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}

# deviceauth: AuthRequest (id_data and pubkey required; id_data is JSON in a string).
AUTH_REQUEST: Schema = {
    "type": "object",
    "required": ["id_data", "pubkey"],
    "properties": {"id_data": STRING, "pubkey": STRING, "tenant_token": STRING},
}

# deployments v2: the body of POST .../v2/deployments/device/deployments/next.
NEXT_V2_REQUEST: Schema = {
    "type": "object",
    "required": ["device_provides"],
    "properties": {
        "device_provides": {
            "type": "object",
            "required": ["device_type", "artifact_name"],
            "additional": STRING,
        },
        "update_control_map": {"type": "boolean"},
    },
}

STATUSES = [
    "installing",
    "pause_before_installing",
    "downloading",
    "pause_before_rebooting",
    "rebooting",
    "pause_before_committing",
    "success",
    "failure",
    "already-installed",
]

# deployments v1: DeploymentStatus.
DEPLOYMENT_STATUS: Schema = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "enum": STATUSES}, "substate": STRING},
}

# deployments v1: DeploymentLog.
DEPLOYMENT_LOG: Schema = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["timestamp", "level", "message"],
                "properties": {
                    "timestamp": {"type": "string", "format": "date-time"},
                    "level": STRING,
                    "message": STRING,
                },
            },
        }
    },
}

# inventory v1: a list of Attribute (name and value required; a value is a string, a
# number or an array of either, not mixed; otad sends strings and arrays of strings).
ATTRIBUTES: Schema = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name", "value"],
        "properties": {
            "name": STRING,
            "value": {"anyOf": [STRING, {"type": "array", "items": STRING}]},
            "description": STRING,
        },
    },
}

# deployments v1: DeploymentInstructions (what the test server answers).
DEPLOYMENT_INSTRUCTIONS: Schema = {
    "type": "object",
    "required": ["id", "artifact"],
    "properties": {
        "id": STRING,
        "artifact": {
            "type": "object",
            "required": ["source", "device_types_compatible", "artifact_name"],
            "properties": {
                "id": STRING,
                "artifact_name": STRING,
                "source": {
                    "type": "object",
                    "properties": {"uri": STRING, "expire": {"type": "string"}},
                },
                "device_types_compatible": {"type": "array", "items": STRING},
            },
        },
    },
}

_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
}


def problems(value: Any, schema: Schema, where: str = "$") -> list[str]:
    """What in `value` breaks `schema` (empty when it fits); unknown properties break it."""
    if "anyOf" in schema:
        found_each = [problems(value, choice, where) for choice in schema["anyOf"]]
        return [] if any(not found for found in found_each) else found_each[0]
    kind = schema["type"]
    if not isinstance(value, _TYPES[kind]):
        return [f"{where}: expected {kind}, found {type(value).__name__}"]
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if schema.get("format") == "date-time" and not (len(value) >= 20 and value[10] == "T"):
        found.append(f"{where}: {value!r} is not an RFC 3339 date-time")
    if kind == "array":
        for index, item in enumerate(value):
            found += problems(item, schema["items"], f"{where}[{index}]")
    if kind == "object":
        found += [f"{where}: {key} is required" for key in schema.get("required", [])
                  if key not in value]  # fmt: skip
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                found += problems(item, properties[key], f"{where}.{key}")
            elif "additional" in schema:
                found += problems(item, schema["additional"], f"{where}.{key}")
            else:
                found.append(f"{where}: {key} is not a property the API defines")
    return found
