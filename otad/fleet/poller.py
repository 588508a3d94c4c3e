"""The fleet client's loop: authenticate, poll, install, report, keep the inventory.

`Poller.step()` does the work that is due and returns the seconds until it should run
again; `Poller.run()` repeats it on a thread until stopped. The daemon supplies how to
open an artifact URL, how to install it, how to reboot, and how to read the device
(`DeviceView`); the poller never touches the engine itself.

A deployment, as the device reports it:

    downloading   before the artifact is opened
    installing    once it is open (it streams: download and install are one pass)
    rebooting     installed, before the reboot into the trial
    success       after the commit (the engine's last outcome: commit of this artifact)
    failure       the install failed, or the trial fell back or was rolled back; the
                  deployment log (this deployment's steps and the engine's message) is
                  uploaded first
    already-installed   the device runs the artifact the deployment names

What each answer leads to (the APIs name 200/204 for success, 400 for a malformed
request, 401 for a missing or expired token, 404, 409 and 500; timing is not part of
the specifications, so the intervals are otad.conf's):

    answer                      auth_requests     next / inventory      status / log
    2xx                         token             act; next poll after  go on
                                                  poll_interval
    401                         not accepted yet: token dropped: authenticate at once and
                                backoff           send again; a 401 to that: backoff
    404                         backoff           v2 next: use v1;      deployment gone:
                                                  else backoff          stop it (a
    409                         backoff           backoff (conflict)    deployment that is
                                                                        installed, not yet
                                                                        booted, is rolled
                                                                        back)
    other 4xx, 5xx, no answer,  backoff           backoff               backoff, then the
    malformed answer                                                    same report again

"Backoff" waits retry_interval after the first failure in a row and doubles each time,
up to max_retry_interval (default: poll_interval); the first success resets it. A device
key that cannot be made (it is made at the first authentication when none is kept) is
a server error with backoff too. Final
statuses are kept on disk until the server has them, so a failure to report never
loses the outcome.

A deployment is taken only when the daemon's `begin` hook agrees (no other install or
operation runs); otherwise it is left on the server, which hands it out again at the
next poll. A hook raises `Stopped` when the daemon shuts down: the loop then ends at
once, and the deployment's record tells the next start where it was.

A server hands a deployment out at every poll until the device reports a final status,
so a restart of otad (a crash, a stop, a power cut) is never reported as a failure. What
the next start does, from the deployment's record and the engine's:

    record        engine                  then
    installing    idle, no outcome of it  the install was cut short: the record goes to
                                          `interrupted`, the next poll gets the same
                                          deployment (a fresh URL) and installs it again;
                                          the download resumes from the slot where
                                          otad.resume allows it, else starts over
    interrupted   idle                    as above, at the next poll; a poll with no
                                          deployment or another one: the server ended it,
                                          the record is forgotten
    installing    installed               report rebooting, reboot
    rebooting     installed (same boot)   the reboot did not happen: reboot again
    installing    trial                   the device rebooted first: report rebooting
    rebooting     trial                   wait for the commit (or the fallback)
    any           idle, committed it      success
    rebooting     idle, other outcome     failure (fallback, rollback)
    installing    idle, the slot marked   failure: the install ended, a power cut booted
                  bad since it began      the trial, and it fell back

Statuses the server already has (the record's `reported`) are not sent again, so the
server sees downloading, installing, rebooting and one final status, whatever restarts
came between. The daemon does not resume a deployment's download by itself at start
(otad.updater): the poller installs it again, under the deployment. An install cut short
more than `resume_attempts` times in a row (download.resume_attempts) is reported failed.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from otad.artifact.streams import Readable
from otad.errors import KeyProblem, OtadError, StateConflict
from otad.fleet.auth import AUTH_PATH, DeviceKey, authenticate
from otad.fleet.client import Client, ServerError, Unauthorized
from otad.fleet.config import ServerConfig
from otad.fleet.deployments import (
    Deployment,
    DeploymentGone,
    DeploymentsApi,
    DeploymentStatus,
    log_message,
)
from otad.fleet.device import DeviceView
from otad.fleet.inventory import Value, collect_attributes, run_inventory_scripts, send_inventory
from otad.fleet.pending import Pending, PendingStore, Stage
from otad.state import Outcome, Phase

log = logging.getLogger(__name__)

OpenArtifact = Callable[[str], Readable]
Installer = Callable[[Readable, Deployment], object]
ReadDevice = Callable[[], DeviceView]
T = TypeVar("T")


class Stopped(Exception):
    """Raised by a hook when the daemon stops: the poller's loop ends where it is."""


