"""A verified artifact described for people (text) and programs (JSON-ready dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from otad.artifact.reader import ArtifactHeader, PayloadFile, SignatureStatus


def describe(header: ArtifactHeader, files: Sequence[PayloadFile]) -> dict[str, Any]:
    """The fields `otad-artifact read --json` prints; stable keys, snake_case."""
    info = header.header_info
    signature: dict[str, Any] = {"status": header.signature.value}
    if header.signed_by is not None:
        signature["key"] = header.signed_by.source
        signature["key_type"] = header.signed_by.type.value
        signature["key_sha256"] = header.signed_by.fingerprint
    payloads = []
    for payload in header.payloads:
        index = payload.chunk_index
        payloads.append(
            {
                "type": payload.type,
                "software_version": payload.software_version,
                "provides": dict(payload.type_info.provides),
                "depends": {
                    key: value if isinstance(value, str) else list(value)
                    for key, value in payload.type_info.depends.items()
                },
                "clears_provides": None
                if payload.type_info.clears_provides is None
                else list(payload.type_info.clears_provides),
                "meta_data": payload.user_meta_data,
                "chunk_index": None
                if index is None
                else {"chunk_size": index.chunk_size, "chunks": len(index.digests)},
                "files": [
                    {
                        "name": payload_file.name,
                        "size": payload_file.size,
                        "checksum": payload_file.checksum,
                        "verified": payload_file.verified,
                    }
                    for payload_file in files
                    if payload_file.payload.index == payload.index
                ],
            }
        )
    return {
        "name": info.artifact_name,
        "format": "mender",
        "version": 3,
        "signature": signature,
        "compatible_devices": list(info.compatible_devices),
        "provides_group": info.artifact_group,
        "depends_artifact_names": list(info.depends_artifact_names),
        "depends_groups": list(info.depends_groups),
        "state_scripts": sorted(header.scripts),
        "payloads": payloads,
    }


_SIGNATURE_TEXT = {
    SignatureStatus.VERIFIED.value: "verified",
    SignatureStatus.UNCHECKED.value: "signed, NOT checked (no key given)",
    SignatureStatus.UNSIGNED.value: "not signed",
}


def _mapping_lines(title: str, values: dict[str, Any], indent: str) -> list[str]:
    if not values:
        return [f"{indent}{title}: none"]
    lines = [f"{indent}{title}:"]
    lines += [f"{indent}  {key}: {value}" for key, value in sorted(values.items())]
    return lines


def format_text(description: dict[str, Any]) -> str:
    """Human-readable form of `describe()`'s result."""
    signature = description["signature"]
    status = _SIGNATURE_TEXT[signature["status"]]
    if "key" in signature:
        status += f" with {signature['key']} ({signature['key_type']})"
    lines = [
        f"Artifact: {description['name']}",
        "  Format: mender, version 3",
        f"  Signature: {status}",
        f"  Compatible devices: {', '.join(description['compatible_devices'])}",
        f"  Provides group: {description['provides_group'] or 'none'}",
        f"  Depends on artifacts: {', '.join(description['depends_artifact_names']) or 'any'}",
        f"  Depends on groups: {', '.join(description['depends_groups']) or 'any'}",
        f"  State scripts: {', '.join(description['state_scripts']) or 'none'}",
    ]
    for number, payload in enumerate(description["payloads"]):
        lines.append(f"Payload {number}: {payload['type'] or 'empty (bootstrap)'}")
        lines.append(f"  Software version: {payload['software_version'] or 'none'}")
        lines += _mapping_lines("Provides", payload["provides"], "  ")
        lines += _mapping_lines("Depends", payload["depends"], "  ")
        clears = payload["clears_provides"]
        lines.append(f"  Clears provides: {', '.join(clears) if clears else 'none'}")
        lines += _mapping_lines("Meta-data", payload["meta_data"], "  ")
        index = payload["chunk_index"]
        if index:
            lines.append(
                f"  Chunk index: {index['chunks']} chunks of {index['chunk_size']} bytes (signed)"
            )
        lines.append("  Files:" if payload["files"] else "  Files: none")
        for item in payload["files"]:
            state = "verified" if item["verified"] else "NOT verified"
            lines.append(
                f"    {item['name']}: {item['size']} bytes, sha256 {item['checksum']}, {state}"
            )
    return "\n".join(lines) + "\n"
