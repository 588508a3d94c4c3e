"""Downloading an artifact over HTTPS as a stream that the artifact reader verifies.

`HttpSource` is a `Readable`: the engine installs straight from it, and nothing is
stored on the device first. What makes an artifact trusted is its signature, which the
reader checks; TLS keeps the transfer private and makes sure the device talks to the
right server. When the connection drops, stalls or ends early, the source asks again
with a Range request from the byte it had reached, and checks that the server still
serves the same artifact (same ETag, Last-Modified and length, a Content-Range that
starts where it asked). The reader above it sees one unbroken stream and goes on
verifying it; it never learns that the connection was replaced.

Resuming after a restart or a power cut, from what the slot already holds, is
otad.splice's work (and otad.resume's, which keeps the record).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import CertificateError

from otad.errors import (
    Cancelled,
    ConfigError,
    OtadError,
    UsageError,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# Bytes asked of the connection at a time: urllib3 1.26 waits for all it is asked for,
# and a failure loses what had arrived of that request.
_READ_SIZE = 1 << 16
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

Sleep = Callable[[float], object]
T = TypeVar("T")


# -- errors ------------------------------------------------------------------------
# They live beside the transport that raises them; their messages show the URL as
# shown_url does, without its query (which may carry a pre-signed token).


class DownloadError(OtadError):
    """The artifact could not be downloaded: the network or the server failed."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"download of {shown_url(url)}: {problem}")
        self.url = url
        self.problem = problem


class UntrustedServer(DownloadError):
    """TLS verification failed: unknown CA, wrong host name or a certificate not pinned."""


class ArtifactChanged(DownloadError):
    """On a resume the server served another artifact than the one the download began with."""


class ResumeRefused(DownloadError):
    """The server answered a Range request with something other than the range asked for."""


class Overlong(DownloadError):
    """The server sent more bytes than it announced, or than the caller expected."""


