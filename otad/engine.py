"""The update engine: install into the inactive slot, trial boot, commit or roll back.

The engine knows nothing of D-Bus; the daemon and the tests drive it directly. Every
step that changes the device is preceded by saving the state record (otad.state), and
`recover()`, run at every start, finishes or undoes whatever the record says was in
progress:

    phase       found at start                         recovery
    installing  (any)                                  slot content unknown: mark it
                                                       bad in the bootloader and empty
                                                       in the record; report failure
    installed   same boot, trial not set               set the trial again
                same boot, trial set                   nothing: waiting for the reboot
                rebooted into the target               trial phase
                rebooted into the old slot             the bootloader fell back: failure
    trial       booted the target, default is it       the commit finished: record it
                booted the target                      waiting for commit (or, if a
                                                       rollback was asked, repeat it)
                booted the old slot                    fell back or rolled back: failure

A loop breaker stops after MAX_RECOVERY_ATTEMPTS starts that found the same unfinished
phase, giving the update up rather than retrying forever.

An install from an https URL also keeps a resume record (otad.resume) beside the state
record, with its progress at each fsync watermark of the slot. Recovery of the
installing phase leaves it, so that the next install of the same URL resumes from the
chunks the slot holds, each read back and verified against the signed chunk index
first; recovery of a later phase clears it. The slot still counts as empty until that
install has verified the whole image again, exactly as a fresh one does.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from otad.artifact.headers import ROOTFS_IMAGE
from otad.artifact.reader import ArtifactHeader, ArtifactReader, Limits, VerifyPolicy
from otad.artifact.signing import Verifier, load_verifier
from otad.artifact.streams import Readable
from otad.bootloader.base import Bootloader, BootStatus, Slot
from otad.bootsync import sync_boot_partition
from otad.compat import check_compatible, current_provides
from otad.config import Config
from otad.devices import SystemPaths, check_unused, find_partition
from otad.errors import (
    Cancelled,
    ChecksumMismatch,
    MalformedArtifact,
    ModuleError,
    NoSpace,
    NotInTrial,
    OtadError,
    StateConflict,
    StateCorrupt,
    UnsupportedFeature,
)
from otad.modules.protocol import RebootAction
from otad.modules.runner import ModuleConfig, ModuleRunner
from otad.modules.tree import DeviceContext
from otad.resume import DownloadResume, Interrupted, ResumeRecord, ResumeStore, count_attempt
from otad.slots import SlotDevice, booted_slot, resolve_slots
from otad.slotwriter import SlotWriter, read_back_sha256
from otad.sources import as_download
from otad.state import (
    Outcome,
    Phase,
    Release,
    SlotRecord,
    SlotStatus,
    State,
    StateStore,
    initial_state,
)

log = logging.getLogger(__name__)

MAX_RECOVERY_ATTEMPTS = 3

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class InstallResult:
    """How an install ended; for a slot update, the bytes written to and skipped on it."""

    artifact: str
    slot: Slot
    needs_reboot: bool
    bytes_written: int = 0
    bytes_skipped: int = 0
    # For a download that resumed: the bytes of the image that came from the slot.
    resumed_from: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """What the engine sees at one moment: its record, the bootloader, the slots."""

    state: State
    boot: BootStatus
    booted: Slot
    devices: dict[Slot, SlotDevice]


def _provides_after(header: ArtifactHeader, running: Release | None) -> dict[str, str]:
    """The device's provides once `header` is installed, applying clears_artifact_provides."""
    provides = current_provides(running)
    new: dict[str, str] = {"artifact_name": header.name}
    if header.header_info.artifact_group:
        new["artifact_group"] = header.header_info.artifact_group
    for payload in header.payloads:
        for pattern in payload.type_info.clears_provides or ():
            provides = {k: v for k, v in provides.items() if not fnmatch.fnmatchcase(k, pattern)}
        new.update(payload.type_info.provides)
    return {**provides, **new}


@dataclass(frozen=True)
class _Stops:
    """What can stop an install between two blocks."""

    cancel: threading.Event | None
    interrupt: threading.Event | None

    def check(self) -> None:
        if self.interrupt is not None and self.interrupt.is_set():
            raise Interrupted("otad is stopping; an install from a URL resumes when it starts")
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the install was cancelled")


