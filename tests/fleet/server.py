"""A Mender server's device APIs for the tests, on 127.0.0.1 at a free port.

It checks every request as the OpenAPI files describe it (method, path, headers,
content type, JSON body against tests/fleet/schemas.py, the JWT, and X-MEN-Signature
against the posted public key) and records each one. A request that breaks the API is
answered 400 and listed in `violations`, which the `server` fixture asserts empty.
Tests script its answers: how often to refuse authentication, failures to inject,
deployments to hand out, whether it has the v2 deployments API.

As a real server does, it hands the first deployment of `offers` out at every poll until
the device reports a final status for it (success, failure, already-installed) or a
status report finds it aborted (409); each time with a fresh "pre-signed" query in its
URI, as a server that hands out storage URLs does.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tests.fleet import schemas

AUTH = "/api/devices/v1/authentication/auth_requests"
NEXT_V1 = "/api/devices/v1/deployments/device/deployments/next"
NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
DEPLOYMENTS = "/api/devices/v1/deployments/device/deployments/"
INVENTORY = "/api/devices/v1/inventory/device/attributes"
ARTIFACTS = "/artifacts/"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    at: float = field(default_factory=time.monotonic)  # when it arrived


FINAL = frozenset({"success", "failure", "already-installed"})


@dataclass
class Offer:
    """A deployment the server hands out until the device reports a final status."""

    id: str
    artifact_name: str
    artifact: Path | None  # served at /artifacts/<id>; None: a URI that answers 404
    device_types: tuple[str, ...] = ("otad-test",)
    url: str | None = None  # the artifact elsewhere (nginx) rather than at /artifacts/<id>


@dataclass
class Script:
    refuse_auth: int = 0  # auth requests answered 401 before the device is accepted
    has_v2: bool = True
    fail_next: deque[int] = field(default_factory=deque)  # statuses for next polls
    fail_status: deque[int] = field(default_factory=deque)  # for status reports
    offers: deque[Offer] = field(default_factory=deque)
    aborted: set[str] = field(default_factory=set)  # deployment ids answered 409
    # Status reports wait for this to be set before they are answered (None: no wait).
    hold_status: threading.Event | None = None


def verify_signature(pubkey: str, body: bytes, signature: str) -> bool:
    key = serialization.load_pem_public_key(pubkey.encode())
    raw = base64.b64decode(signature, validate=True)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, body, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(raw, body, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, body)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _jwt() -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return ".".join([part({"alg": "RS256", "typ": "JWT"}), part({"sub": "device"}),
                     secrets.token_urlsafe(16)])  # fmt: skip


class FakeMender:
    def __init__(self) -> None:
        self.script = Script()
        self.seen: list[Seen] = []
        self.violations: list[str] = []
        self.statuses: list[tuple[str, str]] = []
        self.logs: dict[str, list[dict[str, str]]] = {}
        self.inventory: dict[str, str] = {}
        self.identities: list[dict[str, str]] = []
        self.tokens: set[str] = set()
        self.offered: dict[str, Offer] = {}
        self.handed_out: list[tuple[str, str]] = []  # (deployment id, URI), in order
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"mender": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def revoke_tokens(self) -> None:
        """Make every issued token expire, as a server does after a while."""
        with self.lock:
            self.tokens.clear()

    def end(self, deployment_id: str) -> None:
        """Stop handing `deployment_id` out (it got a final status, or was aborted)."""
        with self.lock:
            offers = self.script.offers
            kept = [offer for offer in offers if offer.id != deployment_id]
            offers.clear()
            offers.extend(kept)

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if (method is None or s.method == method)
                and (path is None or s.path.startswith(path))]  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    mender: FakeMender
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing -------------------------------------------------------------------

    def _answer(self, status: int, body: bytes = b"", kind: str = "application/json") -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, text: str) -> None:
        value = {"error": text, "request_id": secrets.token_hex(8)}
        self._answer(status, json.dumps(value).encode())

    def _violation(self, text: str) -> None:
        self.mender.violations.append(f"{self.command} {self.path}: {text}")
        self._error(400, text)

    def _read(self, schema: schemas.Schema | None) -> tuple[bytes, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if schema is None:
            if raw:
                self._violation("a body where the API defines none")
                return None
            return raw, None
        if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
            self._violation(f"Content-Type {self.headers.get('Content-Type')!r}")
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            self._violation("body is not JSON")
            return None
        found = schemas.problems(value, schema)
        if found:
            self._violation("; ".join(found))
            return None
        return raw, value

    def _record(self, body: Any) -> None:
        path = urlsplit(self.path).path
        self.mender.seen.append(Seen(self.command, path, dict(self.headers.items()), body))

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or token.count(".") != 2:
            self._violation(f"Authorization {header!r} is not 'Bearer <JWT>'")
            return False
        if token not in self.mender.tokens:
            self._error(401, "token expired or unknown")
            return False
        return True

    # -- routing --------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 (http.server dispatches by this name)
        path = urlsplit(self.path).path
        if path == AUTH:
            self._auth()
        elif path == NEXT_V2:
            self._next_v2()
        else:
            self._violation("no such POST endpoint")

    def do_GET(self) -> None:  # noqa: N802 (http.server dispatches by this name)
        path = urlsplit(self.path).path
        if path == NEXT_V1:
            self._next_v1()
        elif path.startswith(ARTIFACTS):
            self._artifact(path.removeprefix(ARTIFACTS))
        else:
            self._violation("no such GET endpoint")

    def do_PUT(self) -> None:  # noqa: N802 (http.server dispatches by this name)
        path = urlsplit(self.path).path
        name = path.removeprefix(DEPLOYMENTS)
        if path.startswith(DEPLOYMENTS) and name.endswith("/status"):
            self._status(name.removesuffix("/status"))
        elif path.startswith(DEPLOYMENTS) and name.endswith("/log"):
            self._log(name.removesuffix("/log"))
        else:
            self._violation("no such PUT endpoint (inventory is PATCHed)")

    def do_PATCH(self) -> None:  # noqa: N802 (http.server dispatches by this name)
        if urlsplit(self.path).path == INVENTORY:
            self._inventory()
        else:
            self._violation("no such PATCH endpoint")

    # -- the endpoints --------------------------------------------------------------

    def _auth(self) -> None:
        read = self._read(schemas.AUTH_REQUEST)
        if read is None:
            return
        raw, value = read
        self._record(value)
        signature = self.headers.get("X-MEN-Signature")
        if not signature or not verify_signature(value["pubkey"], raw, signature):
            self._violation("X-MEN-Signature missing or does not verify with pubkey")
            return
        identity = json.loads(value["id_data"])
        if not isinstance(identity, dict):
            self._violation("id_data is not a JSON object")
            return
        self.mender.identities.append(identity)
        if self.mender.script.refuse_auth > 0:
            self.mender.script.refuse_auth -= 1
            self._error(401, "device unauthorized")
            return
        token = _jwt()
        self.mender.tokens.add(token)
        self._answer(200, token.encode(), "application/jwt")

    def _next_v2(self) -> None:
        if not self.mender.script.has_v2:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._record(None)
            self._error(404, "not found")
            return
        read = self._read(schemas.NEXT_V2_REQUEST)
        if read is None:
            return
        self._record(read[1])
        if self._authorized():
            self._offer(read[1]["device_provides"]["device_type"])

    def _next_v1(self) -> None:
        if self._read(None) is None:
            return
        self._record(None)
        query = parse_qs(urlsplit(self.path).query)
        if sorted(query) != ["artifact_name", "device_type"]:
            self._violation(f"query {sorted(query)}, expected artifact_name and device_type")
            return
        if self._authorized():
            self._offer(query["device_type"][0])

    def _offer(self, device_type: str) -> None:
        script = self.mender.script
        if script.fail_next:
            self._error(script.fail_next.popleft(), "injected failure")
            return
        with self.mender.lock:
            offer = script.offers[0] if script.offers else None
        if offer is None or device_type not in offer.device_types:
            self._answer(204)
            return
        host = self.headers["Host"]
        base = offer.url or f"http://{host}{ARTIFACTS}{offer.id}"
        uri = f"{base}?X-Amz-Expires=86400&X-Amz-Signature={secrets.token_hex(16)}"
        self.mender.handed_out.append((offer.id, uri))
        value = {
            "id": offer.id,
            "artifact": {
                "artifact_name": offer.artifact_name,
                "source": {"uri": uri, "expire": "2030-01-01T00:00:00Z"},
                "device_types_compatible": list(offer.device_types),
            },
        }  # fmt: skip
        assert not schemas.problems(value, schemas.DEPLOYMENT_INSTRUCTIONS)
        self.mender.offered[offer.id] = offer
        self._answer(200, json.dumps(value).encode())

    def _artifact(self, deployment_id: str) -> None:
        self._record(None)
        offer = self.mender.offered.get(deployment_id)
        if offer is None or offer.artifact is None:
            self._answer(404)
            return
        data = offer.artifact.read_bytes()
        self._answer(200, data, "application/octet-stream")

    def _status(self, deployment_id: str) -> None:
        read = self._read(schemas.DEPLOYMENT_STATUS)
        if read is None:
            return
        self._record(read[1])
        if not self._authorized():
            return
        script = self.mender.script
        if script.hold_status is not None and not script.hold_status.wait(60):
            self._error(503, "held too long")
            return
        if script.fail_status:
            self._error(script.fail_status.popleft(), "injected failure")
            return
        if deployment_id in script.aborted:
            self.mender.end(deployment_id)
            self._answer(409)
            return
        self.mender.statuses.append((deployment_id, read[1]["status"]))
        if read[1]["status"] in FINAL:
            self.mender.end(deployment_id)
        self._answer(204)

    def _log(self, deployment_id: str) -> None:
        read = self._read(schemas.DEPLOYMENT_LOG)
        if read is None:
            return
        self._record(read[1])
        if self._authorized():
            self.mender.logs[deployment_id] = read[1]["messages"]
            self._answer(204)

    def _inventory(self) -> None:
        read = self._read(schemas.ATTRIBUTES)
        if read is None:
            return
        self._record(read[1])
        if self._authorized():
            self.mender.inventory.update({a["name"]: a["value"] for a in read[1]})
            self._answer(200)
