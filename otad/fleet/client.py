"""HTTP plumbing for the Mender device API: one session, the JWT, and the server's errors.

Every request goes through `Client.send`, which names the answers its caller expects;
anything else becomes a ServerError carrying the status and the server's own error text
(the `error` and `request_id` of the Error object every Mender device API returns).
401 becomes Unauthorized, so that callers can authenticate again; a connection that
cannot be made or times out becomes ServerUnreachable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from otad.errors import OtadError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0  # seconds
READ_TIMEOUT = 60.0  # seconds
MAX_REPLY_SIZE = 1 << 20  # bytes; the device API answers with small JSON documents


class ServerError(OtadError):
    """The server answered `status`, which the request did not expect (None: no answer)."""

    def __init__(self, method: str, path: str, status: int | None, detail: str) -> None:
        shown = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{method} {path}: {shown}: {detail}")
        self.method = method
        self.path = path
        self.status = status
        self.detail = detail


class ServerUnreachable(ServerError):
    """No connection could be made, or the server did not answer in time."""

    def __init__(self, method: str, path: str, detail: str) -> None:
        super().__init__(method, path, None, detail)


class Unauthorized(ServerError):
    """401: the token expired or was revoked, or (for auth_requests) the device is not
    accepted yet."""


class BadReply(ServerError):
    """The server answered with a status it may use, but with a body the API does not allow."""


@dataclass(frozen=True)
class Reply:
    method: str
    path: str
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        """The body as JSON; BadReply when it is not."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadReply(self.method, self.path, self.status, f"not JSON: {error}") from None


def _detail(response: requests.Response) -> str:
    """The server's error text: Mender's Error object when there is one."""
    try:
        value = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return text[0][:200] if text else response.reason or "no detail"
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        request_id = value.get("request_id")
        error: str = value["error"]
        return error + (f" (request {request_id})" if request_id else "")
    return response.reason or "no detail"


class Client:
    """Sends requests to one Mender server; holds the device's JWT once it has one."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_bundle: Path | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        if ca_bundle is not None:
            self.session.verify = str(ca_bundle)
        self.token: str | None = None

    def close(self) -> None:
        self.session.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        expect: Collection[int],
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        authorized: bool = True,
    ) -> Reply:
        """Send one request; the Reply when its status is in `expect`, else ServerError."""
        sent = {"Accept": "application/json"}
        if body is not None:
            sent["Content-Type"] = "application/json"
        if authorized:
            if self.token is None:
                raise Unauthorized(method, path, None, "no token: the device must authenticate")
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        log.debug("%s %s", method, path)
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                data=body,
                params=params,
                headers=sent,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as error:
            raise ServerUnreachable(method, path, f"TLS failed: {error}") from error
        except (requests.ConnectionError, requests.Timeout) as error:
            raise ServerUnreachable(method, path, str(error) or type(error).__name__) from error
        except requests.RequestException as error:
            raise ServerError(method, path, None, str(error)) from error
        return self._check(method, path, response, expect)

    def _check(
        self,
        method: str,
        path: str,
        response: requests.Response,
        expect: Collection[int],
    ) -> Reply:
        status = response.status_code
        log.debug("%s %s: %d", method, path, status)
        content = response.content
        if len(content) > MAX_REPLY_SIZE:
            raise BadReply(method, path, status, f"answer longer than {MAX_REPLY_SIZE} bytes")
        if status in expect:
            kind = response.headers.get("Content-Type", "")
            return Reply(method, path, status, kind.split(";")[0].strip().lower(), content)
        if status == 401:
            self.token = None
            raise Unauthorized(method, path, status, _detail(response))
        raise ServerError(method, path, status, _detail(response))