class Engine:
    """Installs, commits and rolls back; one operation at a time."""

    def __init__(
        self,
        config: Config,
        bootloader: Bootloader,
        *,
        paths: SystemPaths | None = None,
        store: StateStore | None = None,
        verifiers: tuple[Verifier, ...] | None = None,
        modules: ModuleConfig | None = None,
    ) -> None:
        self.config = config
        self.bootloader = bootloader
        self.paths = paths or SystemPaths()
        self.store = store or StateStore(config.data_dir)
        self.resumes = ResumeStore(self.store.directory)
        self._verifiers = verifiers
        self.modules = modules or ModuleConfig(work_dir=config.data_dir / "modules" / "v3")
        self._lock = threading.Lock()

    # -- reading the situation ------------------------------------------------------

    def _boot_id(self) -> str:
        return (self.paths.proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()

    def _trusted_keys(self) -> tuple[Verifier, ...]:
        if self._verifiers is None:
            self._verifiers = tuple(load_verifier(path) for path in self.config.trusted_keys)
        return self._verifiers

    def snapshot(self) -> Snapshot:
        """Read the record, the bootloader and the slots (changes nothing on disk)."""
        boot = self.bootloader.status()
        devices = resolve_slots(self.config, self.paths)
        booted = booted_slot(devices, boot.booted, self.paths)
        return Snapshot(self._load_state(booted), boot, booted, devices)

    def _load_state(self, booted: Slot) -> State:
        try:
            state = self.store.load()
        except StateCorrupt as error:
            aside = self.store.quarantine()
            log.error("%s; moved to %s, starting from a fresh record", error, aside)
            return initial_state(booted, None).finished(
                Outcome("recover", False, f"state record was corrupt and was reset ({aside})")
            )
        return state if state is not None else initial_state(booted, None)

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> State:
        """Finish or undo what an interrupted run left; call once at start."""
        with self._lock:
            snapshot = self.snapshot()
            state = snapshot.state
            if state.phase is Phase.IDLE:
                if self.store.load() is None:
                    self.store.save(state)
                return state
            if state.recovery_attempts >= MAX_RECOVERY_ATTEMPTS:
                return self._give_up(snapshot)
            if state.phase in (Phase.INSTALLED, Phase.TRIAL):
                self.resumes.clear(f"the update is {state.phase.value}")
            attempted = replace(state, recovery_attempts=state.recovery_attempts + 1)
            self.store.save(attempted)
            recovered = self._recover(replace(snapshot, state=attempted))
            if recovered.phase is not Phase.IDLE:
                recovered = replace(recovered, recovery_attempts=0)
            self.store.save(recovered)
            return recovered

    def _recover(self, snapshot: Snapshot) -> State:
        state = snapshot.state
        if state.module is not None:
            return self._recover_module(state, snapshot.booted)
        target = state.target
        assert target is not None, "a slot update always names its target slot"
        artifact = self._pending_artifact(state)
        if state.phase is Phase.INSTALLING:
            self.bootloader.mark_bad(target)
            message = f"interrupted while writing slot {target.value}; the slot was cleared"
            return state.with_slot(target, SlotRecord(SlotStatus.EMPTY)).finished(
                Outcome("install", False, message, artifact)
            )
        if state.phase is Phase.INSTALLED:
            return self._recover_installed(snapshot, target, artifact)
        return self._recover_trial(snapshot, target, artifact)

    def _recover_installed(self, snapshot: Snapshot, target: Slot, artifact: str | None) -> State:
        state, booted = snapshot.state, snapshot.booted
        if booted is target:
            log.info("booted slot %s on trial", target.value)
            return replace(state, phase=Phase.TRIAL, boot_id=self._boot_id())
        if state.boot_id != self._boot_id():
            return self._fell_back(state, target, booted, artifact)
        if snapshot.boot.trial is not target:
            self.bootloader.start_trial(target)
        return state

    def _recover_trial(self, snapshot: Snapshot, target: Slot, artifact: str | None) -> State:
        state, booted = snapshot.state, snapshot.booted
        if booted is not target:
            return self._fell_back(state, target, booted, artifact)
        if state.rollback_requested:
            self.bootloader.mark_bad(target)
            return state
        if snapshot.boot.default is target:
            return self._committed(state, target)
        return state

    def _fell_back(self, state: State, target: Slot, booted: Slot, artifact: str | None) -> State:
        self.bootloader.mark_bad(target)
        record = state.slots[target]
        if state.rollback_requested:
            message = f"rolled back from slot {target.value} to slot {booted.value}"
            message += f": {state.rollback_reason}" if state.rollback_reason else " on request"
        else:
            message = (
                f"the trial boot of slot {target.value} failed; "
                f"the bootloader returned to slot {booted.value}"
            )
        log.warning("%s", message)
        return state.with_slot(target, SlotRecord(SlotStatus.BAD, record.release)).finished(
            Outcome("install", False, message, artifact)
        )

    def _give_up(self, snapshot: Snapshot) -> State:
        state = snapshot.state
        target = state.target
        message = (
            f"gave up after {state.recovery_attempts} attempts "
            f"to recover the {state.phase.value} phase"
        )
        if target is not None and target is not snapshot.booted:
            try:
                self.bootloader.mark_bad(target)
            except OtadError as error:
                log.error("could not mark slot %s bad: %s", target.value, error)
            state = state.with_slot(target, SlotRecord(SlotStatus.BAD, state.slots[target].release))
        given_up = state.finished(Outcome("recover", False, message, self._pending_artifact(state)))
        self.store.save(given_up)
        return given_up

    @staticmethod
    def _pending_artifact(state: State) -> str | None:
        if state.target is None:
            return None
        release = state.slots[state.target].release
        return release.artifact if release else None

    # -- install --------------------------------------------------------------------

    def install(
        self,
        source: Readable,
        *,
        allow_downgrade: bool | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        interrupt: threading.Event | None = None,
        deployment: str | None = None,
    ) -> InstallResult:
        """Verify and write an artifact into the inactive slot and request a trial boot.

        `cancel` stops the install for good; `interrupt` stops it because otad stops,
        keeping what resumes a download (otad.resume) when otad starts again.
        `deployment` names the Mender deployment a download is for, in its resume record.
        """
        if not self._lock.acquire(blocking=False):
            raise StateConflict("another operation is in progress")
        try:
            stops = _Stops(cancel, interrupt)
            return self._install(source, allow_downgrade, stops, progress, deployment)
        finally:
            self._lock.release()

    def _install(
        self,
        source: Readable,
        allow_downgrade: bool | None,
        stops: _Stops,
        progress: ProgressCallback | None,
        deployment: str | None = None,
    ) -> InstallResult:
        snapshot = self.snapshot()
        state, booted = snapshot.state, snapshot.booted
        if state.phase is not Phase.IDLE:
            raise StateConflict(
                f"cannot install while the update state is {state.phase.value}; "
                "commit or roll back first"
            )
        target = booted.other
        device = snapshot.devices[target]
        check_unused(device.path, self.paths)
        http = as_download(source)
        if http is None:
            return self._install_from(source, None, snapshot, allow_downgrade, stops, progress)
        resume = DownloadResume(
            self.resumes, http, target, device.path, allow_downgrade, deployment
        )
        error: BaseException | None = None
        try:
            return self._install_from(
                resume.source, resume, snapshot, allow_downgrade, stops, progress
            )
        except BaseException as caught:
            error = caught
            raise
        finally:
            resume.end(error)

    def _install_from(
        self,
        source: Readable,
        resume: DownloadResume | None,
        snapshot: Snapshot,
        allow_downgrade: bool | None,
        stops: _Stops,
        progress: ProgressCallback | None,
    ) -> InstallResult:
        state, booted = snapshot.state, snapshot.booted
        target = booted.other
        device = snapshot.devices[target]
        reader = ArtifactReader(
            source,
            VerifyPolicy(self._trusted_keys(), require_signature=True),
            Limits(payload=device.size),
            splice=resume.source if resume is not None else None,
        )
        header = reader.read_header()
        running = state.slots[booted].release
        allowed = (
            self.config.install.allow_downgrade if allow_downgrade is None else allow_downgrade
        )
        check_compatible(header, self.config.device_type, running, allowed)
        if len(header.payloads) == 1 and header.payloads[0].type != ROOTFS_IMAGE:
            return self._install_without_slot(reader, header, state, booted)
        self._check_rootfs_payload(header, device)
        payload = header.payloads[0]
        release = Release(header.name, payload.software_version, _provides_after(header, running))

        state = replace(
            state,
            phase=Phase.INSTALLING,
            target=target,
            transaction=uuid.uuid4().hex,
            boot_id=self._boot_id(),
        ).with_slot(target, SlotRecord(SlotStatus.EMPTY, release))
        self.store.save(state)
        try:
            if resume is not None:
                resume.begin(header)
            else:
                self.resumes.clear(f"another install writes slot {target.value}")
            written, skipped = self._write_slot(reader, device, progress, stops, resume)
            self._sync_boot_partition(target, device)
        except BaseException as error:
            failed = state.with_slot(target, SlotRecord(SlotStatus.EMPTY))
            self.store.save(failed.finished(Outcome("install", False, str(error), header.name)))
            raise
        installed = replace(state, phase=Phase.INSTALLED).with_slot(
            target, SlotRecord(SlotStatus.TRIAL, release)
        )
        self.store.save(installed)
        try:
            self.bootloader.start_trial(target)
        except OtadError as error:
            self._abandon(installed, target, f"could not start the trial boot: {error}")
            raise
        log.info("installed %s into slot %s; reboot to try it", header.name, target.value)
        resumed = resume.resumed_at if resume is not None else None
        return InstallResult(header.name, target, True, written, skipped, resumed)

    def _abandon(self, state: State, target: Slot, message: str) -> None:
        try:
            self.bootloader.mark_bad(target)
        except OtadError as error:
            log.error("could not mark slot %s bad: %s", target.value, error)
        bad = state.with_slot(target, SlotRecord(SlotStatus.BAD, state.slots[target].release))
        self.store.save(
            bad.finished(Outcome("install", False, message, self._pending_artifact(state)))
        )

    def _sync_boot_partition(self, target: Slot, device: SlotDevice) -> None:
        """Fill the target slot's own boot partition, where the board has one per slot."""
        slot_config = self.config.slots[target]
        if slot_config.boot is None:
            return
        boot = find_partition(slot_config.boot, self.paths)
        report = sync_boot_partition(
            device.path, boot, cmdline_root=str(slot_config.root), paths=self.paths
        )
        log.info("boot partition %s of slot %s: %d files", boot, target.value, report.files)

    @staticmethod
    def _check_rootfs_payload(header: ArtifactHeader, device: SlotDevice) -> None:
        if len(header.payloads) != 1:
            # TODO: install artifacts with several payloads once a writer makes them;
            # Mender's own tools make and accept only one.
            raise UnsupportedFeature(
                f"artifact has {len(header.payloads)} payloads, otad takes one"
            )
        payload = header.payloads[0]
        if len(payload.files) != 1:
            raise MalformedArtifact(f"a rootfs-image holds one file, this one {len(payload.files)}")
        promise = payload.promise
        if promise is not None:
            size = sum(promise.sizes.values())
            if size > device.size:
                raise NoSpace(
                    f"the image is {size} bytes, slot {device.slot.value} ({device.path}) "
                    f"holds {device.size}"
                )

    def _write_slot(
        self,
        reader: ArtifactReader,
        device: SlotDevice,
        progress: ProgressCallback | None,
        stops: _Stops,
        resume: DownloadResume | None,
    ) -> tuple[int, int]:
        """Write and verify the image; return the bytes written and the bytes skipped.

        A download's resume record is told where the image starts and, at each fsync
        watermark (from the slot writer's flusher thread), how much of it is verified and
        on the medium.
        """
        settings = self.config.install
        checksum = ""
        size = 0
        on_synced = resume.progress if resume is not None else None
        with SlotWriter(device.path, settings.fsync_interval, on_synced=on_synced) as writer:
            for payload_file in reader.payload_files():
                if payload_file.size > device.size:
                    raise NoSpace(
                        f"the image is {payload_file.size} bytes, slot {device.slot.value} "
                        f"({device.path}) holds {device.size}"
                    )
                if resume is not None:
                    resume.payload_started(payload_file)
                done = 0
                for block in payload_file.blocks():
                    stops.check()
                    writer.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, payload_file.size)
                checksum, size = payload_file.checksum, payload_file.size
            reader.finish()
            writer.finish()
        if settings.verify_readback:
            found = read_back_sha256(device.path, size)
            if found != checksum:
                raise ChecksumMismatch(f"slot {device.slot.value} read back", checksum, found)
        return writer.written, writer.skipped

    # -- downloads that a restart interrupted ----------------------------------------

    def interrupted_download(self) -> ResumeRecord | None:
        """The resume record of an install from a URL that a restart or a stop of otad
        interrupted, if there is one and it can go on now.

        A record of an install that failed and was reported (the network gave up) is
        kept for an install of the same URL but not returned; one for a slot that is no
        longer the inactive one is cleared.
        """
        record = self.resumes.load_or_discard()
        if record is None or record.failed:
            return None
        snapshot = self.snapshot()
        if snapshot.state.phase is not Phase.IDLE:
            return None
        if record.target is not snapshot.booted.other:
            self.resumes.clear(f"it is for slot {record.target.value}, which runs")
            return None
        return record

    def count_resume_attempt(self, record: ResumeRecord) -> ResumeRecord:
        """Durably count one more automatic resume of `record`, before starting it."""
        return count_attempt(self.resumes, record)

    def forget_download(self, why: str) -> None:
        """Clear the resume record: the next install of its URL starts over."""
        self.resumes.clear(why)

    # -- payloads for update modules and bootstrap artifacts --------------------------

    def _install_without_slot(
        self, reader: ArtifactReader, header: ArtifactHeader, state: State, booted: Slot
    ) -> InstallResult:
        """Install a module payload (or record a bootstrap artifact) on the running slot."""
        running = state.slots[booted].release
        version = running.version if running else None
        pending = Release(header.name, version, _provides_after(header, running))
        payload = header.payloads[0]
        if payload.type is None:
            reader.finish()
            self._finish_module(state, booted, pending, "bootstrap artifact recorded")
            return InstallResult(header.name, booted, needs_reboot=False)
        state = replace(
            state,
            phase=Phase.INSTALLING,
            module=payload.type,
            pending=pending,
            transaction=uuid.uuid4().hex,
            boot_id=self._boot_id(),
        )
        self.store.save(state)
        context = DeviceContext(
            self.config.device_type,
            running.artifact if running else None,
            running.provides.get("artifact_group") if running else None,
        )
        runner: ModuleRunner | None = None
        installing = False
        try:
            runner = ModuleRunner.prepare(header, payload, context, self.modules)
            runner.download(reader.payload_files())
            reader.finish()
            installing = True
            runner.install()
            reboot = runner.needs_reboot()
            if reboot is RebootAction.AUTOMATIC:
                self.store.save(replace(state, phase=Phase.INSTALLED))
                return InstallResult(header.name, booted, needs_reboot=True)
            if reboot is RebootAction.YES:
                runner.reboot()
                runner.verify_reboot()
            runner.commit()
        except BaseException as error:
            self._module_failed(runner, state, installing, str(error))
            raise
        self._cleanup(runner)
        self._finish_module(state, booted, pending, f"{payload.type} payload installed")
        return InstallResult(header.name, booted, needs_reboot=False)

    def _finish_module(self, state: State, booted: Slot, pending: Release, message: str) -> State:
        record = state.slots[booted]
        done = state.with_slot(booted, SlotRecord(record.status, pending)).finished(
            Outcome("install", True, message, pending.artifact)
        )
        self.store.save(done)
        return done

    def _module_failed(
        self, runner: ModuleRunner | None, state: State, installing: bool, message: str
    ) -> State:
        """Roll the module back where it can, run ArtifactFailure and Cleanup, record it."""
        if runner is not None and installing:
            try:
                if runner.supports_rollback():
                    runner.rollback()
                runner.failure()
            except ModuleError as error:
                log.error("rolling back the module failed too: %s", error)
        self._cleanup(runner)
        artifact = state.pending.artifact if state.pending else None
        failed = state.finished(Outcome("install", False, message, artifact))
        self.store.save(failed)
        return failed

    @staticmethod
    def _cleanup(runner: ModuleRunner | None) -> None:
        if runner is None:
            return
        try:
            runner.cleanup()
        except ModuleError as error:
            log.warning("module cleanup failed, its file tree was removed anyway: %s", error)

    def _recover_module(self, state: State, booted: Slot) -> State:
        assert state.module is not None
        try:
            runner = ModuleRunner.resume(0, state.module, self.modules)
        except OtadError as error:
            message = f"interrupted, and the module cannot be resumed: {error}"
            return state.finished(Outcome("install", False, message, None))
        if state.phase is Phase.INSTALLING:
            return self._module_failed(runner, state, True, "interrupted while installing")
        if state.boot_id == self._boot_id():
            return state  # waiting for the reboot the module asked for
        try:
            runner.verify_reboot()
            runner.commit()
        except ModuleError as error:
            # TODO: run ArtifactRollbackReboot and a second host reboot when a module
            # needs one to roll back; today the rollback runs without it.
            return self._module_failed(runner, state, True, str(error))
        self._cleanup(runner)
        booted = next(
            slot for slot, record in state.slots.items() if record.status is SlotStatus.GOOD
        )
        assert state.pending is not None
        return self._finish_module(
            state, booted, state.pending, f"{state.module} payload installed"
        )

    # -- commit and rollback --------------------------------------------------------

    def commit(self) -> State:
        """Make the slot on trial permanent; only while running it on trial."""
        with self._lock:
            snapshot = self.snapshot()
            state = snapshot.state
            if state.phase is not Phase.TRIAL or snapshot.booted is not state.target:
                raise NotInTrial(f"nothing to commit: the update state is {state.phase.value}")
            if state.rollback_requested:
                raise StateConflict("a rollback was requested; reboot to finish it")
            self.bootloader.mark_good(snapshot.booted)
            committed = self._committed(state, snapshot.booted)
            self.store.save(committed)
            return committed

    def _committed(self, state: State, target: Slot) -> State:
        record = state.slots[target]
        artifact = record.release.artifact if record.release else None
        log.info("committed slot %s (%s)", target.value, artifact)
        good = state.with_slot(target, SlotRecord(SlotStatus.GOOD, record.release))
        return good.finished(Outcome("commit", True, f"slot {target.value} committed", artifact))

    def rollback(self, reason: str = "") -> bool:
        """Undo the last update from wherever it is; return True if a reboot is needed.

        `reason`, when a rollback is not asked for by a person, is what the outcome
        reports after leaving a trial (empty: "on request").
        """
        with self._lock:
            snapshot = self.snapshot()
            state, booted = snapshot.state, snapshot.booted
            target = state.target
            if state.phase is Phase.INSTALLED and target is not None and booted is not target:
                self.bootloader.mark_bad(target)
                record = SlotRecord(SlotStatus.BAD, state.slots[target].release)
                artifact = self._pending_artifact(state)
                message = f"the update in slot {target.value} was cancelled before booting"
                self.store.save(
                    state.with_slot(target, record).finished(
                        Outcome("rollback", True, message, artifact)
                    )
                )
                return False
            if state.phase is Phase.TRIAL and booted is target:
                self.store.save(replace(state, rollback_requested=True, rollback_reason=reason))
                self.bootloader.mark_bad(booted)
                return True
            if state.phase is Phase.IDLE:
                return self._return_to_previous(state, booted)
            raise StateConflict(f"cannot roll back while the update state is {state.phase.value}")

    def _return_to_previous(self, state: State, booted: Slot) -> bool:
        previous = booted.other
        record = state.slots[previous]
        if record.status is not SlotStatus.GOOD or record.release is None:
            raise StateConflict(
                f"slot {previous.value} holds no verified release to return to "
                f"(it is {record.status.value})"
            )
        # Returning is itself a trial: if the old release no longer boots, the
        # bootloader comes back to the running one.
        trial = replace(
            state,
            phase=Phase.INSTALLED,
            target=previous,
            transaction=uuid.uuid4().hex,
            boot_id=self._boot_id(),
        ).with_slot(previous, SlotRecord(SlotStatus.TRIAL, record.release))
        self.store.save(trial)
        self.bootloader.start_trial(previous)
        return True
