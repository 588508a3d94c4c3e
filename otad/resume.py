"""Resuming an install from a URL after a restart of the daemon or a power cut.

While the engine installs from an https URL it keeps a resume record beside its state
record: `download.json` in the data directory, replaced atomically as the state record
is, and readable by root only (a pre-signed URL carries a secret in its query). It says
what is being downloaded and how far the slot got:

    url, target               where the artifact comes from, which slot it goes to
    artifact, manifest_sha256 which signed artifact: its name and the SHA-256 of its
                              manifest, which covers the header and its chunk index
    size, etag, last_modified the server's validators, from its first response
    allow_downgrade           the install's option, for a resume by the daemon itself
    artifact_offset           where the image starts in the artifact
    verified                  bytes of the image, from its start, that were checked
                              against the signed chunk index before they were written
                              and that an fsync of the slot has made durable; saved at
                              each fsync watermark of the slot writer, no more often
    attempts                  automatic resumes in a row that got no further
    failed                    the install ended with the network giving up, and its
                              client was told: the daemon does not resume it by
                              itself, an install of the same URL does
    deployment                the Mender deployment the install is for (otad.fleet),
                              null for one a client asked for: the daemon does not
                              resume a deployment's install by itself, the fleet
                              client installs the deployment again when the server
                              hands it out again, with a fresh pre-signed URL
    digest                    SHA-256 of all the above: a damaged record is not used

The next install of the same URL into the same slot (asked for by a client, or started
by the daemon itself when it starts, see `otad.updater`) downloads the header again with
a Range request that stops where the image begins, verifies the signature as always,
and resumes only if everything matches: the URL (scheme, host and path: pre-signed URLs
change their query), the slot, the manifest's digest and the validators. The slot's
chunks are then not trusted because the record says they were written: `resume_point()`
reads them back and hashes them against the signed chunk index, and the artifact reader
checks them once more, with the whole-file SHA-256, as `SplicedSource` feeds them
through. The record must be right for a resume to save anything, never for it to be
safe. When the slot holds fewer verified bytes than the record says were made durable,
something else wrote to the slot, and the install starts over. Any difference starts
over from byte 0, with a log line saying what differed; starting over still skips the
blocks the slot already holds.

Success, a cancel and any failure other than the network giving up or the daemon
stopping (`Interrupted`) clear the record. The daemon resumes by itself only what a
restart, a power cut or its own stop cut short; an install that failed and said so (the
network gave up) keeps its record, marked `failed`, for the next install of its URL. An
artifact whose data member is compressed, or that has no chunk index, cannot be resumed
and keeps no record.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otad.bootloader.base import Slot
from otad.errors import Cancelled, StateCorrupt, UsageError
from otad.state import sync_directory, write_atomically

if TYPE_CHECKING:
    from otad.artifact.reader import ArtifactHeader, PayloadFile
    from otad.download import HttpSource, ResumePoint, SplicedSource

log = logging.getLogger(__name__)

FORMAT = 1
RECORD_NAME = "download.json"
_TEXT_FIELDS = ("url", "artifact", "manifest_sha256")
_OPTIONAL_TEXT_FIELDS = ("etag", "last_modified")
_COUNT_FIELDS = ("verified", "attempts")
_OPTIONAL_COUNT_FIELDS = ("size", "artifact_offset")


# TODO: move into otad.errors when its owner takes it, as otad.download's errors.
class Interrupted(Cancelled):
    """The install stopped because otad is stopping; it resumes when otad starts again."""


@dataclass(frozen=True)
class ResumeRecord:
    """What an install from a URL needs to resume; the fields are the module docstring's."""

    url: str
    target: Slot
    artifact: str
    manifest_sha256: str
    size: int | None
    etag: str | None
    last_modified: str | None
    allow_downgrade: bool | None = None
    artifact_offset: int | None = None
    verified: int = 0
    attempts: int = 0
    failed: bool = False
    deployment: str | None = None


def _body(record: ResumeRecord) -> dict[str, Any]:
    body = asdict(record)
    body["target"] = record.target.value
    body["format"] = FORMAT
    return body


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def serialize(record: ResumeRecord) -> bytes:
    body = _body(record)
    return json.dumps({**body, "digest": _digest(body)}, indent=1, sort_keys=True).encode() + b"\n"


def _check_types(value: dict[str, Any]) -> None:
    for name in _TEXT_FIELDS:
        if not isinstance(value[name], str):
            raise TypeError(name)
    for name in _OPTIONAL_TEXT_FIELDS:
        if value[name] is not None and not isinstance(value[name], str):
            raise TypeError(name)
    for name in (*_COUNT_FIELDS, *_OPTIONAL_COUNT_FIELDS):
        count = value[name]
        if count is None and name in _OPTIONAL_COUNT_FIELDS:
            continue
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise TypeError(name)
    if value["allow_downgrade"] not in (None, True, False):
        raise TypeError("allow_downgrade")
    if not isinstance(value["failed"], bool):
        raise TypeError("failed")
    # Absent from the records of otad before the fleet client: an install a client asked for.
    if value.get("deployment") is not None and not isinstance(value["deployment"], str):
        raise TypeError("deployment")


