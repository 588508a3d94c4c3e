"""What the daemon offers its clients, independent of D-Bus: one operation at a time.

The Updater wraps the engine for a long-running process on an asyncio loop. Blocking
engine calls run on worker threads; an install runs in the background and ends with a
completion (its job id, the error or None, a message). Clients see a Status (the
service state, the running operation, progress, the slots, the last error) that the
Updater pushes to its Listener whenever it changes, always on the loop's thread.

While the booted slot is on trial the Updater arms the health gate: if nobody commits
within the configured health_timeout, it rolls back and reboots, as a trial that never
proved healthy must not stay.

When it starts and finds that a restart or a power cut interrupted an install from a URL
(the engine's resume record, otad.resume), the Updater resumes it by itself, as an
install like any other (State "installing", Progress, Completed, LastError), with the
interrupted install's allow_downgrade, and without rebooting afterwards; an install that
failed on the network, and said so, resumes only when its URL is installed again. It
gives up after download.resume_attempts such starts in a row that got no further (0:
never by itself), which also breaks a loop of a resume that crashes the daemon. Stopping
the daemon interrupts an install rather than cancelling it, so it resumes at the next
start. An install for a Mender deployment (its record names the deployment) is not
resumed here: the fleet client installs the deployment again when the server hands it
out again (otad.fleet.poller), and that install resumes, so that the two never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from io import BufferedReader
from typing import Any, Protocol, TypeVar

from otad.artifact.describe import describe
from otad.artifact.headers import ROOTFS_IMAGE
from otad.artifact.reader import ArtifactHeader, ArtifactReader, VerifyPolicy, verify_artifact
from otad.artifact.signing import Verifier, load_verifier
from otad.bootloader.base import Slot
from otad.compat import check_compatible
from otad.engine import Engine, Snapshot
from otad.errors import NoSpace, NotAuthorized, OtadError, StateConflict, UsageError
from otad.slots import SlotDevice
from otad.sources import Source, is_seekable, open_source
from otad.state import Phase, SlotStatus

log = logging.getLogger(__name__)

T = TypeVar("T")


class ServiceState(enum.Enum):
    """The state clients see; the value is the spelling on D-Bus."""

    IDLE = "idle"
    INSTALLING = "installing"
    REBOOT_REQUIRED = "reboot-required"
    TRIAL = "trial"


class Operation(enum.Enum):
    NONE = "none"
    INSTALL = "install"
    COMMIT = "commit"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Status:
    state: ServiceState
    operation: Operation
    progress: int  # percent
    progress_message: str
    booted: Slot
    next_boot: Slot
    current_artifact: str
    compatible: str  # the device type
    last_error: str  # the last operation's error, "" when it succeeded


@dataclass(frozen=True)
class SlotInfo:
    slot: Slot
    device: str
    is_booted: bool
    is_next: bool
    status: SlotStatus
    artifact: str
    version: str


@dataclass(frozen=True)
class InstallOptions:
    reboot: bool = False
    allow_downgrade: bool | None = None  # None: otad.conf's install.allow_downgrade
    deployment: str | None = None  # the Mender deployment the install is for (otad.fleet)


@dataclass(frozen=True)
class ArtifactInfo:
    """What Inspect tells about a verified artifact."""

    name: str
    devices: tuple[str, ...]
    version: str
    payload_type: str  # "" for a bootstrap artifact
    signature: str  # verified, unsigned
    signed_by: str  # the trusted key's file, "" when unsigned
    size: int  # bytes of the artifact


class Listener(Protocol):
    """Receives the Updater's news on the loop's thread."""

    def status_changed(self, status: Status) -> None: ...

    def completed(self, job: str, error: Exception | None, message: str) -> None: ...


class _Silent:
    def status_changed(self, status: Status) -> None:
        pass

    def completed(self, job: str, error: Exception | None, message: str) -> None:
        pass


# Refused requests change nothing, so they are not the "last error" of the device.
_REFUSALS = (StateConflict, UsageError, NotAuthorized)


def service_state(snapshot: Snapshot) -> ServiceState:
    """The state a client sees when no operation runs, from the engine's record."""
    state = snapshot.state
    if state.phase is Phase.INSTALLED or state.rollback_requested:
        return ServiceState.REBOOT_REQUIRED
    if state.phase is Phase.TRIAL and snapshot.booted is state.target:
        return ServiceState.TRIAL
    return ServiceState.IDLE