class ServerState(enum.Enum):
    """How the device stands with the server; the value is the spelling on D-Bus."""

    CONNECTING = "connecting"  # nothing answered yet
    UNAUTHORIZED = "unauthorized"  # the server does not accept the device (yet)
    AUTHORIZED = "authorized"  # the device holds a token and the last exchange worked
    UNREACHABLE = "unreachable"  # the last request got no answer
    ERROR = "error"  # the server answered with an error (last_error says which)


@dataclass(frozen=True)
class FleetStatus:
    """What D-Bus clients see of the fleet server (times in seconds since the epoch)."""

    server: str
    state: ServerState
    reachable: bool  # the last request got an answer
    authorized: bool  # the device holds a token
    last_poll: float  # 0: not yet
    last_error: str  # "" after a success
    deployment_id: str  # the deployment in progress, "" for none
    deployment_artifact: str
    deployment_status: str  # the last status reported for it


@dataclass(frozen=True)
class DeviceHooks:
    """What the daemon does for the poller."""

    read_device: ReadDevice
    open_artifact: OpenArtifact
    install: Installer  # raises on failure; the engine's record tells the rest
    reboot: Callable[[], object]
    rollback: Callable[[], object] | None = None  # cancels an installed, unbooted update
    # Before a deployment is taken: raises StateConflict when the device is busy, and
    # from then on refuses other operations until `end`, which follows on every path.
    begin: Callable[[Deployment], object] | None = None
    end: Callable[[], object] | None = None


def _close(source: object) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def is_success_for(outcome: Outcome | None, artifact: str, started: float) -> bool:
    """True when the engine's last outcome is this artifact committed (or installed by a
    module that needs no commit)."""
    return (
        outcome is not None
        and outcome.success
        and outcome.operation in ("commit", "install")
        and outcome.artifact == artifact
        and outcome.time >= started
    )