def parse(data: bytes, source: str) -> ResumeRecord:
    """Parse a resume record; StateCorrupt for anything that is not an intact one."""
    try:
        value = json.loads(data)
        if not isinstance(value, dict):
            raise TypeError("not an object")
        digest = value.pop("digest", None)
        if value.get("format") != FORMAT:
            raise StateCorrupt(f"{source}: format {value.get('format')!r}, expected {FORMAT}")
        if digest != _digest(value):
            raise StateCorrupt(f"{source}: its digest does not match its content")
        _check_types(value)
        fields = {key: item for key, item in value.items() if key != "format"}
        fields["target"] = Slot(fields["target"])
        return ResumeRecord(**fields)
    except StateCorrupt:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise StateCorrupt(f"{source} is not a valid resume record: {error!r}") from None


class ResumeStore:
    """Loads, atomically saves and clears the resume record in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / RECORD_NAME

    def load(self) -> ResumeRecord | None:
        """The record, or None if there is none; StateCorrupt if it is damaged."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return parse(data, str(self.path))

    def load_or_discard(self) -> ResumeRecord | None:
        """The record; a damaged one is cleared, with a log line, and None returned."""
        try:
            return self.load()
        except StateCorrupt as error:
            log.warning("%s; the install will not resume and starts over", error)
            self.clear("it was damaged")
            return None

    def save(self, record: ResumeRecord) -> None:
        write_atomically(self.path, serialize(record), 0o600)
        log.debug(
            "resume record saved: %d bytes of the image verified in slot %s",
            record.verified,
            record.target.value,
        )

    def clear(self, why: str) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        sync_directory(self.path.parent)
        log.info("resume record cleared: %s", why)


def manifest_digest(header: ArtifactHeader) -> str:
    """The SHA-256 of the artifact's signed manifest, in its canonical form."""
    return hashlib.sha256(header.manifest.serialize()).hexdigest()


def is_resumable(error: BaseException) -> bool:
    """True when an install that failed with `error` is worth resuming later."""
    from otad.download import (
        ArtifactChanged,
        DownloadError,
        Overlong,
        ResumeRefused,
        UntrustedServer,
    )

    if isinstance(error, Interrupted):
        return True
    final = (UntrustedServer, ArtifactChanged, ResumeRefused, Overlong)
    return isinstance(error, DownloadError) and not isinstance(error, final)