def error_message(error: Exception) -> str:
    """The one line a client is told about `error`; never a traceback."""
    if isinstance(error, OtadError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return "internal error in the otad daemon (its log has the details)"


def _check_fits(header: ArtifactHeader, device: SlotDevice) -> None:
    """NoSpace when a root filesystem image's signed size exceeds the target slot.

    The engine checks this again when it installs; checking here lets Install refuse
    before it returns.
    """
    for payload in header.payloads:
        if payload.type != ROOTFS_IMAGE or payload.promise is None:
            continue
        size = sum(payload.promise.sizes.values())
        if size > device.size:
            raise NoSpace(
                f"the image is {size} bytes, slot {device.slot.value} ({device.path}) "
                f"holds {device.size}"
            )


class Updater:
    """Runs the engine for the daemon: status, background installs, the health gate."""

    def __init__(
        self,
        engine: Engine,
        *,
        reboot: Callable[[], None],
        listener: Listener | None = None,
    ) -> None:
        self.engine = engine
        self.listener: Listener = listener or _Silent()
        self._reboot = reboot
        self._status: Status | None = None
        self._operation = Operation.NONE
        self._progress = (0, "")
        self._last_error = ""
        self._cancel: threading.Event | None = None
        self._stopping = threading.Event()  # set by stop(): an install ends resumable
        self._verifiers: tuple[Verifier, ...] | None = None
        self._health_gate: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reserved = ""  # while set, every operation is refused with this text

    # -- plumbing -------------------------------------------------------------------

    async def _blocking(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(function, *args, **kwargs))

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def trusted_keys(self) -> tuple[Verifier, ...]:
        """The verifiers of otad.conf's trusted_keys, loaded once."""
        if self._verifiers is None:
            self._verifiers = tuple(load_verifier(key) for key in self.engine.config.trusted_keys)
        return self._verifiers

    def reserve(self, reason: str) -> None:
        """Refuse every operation with StateConflict(`reason`) until `release()`.

        For work that starts an operation later and must not find another one running
        then (a deployment from a Mender server, between its download and its install);
        StateConflict when an operation runs or another reservation stands.
        """
        if self._reserved:
            raise StateConflict(self._reserved)
        if self._operation is not Operation.NONE:
            raise StateConflict(f"another operation is in progress: {self._operation.value}")
        self._reserved = reason

    def release(self) -> None:
        """End the reservation; the holder may then claim its own operation."""
        self._reserved = ""

    def _claim(self, operation: Operation) -> None:
        if self._reserved:
            raise StateConflict(self._reserved)
        if self._operation is not Operation.NONE:
            raise StateConflict(f"another operation is in progress: {self._operation.value}")
        self._operation = operation

    def _note_failure(self, what: str, error: Exception) -> None:
        if isinstance(error, (OtadError, OSError)):
            log.error("%s failed: %s", what, error_message(error))
        else:
            log.exception("%s failed with an unexpected error", what)
        if not isinstance(error, _REFUSALS):
            self._last_error = error_message(error)

    # -- status ---------------------------------------------------------------------

    @property
    def status(self) -> Status:
        assert self._status is not None, "start() reads the first status"
        return self._status

    async def refresh(self) -> Status:
        """Read the device again and tell the listener if anything changed."""
        snapshot = await self._blocking(self.engine.snapshot)
        booted = snapshot.state.slots[snapshot.booted]
        state = service_state(snapshot)
        if self._operation is Operation.INSTALL:
            state = ServiceState.INSTALLING
        status = Status(
            state=state,
            operation=self._operation,
            progress=self._progress[0],
            progress_message=self._progress[1],
            booted=snapshot.booted,
            next_boot=snapshot.boot.next_boot,
            current_artifact=booted.release.artifact if booted.release else "",
            compatible=self.engine.config.device_type,
            last_error=self._last_error,
        )
        self._publish(status)
        return status

    def _publish(self, status: Status) -> None:
        if status != self._status:
            self._status = status
            self.listener.status_changed(status)

    def _set_progress(self, percent: int, message: str) -> None:
        self._progress = (percent, message)
        if self._status is not None:
            self._publish(replace(self._status, progress=percent, progress_message=message))

    async def slots(self) -> list[SlotInfo]:
        snapshot = await self._blocking(self.engine.snapshot)
        found = []
        for slot in Slot:
            record = snapshot.state.slots[slot]
            release = record.release
            found.append(
                SlotInfo(
                    slot=slot,
                    device=str(snapshot.devices[slot].path),
                    is_booted=slot is snapshot.booted,
                    is_next=slot is snapshot.boot.next_boot,
                    status=record.status,
                    artifact=release.artifact if release else "",
                    version=(release.version or "") if release else "",
                )
            )
        return found

    # -- start and the health gate --------------------------------------------------

    async def start(self) -> Status:
        """Recover what an earlier run left, read the status, arm the health gate."""
        state = await self._blocking(self.engine.recover)
        if state.last is not None and not state.last.success:
            self._last_error = state.last.message
        status = await self.refresh()
        if status.state is ServiceState.TRIAL:
            self._arm_health_gate()
        elif status.state is ServiceState.IDLE and await self._resume_interrupted():
            status = self.status
        return status

    async def _resume_interrupted(self) -> bool:
        """Start resuming an install from a URL that a restart interrupted; True if it started."""
        record = await self._blocking(self.engine.interrupted_download)
        if record is None:
            return False
        from otad.download import DownloadSettings, shown_url  # brings in requests

        url = shown_url(record.url)
        if record.deployment is not None:
            log.info(
                "an install of %s for deployment %s was interrupted; it resumes when the "
                "Mender server hands the deployment out again",
                url,
                record.deployment,
            )
            return False
        allowed = (self.engine.config.download or DownloadSettings()).resume_attempts
        if not allowed:
            log.info("an install of %s was interrupted; it resumes when installed again", url)
            return False
        if record.attempts >= allowed:
            message = (
                f"gave up resuming the interrupted install of {url}: "
                f"{record.attempts} attempts in a row got no further"
            )
            log.warning("%s", message)
            await self._blocking(self.engine.forget_download, message)
            self._last_error = message
            await self.refresh()
            return False
        await self._blocking(self.engine.count_resume_attempt, record)
        options = InstallOptions(allow_downgrade=record.allow_downgrade)
        try:
            job, _ = await self.start_install(
                open_source(record.url, self.engine.config.download), options
            )
        except Exception as error:
            self._note_failure("resuming the interrupted install", error)
            await self.refresh()
            return False
        log.info("resuming the interrupted install of %s (job %s)", url, job)
        self._set_progress(0, f"resuming the interrupted download of {url}")
        return True

    def _seconds_since_boot(self) -> float:
        """The kernel's uptime; 0 when it cannot be read (the gate then runs in full)."""
        try:
            return float((self.engine.paths.proc / "uptime").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0

    def _arm_health_gate(self) -> None:
        # The deadline counts from the boot, not from this daemon's start, so that a
        # daemon that crashes and restarts during a trial cannot keep extending it.
        timeout = max(0.0, self.engine.config.health_timeout - self._seconds_since_boot())
        log.info(
            "slot %s runs on trial: unless it is committed within %.0f s, otad rolls back "
            "and reboots",
            self.status.booted.value,
            timeout,
        )
        loop = asyncio.get_running_loop()
        self._health_gate = loop.call_later(
            timeout, lambda: self._spawn(self._health_gate_expired())
        )

    def _disarm_health_gate(self) -> None:
        if self._health_gate is not None:
            self._health_gate.cancel()
            self._health_gate = None

    async def _health_gate_expired(self) -> None:
        self._health_gate = None
        status = await self.refresh()
        if status.state is not ServiceState.TRIAL:
            return
        if self._operation is not Operation.NONE:  # a commit may be finishing: look again
            self._health_gate = asyncio.get_running_loop().call_later(
                1, lambda: self._spawn(self._health_gate_expired())
            )
            return
        log.warning(
            "the trial of slot %s was not committed within %d s: rolling back and rebooting",
            status.booted.value,
            self.engine.config.health_timeout,
        )
        # A failed rollback is logged by rollback(); the reboot still ends the trial,
        # as the bootloader falls back once the trial's boots are used up.
        reason = (
            f"the trial of slot {status.booted.value} was not committed within "
            f"{self.engine.config.health_timeout} s"
        )
        with contextlib.suppress(Exception):
            await self.rollback(reboot=False, reason=reason)
        self._last_error = f"{reason}; otad rolled it back"
        await self.refresh()
        await self._reboot_now()

    async def _reboot_now(self) -> None:
        log.info("rebooting")
        try:
            await self._blocking(self._reboot)
        except Exception as error:
            self._note_failure("reboot", error)
            await self.refresh()

    # -- install --------------------------------------------------------------------

    async def install(self, source: Source, options: InstallOptions) -> str:
        """Check `source` and start installing it in the background; return the job id.

        A source that can be read twice (a regular file) has its header verified and its
        compatibility checked before this returns, so that such errors reach the caller
        directly; a pipe is checked as it is installed.
        """
        job, _ = await self.start_install(source, options)
        return job

    async def start_install(
        self, source: Source, options: InstallOptions
    ) -> tuple[str, asyncio.Task[Exception | None]]:
        """As `install`, and also return the install's task, whose result is its error.

        For a caller that must keep `source` usable until the install ends (a mounted
        medium); the listener hears of the completion as for any install.
        """
        try:
            self._claim(Operation.INSTALL)
        except StateConflict:
            source.close()
            raise
        try:
            target = await self._blocking(self._check_before_install, source, options)
        except BaseException:
            self._operation = Operation.NONE
            source.close()
            raise
        job = uuid.uuid4().hex
        self._cancel = threading.Event()
        self._progress = (0, "verifying the artifact")
        await self.refresh()
        return job, self._spawn(self._run_install(job, source, options, target, self._cancel))

    def _check_before_install(self, source: Source, options: InstallOptions) -> Slot:
        snapshot = self.engine.snapshot()
        state, booted = snapshot.state, snapshot.booted
        if state.phase is Phase.TRIAL and booted is state.target:
            raise StateConflict(
                f"slot {booted.value} is on trial: commit or roll back before installing"
            )
        if state.phase is not Phase.IDLE:
            raise StateConflict(
                f"an update is {state.phase.value}: reboot into it, or roll back, first"
            )
        if not is_seekable(source) or not isinstance(source, BufferedReader):
            return booted.other  # a pipe or a download is checked as it streams
        start = source.tell()
        reader = ArtifactReader(source, VerifyPolicy(self.trusted_keys(), require_signature=True))
        header = reader.read_header()
        config = self.engine.config
        allowed = options.allow_downgrade
        if allowed is None:
            allowed = config.install.allow_downgrade
        check_compatible(header, config.device_type, state.slots[booted].release, allowed)
        _check_fits(header, snapshot.devices[booted.other])
        source.seek(start)
        return booted.other

    async def _run_install(
        self,
        job: str,
        source: Source,
        options: InstallOptions,
        target: Slot,
        cancel: threading.Event,
    ) -> Exception | None:
        loop = asyncio.get_running_loop()
        posted = [-1]

        def progress(done: int, total: int) -> None:  # on the worker thread
            percent = min(99, done * 100 // total) if total else 0
            if percent != posted[0]:
                posted[0] = percent
                loop.call_soon_threadsafe(
                    self._set_progress, percent, f"writing slot {target.value}"
                )

        try:
            with source:
                result = await self._blocking(
                    self.engine.install,
                    source,
                    allow_downgrade=options.allow_downgrade,
                    progress=progress,
                    cancel=cancel,
                    interrupt=self._stopping,
                    deployment=options.deployment,
                )
        except Exception as error:
            self._note_failure("install", error)
            self._progress = (0, "")  # LastError tells what happened; no stale percentage
            await self._finish(job, error, error_message(error))
            return error
        message = f"installed {result.artifact} into slot {result.slot.value}"
        if result.needs_reboot:
            message += "; reboot to try it"
        log.info("%s", message)
        self._last_error = ""
        self._progress = (100, message)
        await self._finish(job, None, message)
        if options.reboot and result.needs_reboot:
            await self._reboot_now()
        return None

    async def _finish(self, job: str, error: Exception | None, message: str) -> None:
        self._operation = Operation.NONE
        self._cancel = None
        try:
            await self.refresh()
        finally:
            self.listener.completed(job, error, message)

    def cancel(self) -> bool:
        """Ask a running install to stop; False when none runs (nothing to do)."""
        if self._cancel is None:
            return False
        log.info("cancelling the install")
        self._cancel.set()
        return True

    # -- commit and rollback --------------------------------------------------------

    async def commit(self) -> None:
        """Make the slot on trial permanent."""
        self._claim(Operation.COMMIT)
        try:
            await self._blocking(self.engine.commit)
        except Exception as error:
            self._note_failure("commit", error)
            raise
        else:
            self._last_error = ""
            self._disarm_health_gate()
        finally:
            self._operation = Operation.NONE
            await self.refresh()

    async def rollback(self, *, reboot: bool, reason: str = "") -> bool:
        """Undo the last update; reboot if asked and needed. Returns whether one is needed.

        `reason` says why when no person asked (see Engine.rollback).
        """
        self._claim(Operation.ROLLBACK)
        try:
            needs_reboot = await self._blocking(self.engine.rollback, reason)
        except Exception as error:
            self._note_failure("rollback", error)
            raise
        else:
            self._last_error = ""
            self._disarm_health_gate()
        finally:
            self._operation = Operation.NONE
            await self.refresh()
        if reboot and needs_reboot:
            await self._reboot_now()
        return needs_reboot

    # -- inspect --------------------------------------------------------------------

    async def inspect(self, source: Source) -> ArtifactInfo:
        """Verify a whole artifact with the trusted keys and describe it."""
        with source:
            return await self._blocking(self._inspect, source)

    def _inspect(self, source: Source) -> ArtifactInfo:
        policy = VerifyPolicy(self.trusted_keys(), require_signature=False)
        header, files = verify_artifact(source, policy)
        description = describe(header, files)
        payload = description["payloads"][0] if description["payloads"] else {}
        return ArtifactInfo(
            name=description["name"],
            devices=tuple(description["compatible_devices"]),
            version=payload.get("software_version") or "",
            payload_type=payload.get("type") or "",
            signature=description["signature"]["status"],
            signed_by=description["signature"].get("key", ""),
            size=source.tell() if isinstance(source, BufferedReader) else source.position,
        )

    # -- stopping -------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Cancel a running install and wait (up to `timeout` s) for background work."""
        self._disarm_health_gate()
        self._stopping.set()
        self.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