def shown_url(url: str) -> str:
    """`url` without its query and credentials, which pre-signed URLs use as secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


# -- settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadSettings:
    """The [download] table of otad.conf: whom to trust, how long to wait, how often to retry.

    TLS is always verified: against the system's CAs, or only `ca_bundle`'s, or against
    `pinned_sha256` (the SHA-256 of the server certificate's DER form). A pin alone
    trusts exactly that certificate, so a self-signed one works, and host names are not
    compared; with `ca_bundle` as well, the chain must also verify. `client_cert` (and
    `client_key`, unless the certificate's file holds it) identify the device to a
    server that asks. Plain http is refused unless `allow_http` is set, and then only
    the artifact's signature protects the device: anyone on the path can read the
    artifact, and can stop or corrupt the transfer.

    `retries` bounds the failed attempts in a row (an attempt that delivers data resets
    the count); `retry_time` bounds the seconds spent waiting between attempts over the
    whole download, which also bounds how often a server that keeps dropping the
    connection is asked again. Times are in seconds.

    `resume_attempts` bounds how often the daemon, when it starts and finds an install
    from a URL that a restart or a power cut interrupted, resumes it by itself without
    the install getting further (0: never by itself; an Install of the same URL still
    resumes).
    """

    ca_bundle: Path | None = None
    pinned_sha256: str | None = None  # 64 lower-case hex digits
    client_cert: Path | None = None
    client_key: Path | None = None
    allow_http: bool = False
    retries: int = 8
    retry_time: float = 600.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    resume_attempts: int = 3
    first_backoff: float = 1.0  # not in otad.conf: doubles after each failure in a row
    max_backoff: float = 60.0  # not in otad.conf


_KEYS = {
    "ca_bundle",
    "pinned_sha256",
    "client_cert",
    "client_key",
    "allow_http",
    "retries",
    "retry_time",
    "connect_timeout",
    "read_timeout",
    "resume_attempts",
}


def _value(table: Mapping[str, Any], key: str, kinds: tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool) is not (bool in kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise ConfigError(f"{where}.{key}", f"must be a {names}, found {value!r}")
    return value


def _path(table: Mapping[str, Any], key: str, where: str) -> Path | None:
    text = _value(table, key, (str,), where)
    if text is None:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(f"{where}.{key}", f"must be an absolute path, found {text!r}")
    return path


def _seconds(table: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = _value(table, key, (int, float), where)
    if value is None:
        return default
    if not 0 < value <= 86400:
        raise ConfigError(f"{where}.{key}", f"must be between 0 and 86400 seconds, found {value}")
    return float(value)


def parse_pin(text: str, key: str = "download.pinned_sha256") -> str:
    """A certificate's SHA-256 as hex, colons allowed (as `openssl x509 -fingerprint` prints)."""
    digits = text.replace(":", "").strip().lower()
    if len(digits) != 64 or any(digit not in "0123456789abcdef" for digit in digits):
        raise ConfigError(key, f"must be the 64 hex digits of a SHA-256, found {text!r}")
    return digits


def parse_download_settings(table: Mapping[str, Any], where: str = "download") -> DownloadSettings:
    """Read the [download] table; ConfigError names the offending key."""
    for key in table:
        if key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{where}.{key}", f"is not a known setting (known: {known})")
    pin = _value(table, "pinned_sha256", (str,), where)
    client_cert = _path(table, "client_cert", where)
    client_key = _path(table, "client_key", where)
    if client_key is not None and client_cert is None:
        raise ConfigError(f"{where}.client_key", "needs client_cert as well")
    retries = _value(table, "retries", (int,), where)
    if retries is not None and not 0 <= retries <= 1000:
        raise ConfigError(f"{where}.retries", f"must be between 0 and 1000, found {retries}")
    resume_attempts = _value(table, "resume_attempts", (int,), where)
    if resume_attempts is not None and not 0 <= resume_attempts <= 100:
        raise ConfigError(
            f"{where}.resume_attempts", f"must be between 0 and 100, found {resume_attempts}"
        )
    defaults = DownloadSettings()
    return DownloadSettings(
        ca_bundle=_path(table, "ca_bundle", where),
        pinned_sha256=parse_pin(pin, f"{where}.pinned_sha256") if pin is not None else None,
        client_cert=client_cert,
        client_key=client_key,
        allow_http=_value(table, "allow_http", (bool,), where) or False,
        retries=defaults.retries if retries is None else retries,
        retry_time=_seconds(table, "retry_time", where, defaults.retry_time),
        connect_timeout=_seconds(table, "connect_timeout", where, defaults.connect_timeout),
        read_timeout=_seconds(table, "read_timeout", where, defaults.read_timeout),
        resume_attempts=defaults.resume_attempts if resume_attempts is None else resume_attempts,
    )


def check_url(url: str, settings: DownloadSettings) -> None:
    """UsageError unless `url` is https (or http, when the settings allow it)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and settings.allow_http):
        return
    if scheme == "http":
        raise UsageError(
            f"{shown_url(url)}: plain http is refused; use https, or set download.allow_http"
        )
    raise UsageError(f"{shown_url(url)}: only https URLs can be downloaded")


# -- the HTTP session --------------------------------------------------------------


class _PinningAdapter(HTTPAdapter):
    """Passes urllib3's `assert_fingerprint` to every pool, direct or through a proxy.

    urllib3 checks it right after each TLS handshake, so every connection is checked,
    resumes included.
    """

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["assert_fingerprint"] = self._fingerprint
        # typeshed leaves HTTPAdapter's pool hooks unannotated.
        super().init_poolmanager(  # type: ignore[no-untyped-call]
            connections, maxsize, block, **pool_kwargs
        )

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.ProxyManager:
        proxy_kwargs["assert_fingerprint"] = self._fingerprint
        manager: urllib3.ProxyManager = super().proxy_manager_for(  # type: ignore[no-untyped-call]
            proxy, **proxy_kwargs
        )
        return manager


def _check_files(settings: DownloadSettings) -> None:
    for key in ("ca_bundle", "client_cert", "client_key"):
        path = getattr(settings, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"download.{key}", f"names {path}, which is not a readable file")


def make_session(settings: DownloadSettings) -> requests.Session:
    """A requests session that verifies TLS as the settings say; proxies come from the
    environment (trust_env), as requests does by default."""
    _check_files(settings)
    session = requests.Session()
    if settings.pinned_sha256 is not None:
        session.mount("https://", _PinningAdapter(settings.pinned_sha256))
    if settings.ca_bundle is not None:
        session.verify = str(settings.ca_bundle)
    elif settings.pinned_sha256 is not None:
        # The pin is the trust anchor: urllib3 compares it after every handshake.
        session.verify = False
    if settings.client_cert is not None:
        cert = str(settings.client_cert)
        key = settings.client_key
        session.cert = (cert, str(key)) if key is not None else cert
    return session


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps (args, urllib3's `reason`, chained exceptions), bounded."""
    found: list[BaseException] = []
    pending = [error]
    while pending and len(found) < 32:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        nested = [*current.args, getattr(current, "reason", None)]
        nested += [current.__cause__, current.__context__]
        pending += [item for item in nested if isinstance(item, BaseException)]
    return found


def _is_verification_failure(error: BaseException) -> bool:
    for cause in _causes(error):
        if isinstance(cause, (ssl.SSLCertVerificationError, CertificateError)):
            return True
        if "Fingerprints did not match" in str(cause):
            return True
    return False


# -- the source --------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactIdentity:
    """What tells one artifact on the server from another, from the first response."""

    size: int | None
    etag: str | None
    last_modified: str | None

    def differences(self, other: ArtifactIdentity) -> list[str]:
        names = ("size", "etag", "last_modified")
        return [
            f"{name} {getattr(self, name)!r} became {getattr(other, name)!r}"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]


class _Retry(Exception):
    """An attempt failed in a way that asking again may cure."""


def _content_range(text: str | None) -> tuple[int, int, int | None] | None:
    """`bytes FIRST-LAST/TOTAL` as numbers (TOTAL None for `*`); None if malformed."""
    if text is None or not text.startswith("bytes "):
        return None
    span, _, total = text[len("bytes ") :].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last), None if total == "*" else int(total)
    except ValueError:
        return None


class HttpSource:
    """A Readable over an artifact at an https URL that resumes where a connection broke.

    `expected_size`, when the caller knows it (a fleet server announces it), must match
    what the server announces, and bounds a response that announces no length. The
    source is read from one thread at a time; `cancel` stops it at the next read or
    during a wait between attempts. `sleep` is for tests.
    """

    def __init__(
        self,
        url: str,
        settings: DownloadSettings,
        *,
        expected_size: int | None = None,
        cancel: threading.Event | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        check_url(url, settings)
        self.url = url
        self.settings = settings
        self._expected_size = expected_size
        self._cancel = cancel
        self._sleep = sleep or (cancel.wait if cancel is not None else time.sleep)
        self._session = make_session(settings)
        self._response: requests.Response | None = None
        self._response_end: int | None = None  # where a bounded response ends
        self._first_end: int | None = None
        self._identity: ArtifactIdentity | None = None
        self._position = 0
        self._failures = 0
        self._waited = 0.0
        self.requests = 0  # requests sent, redirects included
        self.retries = 0  # attempts made again after a failure
        self.received = 0  # body bytes received over the network

    # -- what callers see -------------------------------------------------------------

    @property
    def position(self) -> int:
        """The offset in the artifact of the next byte `readinto` returns."""
        return self._position

    @property
    def identity(self) -> ArtifactIdentity:
        """The artifact's validators; sends the first request if none was sent yet."""
        if self._identity is None:
            self._attempt(self._open)
        assert self._identity is not None
        return self._identity

    @property
    def size(self) -> int | None:
        """The artifact's length, once known (from the server or the caller)."""
        if self._identity is not None and self._identity.size is not None:
            return self._identity.size
        return self._expected_size

    def readinto(self, buffer: memoryview, /) -> int:
        if not len(buffer):
            return 0
        return self._attempt(lambda: self._read(buffer))

    def another(self) -> HttpSource:
        """A source of its own for the same URL and settings, expecting the same size."""
        return HttpSource(
            self.url,
            self.settings,
            expected_size=self.size,
            cancel=self._cancel,
            sleep=self._sleep,
        )

    def end_first_request_at(self, offset: int) -> None:
        """Ask only for the bytes before `offset` in the first request; call before reading.

        For a resume from the slot: the header before the image is downloaded again,
        and the image itself only from where the slot stops. Reading past `offset`
        works as usual, with a request for the rest.
        """
        if self.requests:
            raise UsageError("the first request was already sent")
        self._first_end = offset if offset > 0 else None

    def skip_to(self, offset: int) -> None:
        """Go on at `offset` (not before the current position) with a new Range request."""
        if offset < self._position:
            raise UsageError(f"cannot go back from byte {self._position} to {offset}")
        if offset == self._position:
            return
        self._drop()
        self._position = offset

    def close(self) -> None:
        self._drop()
        self._session.close()

    def __enter__(self) -> HttpSource:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- attempts and retries ---------------------------------------------------------

    def _attempt(self, step: Callable[[], T]) -> T:
        while True:
            if self._cancel is not None and self._cancel.is_set():
                self._drop()
                raise Cancelled("the download was cancelled")
            try:
                return step()
            except _Retry as failure:
                self._drop()
                self._wait_before_retry(str(failure))

    def _wait_before_retry(self, problem: str) -> None:
        settings = self.settings
        self._failures += 1
        if self._failures > settings.retries:
            raise DownloadError(
                self.url, f"{problem}; gave up after {self._failures} failed attempts in a row"
            )
        delay = min(settings.first_backoff * 2 ** (self._failures - 1), settings.max_backoff)
        if self._waited + delay > settings.retry_time:
            raise DownloadError(
                self.url,
                f"{problem}; gave up, having waited {self._waited:g} s of the "
                f"{settings.retry_time:g} s allowed between attempts",
            )
        log.info(
            "download of %s: %s at byte %d; trying again in %g s (%d of %d)",
            shown_url(self.url),
            problem,
            self._position,
            delay,
            self._failures,
            settings.retries,
        )
        self._sleep(delay)
        self._waited += delay
        self.retries += 1

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        self._response_end = None

    # -- reading ----------------------------------------------------------------------

    def _read(self, buffer: memoryview) -> int:
        if self._response_end is not None and self._position >= self._response_end:
            self._drop()  # a bounded response is used up: ask for the rest
        size = self.size
        if self._response is None and size is not None and self._position == size:
            return 0
        response = self._response or self._open()
        limit = min(len(buffer), _READ_SIZE)
        if self._response_end is not None:
            limit = min(limit, self._response_end - self._position)
        if size is not None:
            if self._position > size:
                raise Overlong(self.url, f"the server sent more than {size} bytes")
            limit = min(limit, size - self._position)
        try:
            data = response.raw.read(max(limit, 1), decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _Retry(f"connection lost ({error.__class__.__name__})") from error
        if size is not None and limit == 0:
            if data:
                raise Overlong(
                    self.url, f"the server sends more than the {size} bytes of the artifact"
                )
            return 0
        count = len(data)
        buffer[:count] = data
        self._position += count
        self.received += count
        if count:
            self._failures = 0
            return count
        if size is None or self._position == size:
            return 0
        raise _Retry(f"the response ended early, {size - self._position} bytes short")

    def _open(self) -> requests.Response:
        """Send the request for the bytes from the current position on."""
        headers = {"Accept-Encoding": "identity"}
        end = self._first_end if self._identity is None else None
        if end is not None and end <= self._position:
            end = None
        if end is not None:
            headers["Range"] = f"bytes={self._position}-{end - 1}"
        elif self._position:
            headers["Range"] = f"bytes={self._position}-"
            validator = self._if_range()
            if validator:
                headers["If-Range"] = validator
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(url, headers)
            if not response.is_redirect:
                self._accept(response, end)
                self._first_end = None
                self._response = response
                if response.status_code == 206 and end is not None:
                    self._response_end = min(end, self.size or end)
                return response
            location = urljoin(url, response.headers["Location"])
            response.close()
            check_url(location, self.settings)
            log.debug("%s redirects to %s", shown_url(url), shown_url(location))
            url = location
        raise DownloadError(self.url, f"more than {MAX_REDIRECTS} redirects")

    def _if_range(self) -> str | None:
        identity = self._identity
        if identity is None:
            return None
        if identity.etag and not identity.etag.startswith("W/"):
            return identity.etag
        return identity.last_modified

    def _send(self, url: str, headers: Mapping[str, str]) -> requests.Response:
        self.requests += 1
        timeout = (self.settings.connect_timeout, self.settings.read_timeout)
        try:
            # verify is passed again here: requests lets REQUESTS_CA_BUNDLE override a
            # session's verify, but not one given with the request.
            return self._session.get(
                url,
                headers=headers,
                stream=True,
                timeout=timeout,
                allow_redirects=False,
                verify=self._session.verify,
            )
        except requests.exceptions.SSLError as error:
            if _is_verification_failure(error):
                raise UntrustedServer(url, f"TLS verification failed: {_reason(error)}") from None
            raise _Retry(f"TLS connection failed: {_reason(error)}") from error
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
            raise _Retry(f"cannot connect: {_reason(error)}") from error

    def _accept(self, response: requests.Response, end: int | None = None) -> None:
        """Check the response's status and that it serves the same artifact; else close it.

        `end` is where a bounded request (the first of a resume) asked the range to end.
        """
        try:
            self._check_response(response, end)
        except BaseException:
            response.close()
            raise

    def _check_response(self, response: requests.Response, end: int | None) -> None:
        status = response.status_code
        if status in _RETRY_STATUSES:
            raise _Retry(f"the server answered {status} {response.reason}")
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity":
            raise DownloadError(self.url, f"the server sent the artifact {encoding}-encoded")
        identity = self._identity_of(response)
        if self._identity is None:
            self._first_identity(status, response, identity, end)
            return
        changes = self._identity.differences(identity)
        if changes:
            raise ArtifactChanged(
                self.url, f"the server now serves another artifact: {', '.join(changes)}"
            )
        if status == 200:
            raise ResumeRefused(
                self.url,
                f"the server answered a request for the bytes from {self._position} on "
                "with the whole artifact (200): it does not resume downloads",
            )
        if status != 206:
            raise DownloadError(self.url, f"the server answered {status} {response.reason}")
        self._check_content_range(response.headers.get("Content-Range"), end)

    def _first_identity(
        self,
        status: int,
        response: requests.Response,
        identity: ArtifactIdentity,
        end: int | None,
    ) -> None:
        # A bounded first request may get the whole artifact from a server that does not
        # serve ranges: that is a plain start.
        bounded = end is not None and not self._position and status == 206
        if status != (206 if self._position or bounded else 200):
            raise DownloadError(self.url, f"the server answered {status} {response.reason}")
        expected = self._expected_size
        if expected is not None and identity.size is not None and identity.size != expected:
            kind = Overlong if identity.size > expected else DownloadError
            raise kind(
                self.url, f"the server announces {identity.size} bytes, {expected} were expected"
            )
        self._identity = identity
        if self._position or bounded:
            self._check_content_range(response.headers.get("Content-Range"), end)

    def _identity_of(self, response: requests.Response) -> ArtifactIdentity:
        headers = response.headers
        size: int | None = None
        if response.status_code == 206:
            parsed = _content_range(headers.get("Content-Range"))
            size = parsed[2] if parsed else None
        elif response.status_code == 200 and "Content-Length" in headers:
            try:
                size = int(headers["Content-Length"])
            except ValueError:
                raise DownloadError(
                    self.url, f"Content-Length {headers['Content-Length']!r} is not a number"
                ) from None
        return ArtifactIdentity(size, headers.get("ETag"), headers.get("Last-Modified"))

    def _check_content_range(self, text: str | None, end: int | None = None) -> None:
        parsed = _content_range(text)
        size = self.size
        if parsed is None or parsed[0] != self._position:
            raise ResumeRefused(
                self.url,
                f"asked for the bytes from {self._position} on, "
                f"the server sent Content-Range {text!r}",
            )
        last = size - 1 if size is not None else None
        if end is not None and (last is None or end - 1 < last):
            last = end - 1
        if last is not None and parsed[1] != last:
            raise ResumeRefused(
                self.url, f"asked for the bytes up to {last}, the server sent {text!r}"
            )


def _reason(error: BaseException) -> str:
    """The innermost message of a requests/urllib3 error, which says what happened."""
    return str(_causes(error)[-1]) or error.__class__.__name__
