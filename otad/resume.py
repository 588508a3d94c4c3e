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
    artifact_offset           where the image starts in the artifact (uncompressed data)
    member_offset             where the data member starts in the artifact (compressed
                              data); null for an uncompressed one
    boundary_compressed,      the last gzip member, xz stream or zstd frame of the
    boundary_image            compressed data member that starts on a chunk boundary at
                              or before `verified`, with a chunk found once in the
                              image: its offset in the data member and the byte of the
                              image it starts with; null when none was passed yet or
                              the artifact has none (other tools write one member)
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
a Range request that stops where the image (or the compressed data member) begins,
verifies the signature as always, and resumes only if everything matches: the URL
(scheme, host and path: pre-signed URLs change their query), the slot, the manifest's
digest and the validators. The slot's chunks are then not trusted because the record
says they were written: `resume_point()` reads them back and hashes them against the
signed chunk index, and the artifact reader checks them once more as `SplicedSource`
feeds them through. The record must be right for a resume to save anything, never for
it to be safe. When the slot holds fewer verified bytes than the record says were made
durable, something else wrote to the slot, and the install starts over. Any difference
starts over from byte 0, with a log line saying what differed; starting over still
skips the blocks the slot already holds.

A compressed image resumes at the recorded boundary, spliced after decompression: the
reader gets the image's tar header, the slot's bytes up to `boundary_image`, then what
a fresh decoder makes of the data member from `boundary_compressed` on, downloaded with
a Range request from `member_offset + boundary_compressed` (`SplicedSource.open_data`).
The boundary is not signed and need not be: only members that start with a chunk found
once in the image are recorded (not one of zeros, which another member may start with
too), and before relying on one, `probe_member()` downloads what decoding one chunk from
it takes and checks that chunk against the signed index. So a boundary that passes is
the member it claims to be, and one that fails starts over from byte 0 rather than
failing the install. Every chunk is then checked by the reader as always. An artifact
whose compressed data has no such boundary (one member, as other tools write it)
starts over, saying so.

Success, a cancel and any failure other than the network giving up or the daemon
stopping (`Interrupted`) clear the record. The daemon resumes by itself only what a
restart, a power cut or its own stop cut short; an install that failed and said so (the
network gave up) keeps its record, marked `failed`, for the next install of its URL. An
artifact without a chunk index cannot be resumed and keeps no record.
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
    from otad.download import HttpSource
    from otad.splice import MemberResumePoint, ResumePoint, SplicedSource

log = logging.getLogger(__name__)

FORMAT = 1
RECORD_NAME = "download.json"
_TEXT_FIELDS = ("url", "artifact", "manifest_sha256")
_OPTIONAL_TEXT_FIELDS = ("etag", "last_modified")
_COUNT_FIELDS = ("verified", "attempts")
_OPTIONAL_COUNT_FIELDS = ("size", "artifact_offset")
# Absent from the records of otad before compressed images resumed: null.
_NEW_COUNT_FIELDS = ("member_offset", "boundary_compressed", "boundary_image")


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
    member_offset: int | None = None
    boundary_compressed: int | None = None
    boundary_image: int | None = None

    @property
    def image_offset(self) -> int | None:
        """Where the image or its compressed data member starts in the artifact."""
        return self.artifact_offset if self.member_offset is None else self.member_offset


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
    _check_boundary_types(value)