class DownloadResume:
    """The resume side of one install from a URL into `device`, the target `slot`.

    The engine reads the artifact from `source`; once the header verified it calls
    `begin()`, then `payload_started()` and `progress()` while it writes, and `end()`.
    """

    def __init__(
        self,
        store: ResumeStore,
        http: HttpSource,
        slot: Slot,
        device: Path,
        allow_downgrade: bool | None,
        deployment: str | None = None,
    ) -> None:
        from otad.download import SplicedSource

        self._deployment = deployment
        self._store = store
        self.http = http
        self._slot = slot
        self._device = device
        self._allow_downgrade = allow_downgrade
        self._record: ResumeRecord | None = None
        self._point: ResumePoint | None = None
        self.source: SplicedSource = SplicedSource(http, device)
        self._previous = store.load_or_discard()
        previous = self._previous
        if previous is not None and previous.artifact_offset and self._is_same_place(previous):
            http.end_first_request_at(previous.artifact_offset)

    @property
    def resumed_at(self) -> int | None:
        """The byte of the image the download resumed at, None if it started over."""
        return self._point.prefix if self._point is not None else None

    def _is_same_place(self, record: ResumeRecord) -> bool:
        from otad.download import shown_url

        return shown_url(record.url) == shown_url(self.http.url) and record.target is self._slot

    def begin(self, header: ArtifactHeader) -> None:
        """Resume from the slot if the record allows it, else start over; save the record."""
        identity = self.http.identity
        record = ResumeRecord(
            url=self.http.url,
            target=self._slot,
            artifact=header.name,
            manifest_sha256=manifest_digest(header),
            size=identity.size,
            etag=identity.etag,
            last_modified=identity.last_modified,
            allow_downgrade=self._allow_downgrade,
            deployment=self._deployment,
        )
        previous = self._previous
        if previous is not None and self._is_same_place(previous):
            # Kept even when starting over: it bounds automatic resumes that keep failing.
            record = replace(record, attempts=previous.attempts)
        point = self._resume_point(record, header)
        if point is not None:
            record = replace(record, artifact_offset=point.artifact_offset, verified=point.prefix)
            self._point = point
            log.info(
                "resuming the download of %s at byte %d: slot %s holds %d of %d bytes "
                "of the image, verified against the signed chunk index",
                self._shown_url,
                point.resume_at,
                self._slot.value,
                point.prefix,
                point.size,
            )
        self._record = record
        self._store.save(record)

    @property
    def _shown_url(self) -> str:
        from otad.download import shown_url

        return shown_url(self.http.url)

    def _resume_point(self, record: ResumeRecord, header: ArtifactHeader) -> ResumePoint | None:
        from otad.download import resume_point

        previous = self._previous
        if previous is None:
            return None
        chunk_index = header.payloads[0].chunk_index
        why = self._differences(previous, record)
        if not why and chunk_index is None:
            why = ["the artifact has no chunk index"]
        if not why and previous.artifact_offset is None:
            why = ["the last attempt ended before the image began"]
        if why:
            self._start_over("; ".join(why))
            return None
        point = resume_point(self._device, chunk_index, previous.artifact_offset)
        if point is None:
            return None
        if point.prefix < previous.verified:
            self._start_over(
                f"slot {self._slot.value} holds {point.prefix} verified bytes of the image "
                f"where {previous.verified} were recorded as written: it was changed since"
            )
            return None
        # TODO: read the slot's prefix once rather than three times (counted here, fed
        # through the reader, compared by the slot writer) when resuming large images on
        # slow media takes too long; the reader then needs a seeded whole-file digest
        # (ResumePoint.prefix_sha256) and must skip the prefix's chunk checks.
        try:
            self.source.splice(point)
        except UsageError as error:
            self._start_over(f"the recorded place of the image does not fit: {error}")
            return None
        return point

    def _start_over(self, why: str) -> None:
        log.warning("not resuming the download of %s: %s; starting over", self._shown_url, why)

    def _differences(self, previous: ResumeRecord, record: ResumeRecord) -> list[str]:
        from otad.download import shown_url

        found = []
        if shown_url(previous.url) != shown_url(record.url):
            found.append(f"the last download was of {shown_url(previous.url)}")
        if previous.target is not record.target:
            found.append(f"the last download went to slot {previous.target.value}")
        if (previous.artifact, previous.manifest_sha256) != (
            record.artifact,
            record.manifest_sha256,
        ):
            found.append(
                f"the server now serves {record.artifact} (manifest "
                f"{record.manifest_sha256[:16]}), the last download was {previous.artifact} "
                f"({previous.manifest_sha256[:16]})"
            )
        for name in ("size", "etag", "last_modified"):
            old, new = getattr(previous, name), getattr(record, name)
            if old != new:
                found.append(f"the server's {name} {old!r} became {new!r}")
        return found

    def payload_started(self, payload_file: PayloadFile) -> None:
        """Record where the image starts, or drop the record if it cannot be resumed."""
        record = self._record
        if record is None:
            return
        offset = payload_file.artifact_offset
        if offset is None or payload_file.chunk_index is None:
            self._record = None
            self._store.clear("the image is compressed or has no chunk index: no resume")
            return
        point = self._point
        if point is not None and offset != point.artifact_offset:
            raise StateCorrupt(
                f"{self._store.path} places the image at byte {point.artifact_offset} "
                f"of the artifact, where it starts at {offset}"
            )
        if record.artifact_offset is None:
            self._record = replace(record, artifact_offset=offset)
            self._store.save(self._record)

    def progress(self, synced: int) -> None:
        """Note that the slot's first `synced` bytes are verified and durable."""
        record = self._record
        if record is None or record.artifact_offset is None or synced <= record.verified:
            return
        self._record = replace(record, verified=synced, attempts=0)
        self._store.save(self._record)

    def end(self, error: BaseException | None) -> None:
        """Keep the record when `error` leaves something worth resuming, else clear it."""
        self.source.close()
        record = self._record
        if record is None and error is not None:
            # Ended before the header was checked: the last record still describes the slot.
            previous = self._previous
            record = previous if previous is not None and self._is_same_place(previous) else None
            if record is None or not is_resumable(error):
                return
        if record is None:
            return
        if error is not None and is_resumable(error):
            log.info(
                "the download of %s can resume: %d bytes of the image are in slot %s",
                self._shown_url,
                record.verified,
                self._slot.value,
            )
            if not isinstance(error, Interrupted) and not record.failed:
                self._store.save(replace(record, failed=True))
            return
        if error is None:
            self._store.clear("the install completed")
        else:
            self._store.clear(f"the install failed: {error}")


def count_attempt(store: ResumeStore, record: ResumeRecord) -> ResumeRecord:
    """Record one more automatic resume of `record` (durably, before it starts)."""
    counted = replace(record, attempts=record.attempts + 1)
    store.save(counted)
    return counted