class Poller:
    """Talks to the Mender server for the daemon; run `step` from one thread only."""

    def __init__(
        self,
        config: ServerConfig,
        client: Client,
        key: DeviceKey | Callable[[], DeviceKey],
        identity: dict[str, str],
        hooks: DeviceHooks,
        directory: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_status: Callable[[FleetStatus], None] | None = None,
        resume_attempts: int = 3,
    ) -> None:
        self.config = config
        self.client = client
        self._key = key
        self.identity = identity
        self.hooks = hooks
        self.api = DeploymentsApi(client)
        self.store = PendingStore(directory)
        self._clock = clock
        self._on_status = on_status
        self._pending = self.store.load()
        self._next_poll = self._next_inventory = clock()
        self._failures = 0
        self._resume_attempts = resume_attempts
        self._reboot_asked = False  # by this process: a reboot ends it
        self._wake = threading.Event()
        self._status = FleetStatus(
            config.url, ServerState.CONNECTING, False, False, 0.0, "", "", "", ""
        )
        if self._pending is not None:
            reported = self._pending.reported
            self._publish(
                deployment_id=self._pending.deployment_id,
                deployment_artifact=self._pending.artifact_name,
                deployment_status=reported[-1].value if reported else "",
            )

    # -- status -------------------------------------------------------------------

    @property
    def status(self) -> FleetStatus:
        return self._status

    def _publish(self, **changes: Any) -> None:
        status = replace(self._status, **changes)
        if status != self._status:
            self._status = status
            if self._on_status is not None:
                self._on_status(status)

    @property
    def key(self) -> DeviceKey:
        """The device key; made at the first authentication when given as a callable."""
        if not isinstance(self._key, DeviceKey):
            self._key = self._key()
        return self._key

    # -- the loop -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connections to the server."""
        self.client.close()

    def wake(self) -> None:
        """Run the next step now (the daemon calls this when a commit or rollback ends)."""
        self._wake.set()

    def run(self, stop: threading.Event, sleep: Callable[[float], object] | None = None) -> None:
        """Step until `stop` is set; waits end early on `wake()`."""
        while not stop.is_set():
            try:
                delay = self.step()
            except Stopped:
                log.info("fleet client stopped")
                return
            if sleep is not None:
                sleep(delay)
                continue
            self._wake.wait(delay)
            self._wake.clear()

    def step(self) -> float:
        """Do what is due; return the seconds until the next step."""
        try:
            return self._step()
        except Unauthorized as error:
            self._publish(state=ServerState.UNAUTHORIZED, authorized=False, reachable=True,
                          last_error=str(error))  # fmt: skip
            return self._backoff(error)
        except ServerError as error:
            reachable = error.status is not None
            state = ServerState.ERROR if reachable else ServerState.UNREACHABLE
            self._publish(state=state, reachable=reachable, last_error=str(error))
            return self._backoff(error)
        except KeyProblem as error:  # the device key could not be made or kept
            self._publish(state=ServerState.ERROR, last_error=str(error))
            return self._backoff(error)

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Call the server; after a 401, authenticate again and call once more."""
        try:
            return function(*args)
        except Unauthorized as error:
            if error.path == AUTH_PATH:
                raise
            log.info("the server refused the token (%s); authenticating again", error.detail)
            self._publish(authorized=False)
        authenticate(self.client, self.identity, self.key, self.config.tenant_token)
        self._publish(authorized=True)
        return function(*args)

    def _backoff(self, error: Exception) -> float:
        self._failures += 1
        delay: float = min(
            self.config.backoff_limit, self.config.retry_interval * 2.0 ** (self._failures - 1)
        )
        log.warning("%s; trying again in %.0f s", error, delay)
        return delay

    def _succeeded(self) -> None:
        self._failures = 0
        self._publish(state=ServerState.AUTHORIZED, reachable=True, authorized=True, last_error="")

    def _step(self) -> float:
        if self.client.token is None:
            authenticate(self.client, self.identity, self.key, self.config.tenant_token)
            self._succeeded()
        if self._is_waiting():
            assert self._pending is not None
            self._advance(self._pending)
            if self._is_waiting():
                self._succeeded()
                return self.config.retry_interval
        now = self._clock()
        if now >= self._next_inventory:
            self._call(send_inventory, self.client, self._attributes())
            self._next_inventory = now + self.config.inventory_interval
        if now >= self._next_poll:
            taken = self._poll()
            wait = self.config.poll_interval if taken else self.config.retry_interval
            self._next_poll = self._clock() + wait
        self._succeeded()
        return self._delay()

    def _attributes(self) -> list[Any]:
        extra: dict[str, Value] = {}
        if self.config.inventory_dir is not None:
            extra.update(run_inventory_scripts(self.config.inventory_dir))
        extra.update(self.config.inventory)
        return collect_attributes(self.hooks.read_device(), self.identity, extra=extra)

    def _is_waiting(self) -> bool:
        """True when a deployment waits for the device (its trial, its commit, a report);
        an interrupted one waits for the next poll instead."""
        return self._pending is not None and self._pending.stage is not Stage.INTERRUPTED

    def _delay(self) -> float:
        if self._is_waiting():  # an install that waits for its trial or commit
            return self.config.retry_interval
        return max(0.0, min(self._next_poll, self._next_inventory) - self._clock())

    # -- one deployment -----------------------------------------------------------

    def _poll(self) -> bool:
        """Ask for a deployment and carry it out; False when one waits until the device
        is free (the next poll comes after retry_interval then)."""
        view = self.hooks.read_device()
        if view.phase is not Phase.IDLE:
            log.info("not checking for deployments: an update is %s", view.phase.value)
            return True
        deployment = self._call(self.api.next_deployment, view.device_provides())
        self._publish(last_poll=time.time())
        interrupted = self._interrupted_for(deployment)
        if deployment is None:
            log.debug("no deployment for this device")
            return True
        log.info("deployment %s: %s from %s", deployment.id, deployment.artifact_name,
                 deployment.uri.split("?")[0])  # fmt: skip
        self._publish(deployment_id=deployment.id, deployment_artifact=deployment.artifact_name)
        if deployment.artifact_name == view.artifact_name:
            if interrupted is not None:
                self._save(None)
            self._report_once(deployment.id, DeploymentStatus.ALREADY_INSTALLED)
            return True
        if self.hooks.begin is not None:
            try:
                self.hooks.begin(deployment)
            except StateConflict as error:
                log.info("deployment %s waits for the next poll: %s", deployment.id, error)
                if interrupted is None:
                    self._publish(deployment_id="", deployment_artifact="")
                return False
        try:
            self._start(deployment, interrupted)
        finally:
            if self.hooks.end is not None:
                self.hooks.end()
        return True

    def _interrupted_for(self, deployment: Deployment | None) -> Pending | None:
        """The interrupted deployment's record if the server handed it out again; an
        interrupted deployment the server no longer hands out is forgotten."""
        pending = self._pending
        if pending is None or pending.stage is not Stage.INTERRUPTED:
            return None
        if deployment is not None and deployment.id == pending.deployment_id:
            return pending
        log.warning("deployment %s is no longer for this device on the server; forgetting it",
                    pending.deployment_id)  # fmt: skip
        self._save(None)
        return None

    def _report_once(self, deployment_id: str, status: DeploymentStatus) -> None:
        try:
            self._call(self.api.report_status, deployment_id, status)
        except DeploymentGone as error:
            log.warning("deployment %s ended on the server: %s", deployment_id, error)
        self._publish(deployment_id="", deployment_artifact="", deployment_status=status.value)

    def _save(self, pending: Pending | None) -> None:
        self._pending = pending
        if pending is None:
            self.store.clear()
            self._publish(deployment_id="", deployment_artifact="")
        else:
            self.store.save(pending)

    def _report(self, pending: Pending, status: DeploymentStatus) -> Pending | None:
        """Report a step once; None (and the deployment forgotten) when the server ended it,
        else the record, which notes the step when the server got it.

        A step the server does not get is not worth stopping for (the API makes these
        reports optional); only the final status must arrive.
        """
        if pending.has_reported(status):
            return pending
        try:
            self._call(self.api.report_status, pending.deployment_id, status)
        except DeploymentGone as error:
            log.warning("deployment %s ended on the server (%s); stopping it",
                        pending.deployment_id, error.detail)  # fmt: skip
            self._save(None)
            return None
        except ServerError as error:
            log.warning("could not report %s, going on: %s", status.value, error)
            return pending
        self._publish(deployment_status=status.value)
        reported = replace(pending, reported=(*pending.reported, status))
        self._save(reported)
        return reported

    def _start(self, deployment: Deployment, interrupted: Pending | None) -> None:
        if interrupted is None:
            pending = Pending(
                deployment.id, deployment.artifact_name, Stage.INSTALLING, time.time()
            )
            note = f"downloading {deployment.artifact_name}"
        else:
            pending = replace(interrupted, stage=Stage.INSTALLING, started=time.time())
            note = (
                f"installing {deployment.artifact_name} again (attempt {pending.interruptions + 1})"
            )
        pending = pending.noted(log_message("INFO", note))
        self._save(pending)
        reported = self._report(pending, DeploymentStatus.DOWNLOADING)
        if reported is None:
            return
        pending = reported
        try:
            source = self.hooks.open_artifact(deployment.uri)
        except (OtadError, OSError) as error:
            self._fail(pending, f"cannot download the artifact: {error}")
            return
        try:
            reported = self._report(pending, DeploymentStatus.INSTALLING)
            if reported is None:
                return
            pending = reported.noted(log_message("INFO", "installing"))
            self._save(pending)
            self.hooks.install(source, deployment)
        except (OtadError, OSError) as error:
            self._fail(pending, f"installing {deployment.artifact_name} failed: {error}")
            return
        finally:
            _close(source)
        pending = pending.noted(log_message("INFO", "installed"))
        self._save(pending)
        self._advance(pending)

    def _fail(self, pending: Pending, message: str) -> None:
        log.error("deployment %s: %s", pending.deployment_id, message)
        failed = replace(pending.noted(log_message("ERROR", message)), stage=Stage.REPORTING,
                         final=DeploymentStatus.FAILURE)  # fmt: skip
        self._save(failed)
        self._send_final(failed)

    def _advance(self, pending: Pending) -> None:
        """Move a saved deployment on, from what the engine's record says."""
        if pending.stage is Stage.REPORTING:
            self._send_final(pending)
            return
        if pending.stage is Stage.INTERRUPTED:
            return  # installed again when the next poll hands it out
        view = self.hooks.read_device()
        if view.phase is not Phase.IDLE:
            self._advance_update(pending, view.phase)
            return
        if is_success_for(view.last, pending.artifact_name, pending.started):
            final = replace(pending, stage=Stage.REPORTING, final=DeploymentStatus.SUCCESS)
            self._save(final)
            self._send_final(final)
            return
        message = (
            view.last.message
            if view.last and view.last.time >= pending.started
            else "the update ended without an outcome (otad was interrupted)"
        )
        if pending.stage is Stage.INSTALLING and not self._was_tried(pending, view):
            self._interrupt(pending, message)
            return
        self._fail(pending, message)

    @staticmethod
    def _was_tried(pending: Pending, view: DeviceView) -> bool:
        """True when this deployment's artifact was installed and its trial then failed,
        though the record never got past installing (a power cut right after the install
        booted the trial, which fell back)."""
        return (
            view.last is not None
            and view.last.time >= pending.started
            and view.bad_artifact == pending.artifact_name
        )

    def _advance_update(self, pending: Pending, phase: Phase) -> None:
        """Move a deployment on whose update is installed or on trial."""
        if phase is Phase.INSTALLED and pending.stage is Stage.INSTALLING:
            self._reboot(pending)
        elif phase is Phase.INSTALLED and not self._reboot_asked:
            log.info("deployment %s: the reboot into %s did not happen; rebooting",
                     pending.deployment_id, pending.artifact_name)  # fmt: skip
            self._reboot(pending)
        elif phase is Phase.TRIAL and pending.stage is Stage.INSTALLING:
            # The device rebooted into the trial before this was noted (a power cut).
            reported = self._report(pending, DeploymentStatus.REBOOTING)
            if reported is not None:
                self._save(replace(reported, stage=Stage.REBOOTING))
        else:
            log.debug("deployment %s waits: the update is %s", pending.deployment_id,
                      phase.value)  # fmt: skip

    def _interrupt(self, pending: Pending, message: str) -> None:
        """An install cut short by a restart: install it again at the next poll."""
        if pending.interruptions >= self._resume_attempts:
            times = pending.interruptions + 1
            allowed = self._resume_attempts
            self._fail(pending, f"{message}; interrupted {times} times in a row, "
                                f"download.resume_attempts allows {allowed}")  # fmt: skip
            return
        log.info("deployment %s: installing %s was interrupted; it is installed again "
                 "when the server hands it out", pending.deployment_id,
                 pending.artifact_name)  # fmt: skip
        note = log_message("WARNING", f"interrupted: {message}")
        self._save(replace(pending.noted(note), stage=Stage.INTERRUPTED,
                           interruptions=pending.interruptions + 1))  # fmt: skip

    def _reboot(self, pending: Pending) -> None:
        self._reboot_asked = True
        rebooting = pending
        if pending.stage is not Stage.REBOOTING:
            rebooting = replace(pending.noted(log_message("INFO", "rebooting")),
                                stage=Stage.REBOOTING)  # fmt: skip
            self._save(rebooting)
        if self._report(rebooting, DeploymentStatus.REBOOTING) is None:
            if self.hooks.rollback is not None:
                log.info("cancelling the installed update of the aborted deployment")
                self.hooks.rollback()
            return
        log.info("rebooting into %s", pending.artifact_name)
        self.hooks.reboot()

    def _send_final(self, pending: Pending) -> None:
        assert pending.final is not None
        try:
            if pending.final is DeploymentStatus.FAILURE:
                self._call(self.api.upload_log, pending.deployment_id, pending.log)
            self._call(self.api.report_status, pending.deployment_id, pending.final)
        except DeploymentGone as error:
            log.warning("deployment %s ended on the server: %s", pending.deployment_id, error)
        self._publish(deployment_status=pending.final.value)
        self._save(None)