def _check_boundary_types(value: dict[str, Any]) -> None:
    for name in _NEW_COUNT_FIELDS:
        count = value.get(name)
        if count is not None and (
            not isinstance(count, int) or isinstance(count, bool) or count < 0
        ):
            raise TypeError(name)
    if (value.get("boundary_compressed") is None) != (value.get("boundary_image") is None):
        raise TypeError("boundary_compressed and boundary_image go together")


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
        from otad.splice import SplicedSource

        self._deployment = deployment
        self._store = store
        self.http = http
        self._slot = slot
        self._device = device
        self._allow_downgrade = allow_downgrade
        self._record: ResumeRecord | None = None
        self._point: ResumePoint | None = None
        self._file: PayloadFile | None = None
        self._unique: frozenset[bytes] = frozenset()  # chunk digests found once in the index
        self.source: SplicedSource = SplicedSource(http, device)
        self._previous = store.load_or_discard()
        previous = self._previous
        if previous is not None and previous.image_offset and self._is_same_place(previous):
            http.end_first_request_at(previous.image_offset)

    @property
    def resumed_at(self) -> int | None:
        """The byte of the image the download resumed at, None if it started over."""
        if self._point is not None:
            return self._point.prefix
        member = self.source.member_point
        return member.image_offset if member is not None else None

    def _is_same_place(self, record: ResumeRecord) -> bool:
        from otad.download import shown_url

        return shown_url(record.url) == shown_url(self.http.url) and record.target is self._slot

    def begin(self, header: ArtifactHeader) -> None:
        """Resume from the slot if the record allows it, else start over; save the record."""
        from otad.splice import MemberResumePoint

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
        if isinstance(point, MemberResumePoint):
            record = replace(
                record,
                member_offset=point.member_offset,
                verified=point.prefix,
                boundary_compressed=point.compressed,
                boundary_image=point.image_offset,
            )
            log.info(
                "resuming the download of %s at byte %d: slot %s holds %d bytes of the "
                "image, verified against the signed chunk index; the compressed data goes "
                "on with the member that starts at byte %d of the image",
                self._shown_url,
                point.resume_at,
                self._slot.value,
                point.prefix,
                point.image_offset,
            )
        elif point is not None:
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

    def _resume_point(
        self, record: ResumeRecord, header: ArtifactHeader
    ) -> ResumePoint | MemberResumePoint | None:
        from otad.splice import resume_point

        previous = self._previous
        if previous is None:
            return None
        chunk_index = header.payloads[0].chunk_index
        why = self._why_not(previous, record, chunk_index is not None)
        if why:
            self._start_over("; ".join(why))
            return None
        point = resume_point(self._device, chunk_index, previous.image_offset)
        if point is None:
            return None
        if point.prefix < previous.verified:
            self._start_over(
                f"slot {self._slot.value} holds {point.prefix} verified bytes of the image "
                f"where {previous.verified} were recorded as written: it was changed since"
            )
            return None
        if previous.member_offset is not None:
            return self._member_resume_point(previous, point, header)
        return self._spliced(point)

    def _spliced(self, point: ResumePoint) -> ResumePoint | None:
        """`point`, once the source takes the image's prefix from the slot."""
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

    def _why_not(self, previous: ResumeRecord, record: ResumeRecord, indexed: bool) -> list[str]:
        """What keeps the install from resuming from `previous`: nothing, or reasons."""
        why = self._differences(previous, record)
        if not why and not indexed:
            why = ["the artifact has no chunk index"]
        if not why and previous.image_offset is None:
            why = ["the last attempt ended before the image began"]
        if not why and previous.member_offset is not None and previous.boundary_image is None:
            why = [
                "its compressed data has no gzip member, xz stream or zstd frame that starts "
                f"on a chunk boundary within the {previous.verified} bytes of the image "
                "verified (it is one member, as tools other than otad-artifact write it, "
                "or the last attempt ended before the first boundary)"
            ]
        return why

    def _member_resume_point(
        self, previous: ResumeRecord, point: ResumePoint, header: ArtifactHeader
    ) -> MemberResumePoint | None:
        """Where a compressed image resumes: the recorded boundary, once probed."""
        from otad.artifact.compression import Compression, split_suffix
        from otad.splice import MemberResumePoint, probe_member

        member_offset, compressed = previous.member_offset, previous.boundary_compressed
        image_offset = previous.boundary_image
        chunk_index = header.payloads[0].chunk_index
        assert member_offset is not None
        assert compressed is not None
        assert image_offset is not None
        assert chunk_index is not None
        if image_offset > point.prefix:
            self._start_over(
                f"the recorded boundary at byte {image_offset} of the image is past the "
                f"{point.prefix} verified bytes slot {self._slot.value} holds"
            )
            return None
        number = image_offset // chunk_index.chunk_size
        if chunk_index.digests[number] not in _unique_digests(chunk_index.digests):
            # Only a chunk found once in the image tells the probe that the boundary is
            # the member it claims to be; another member could start with the same bytes.
            self._start_over(
                f"the recorded boundary starts chunk {number}, which is not unique in the image"
            )
            return None
        # The data member is compressed as header.tar is (open_data checks it).
        compression = split_suffix(header.header_member, "header.tar") or Compression.NONE
        member = MemberResumePoint(
            member_offset, compressed, image_offset, point.prefix, compression
        )
        why = probe_member(self.http, member, chunk_index)
        if why is not None:
            self._start_over(f"the recorded boundary is not usable: {why}")
            return None
        try:
            self.source.splice_member(member)
        except UsageError as error:
            self._start_over(f"the recorded place of the data does not fit: {error}")
            return None
        return member

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
        offset, member = payload_file.artifact_offset, payload_file.member_offset
        if payload_file.chunk_index is None or (offset is None and member is None):
            self._record = None
            self._store.clear("the image has no chunk index: no resume")
            return
        self._file = payload_file
        self._unique = _unique_digests(payload_file.chunk_index.digests)
        point = self._point
        if point is not None and offset != point.artifact_offset:
            raise StateCorrupt(
                f"{self._store.path} places the image at byte {point.artifact_offset} "
                f"of the artifact, where it starts at {offset}"
            )
        if (record.artifact_offset, record.member_offset) != (offset, member):
            # A fresh start, or a compressed splice the reader declined: no boundary yet.
            self._record = replace(
                record,
                artifact_offset=offset,
                member_offset=member,
                boundary_compressed=None,
                boundary_image=None,
            )
            self._store.save(self._record)

    def progress(self, synced: int) -> None:
        """Note that the slot's first `synced` bytes are verified and durable."""
        record = self._record
        if record is None or record.image_offset is None or synced <= record.verified:
            return
        record = replace(record, verified=synced, attempts=0)
        payload_file = self._file
        if record.member_offset is not None and payload_file is not None:
            index = payload_file.chunk_index
            assert index is not None
            passed = [
                boundary
                for boundary in payload_file.boundaries()
                if boundary.decompressed <= synced
                and index.digests[boundary.decompressed // index.chunk_size] in self._unique
            ]
            if passed:
                record = replace(
                    record,
                    boundary_compressed=passed[-1].compressed,
                    boundary_image=passed[-1].decompressed,
                )
        self._record = record
        self._store.save(record)

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


def _unique_digests(digests: tuple[bytes, ...]) -> frozenset[bytes]:
    """The chunk digests that occur once in an index."""
    seen: set[bytes] = set()
    repeated: set[bytes] = set()
    for digest in digests:
        (repeated if digest in seen else seen).add(digest)
    return frozenset(seen - repeated)


def count_attempt(store: ResumeStore, record: ResumeRecord) -> ResumeRecord:
    """Record one more automatic resume of `record` (durably, before it starts)."""
    counted = replace(record, attempts=record.attempts + 1)
    store.save(counted)
    return counted
