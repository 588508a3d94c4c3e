"""The fleet client in the daemon: the poller on its own thread, installing through the Updater.

`FleetService.prepare` does at start everything that can fail for a reason a person must
fix (the tenant token file, the TLS files, the device key, the identity), so that a bad
[server] table stops the daemon with the key named. A device key that does not exist
yet is made later, on the poller's thread: an RSA key can take many seconds on a small
board, and the daemon must answer on D-Bus (and tell systemd it is ready) long before
that. `start` runs the poller on a thread,
so that no request to the server ever blocks the D-Bus loop; its hooks reach the Updater
on the loop's thread only:

- a deployment is taken only if the Updater can be reserved for it (`Updater.reserve`):
  while it downloads, every D-Bus or removable-media operation is refused with Busy and
  a text that names the deployment; while it installs, the install is the Updater's
  operation like any other. An install that runs when a deployment arrives makes the
  deployment wait for the next poll.
- the artifact streams from the server through HttpSource into `Updater.start_install`,
  the path an https Install takes, so Progress, State and Completed are as for it. The
  install names its deployment (`InstallOptions.deployment`), which its resume record
  keeps: the Updater does not resume such an install by itself when otad starts again;
  the poller installs the deployment again when the server hands it out again, with a
  fresh pre-signed URL, and the download resumes from the slot (otad.resume compares
  URLs without their query).
- a status change of the Updater (a commit, a rollback, an install's end) wakes the
  poller, which then reports the deployment's outcome at once.

`stop` ends the poller at its next step; an install that runs is interrupted by the
Updater's own stop (not cancelled: its resume record stays), and the deployment record
tells the next start what happened.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from otad.artifact.streams import Readable
from otad.config import Config
from otad.download import DownloadSettings, HttpSource, make_session
from otad.errors import ConfigError, KeyProblem, OtadError
from otad.fleet.auth import DeviceKey, load_device_key, read_identity, read_tenant_token
from otad.fleet.client import Client
from otad.fleet.config import KEY_FILE, TLS_KEYS, ServerConfig
from otad.fleet.deployments import Deployment
from otad.fleet.device import DeviceView, engine_view
from otad.fleet.poller import DeviceHooks, FleetStatus, Poller, ServerState, Stopped
from otad.updater import InstallOptions, ServiceState, Status, Updater, error_message

log = logging.getLogger(__name__)

T = TypeVar("T")

THREAD_NAME = "otad-fleet"


class FleetInstallFailed(OtadError):
    """An install for a deployment failed with an error otad did not raise on purpose."""


@dataclass(frozen=True)
class Prepared:
    """What the poller needs, read once at start."""

    config: ServerConfig
    tenant_token: str
    key: DeviceKey | Callable[[], DeviceKey]  # the kept key, or what makes it the first time
    identity: dict[str, str]
    directory: Path  # the deployment record's directory, on the data partition


def _check_tls_files(config: ServerConfig) -> None:
    where = "server" if config.tls_from_server else "download"
    for key in TLS_KEYS:
        path = getattr(config.tls, key)
        if isinstance(path, Path) and not path.is_file():
            raise ConfigError(f"{where}.{key}", f"names {path}, which is not a readable file")


def prepare(config: Config) -> Prepared | None:
    """Read what [server] refers to; None when otad.conf has no [server] (no fleet)."""
    server = config.server
    if server is None:
        return None
    _check_tls_files(server)
    token = read_tenant_token(server)
    identity = read_identity(server)
    directory = config.data_dir / "fleet"
    path = server.device_key or directory / KEY_FILE
    key: DeviceKey | Callable[[], DeviceKey]
    if path.exists():
        key = load_device_key(path, server.key_type)
    else:
        try:  # where the key will go must work now, while a person watches the start
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise KeyProblem(
                f"cannot make the directory of the device key {path}: {error.strerror}"
            ) from None
        log.info("no device key yet: the fleet client makes one (%s) in %s",
                 server.key_type.value, path)  # fmt: skip
        key = functools.partial(load_device_key, path, server.key_type)
    log.info("managed by the Mender server %s as %s", server.url,
             ", ".join(f"{name}={value}" for name, value in sorted(identity.items())))  # fmt: skip
    return Prepared(server, token, key, identity, directory)


class FleetService:
    """Runs the poller for the daemon; create it on the loop's thread."""

    def __init__(
        self,
        prepared: Prepared,
        updater: Updater,
        *,
        download: DownloadSettings | None,
        reboot: Callable[[], object],
        on_status: Callable[[FleetStatus], None],
    ) -> None:
        self.updater = updater
        self._loop = asyncio.get_running_loop()
        self._download = download or DownloadSettings()
        self._reboot = reboot
        self._on_status = on_status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: ServiceState | None = None
        config = prepared.config
        client = Client(config.url, session=make_session(config.tls))
        client_config = replace(config, tenant_token=prepared.tenant_token, tenant_token_file=None)
        hooks = DeviceHooks(
            read_device=self._read_device,
            open_artifact=self._open_artifact,
            install=self._install,
            reboot=self._reboot_device,
            rollback=self._rollback,
            begin=self._begin,
            end=self._end,
        )
        self.poller = Poller(
            client_config,
            client,
            prepared.key,
            prepared.identity,
            hooks,
            prepared.directory,
            on_status=self._status_from_thread,
            resume_attempts=self._download.resume_attempts,
        )

    @property
    def status(self) -> FleetStatus:
        return self.poller.status

    # -- running --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.poller.run(self._stop)
        except Exception:
            # A bug: the daemon goes on serving D-Bus and local installs without a server.
            log.exception("the fleet client failed; it stays stopped until otad restarts")
            text = "internal error in the fleet client (see the log)"
            failed = replace(self.poller.status, state=ServerState.ERROR, last_error=text)
            self._status_from_thread(failed)

    def stop(self) -> None:
        """Ask the poller to stop (it ends at its next step or hook)."""
        self._stop.set()
        self.poller.wake()

    async def join(self, timeout: float) -> None:
        """Wait up to `timeout` s for the poller's thread; a request in flight is left to
        time out on its own (the thread does not keep the process alive)."""
        thread = self._thread
        if thread is None:
            return
        await self._loop.run_in_executor(None, thread.join, timeout)
        if thread.is_alive():
            log.warning("the fleet client did not stop within %.0f s; leaving it", timeout)
        self.poller.close()

    def status_changed(self, status: Status) -> None:
        """The Updater's news (on the loop): a change of state moves a deployment on."""
        if status.state is not self._state:
            self._state = status.state
            self.poller.wake()

    def _status_from_thread(self, status: FleetStatus) -> None:
        self._loop.call_soon_threadsafe(self._on_status, status)

    # -- the poller's hooks (on the poller's thread) ------------------------------------

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        if self._stop.is_set():
            work.close()
            raise Stopped()
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _read_device(self) -> DeviceView:
        return engine_view(self.updater.engine)

    def _open_artifact(self, uri: str) -> Readable:
        return HttpSource(uri, self._download, cancel=self._stop)

    def _begin(self, deployment: Deployment) -> None:
        reason = (
            f"deployment {deployment.id} ({deployment.artifact_name}) from the Mender "
            "server is in progress"
        )
        self._on_loop(self._reserve(reason))

    async def _reserve(self, reason: str) -> None:
        self.updater.reserve(reason)

    def _end(self) -> None:
        self._on_loop(self._release())

    async def _release(self) -> None:
        self.updater.release()

    def _install(self, source: Readable, deployment: Deployment) -> None:
        assert isinstance(source, HttpSource)
        error = self._on_loop(self._run_install(source, deployment))
        if error is None:
            return
        if self._stop.is_set():
            raise Stopped()
        if isinstance(error, (OtadError, OSError)):
            raise error
        raise FleetInstallFailed(error_message(error))

    async def _run_install(self, source: HttpSource, deployment: Deployment) -> Exception | None:
        # No await between the release and the claim in start_install: nothing else can
        # take the Updater in between.
        self.updater.release()
        options = InstallOptions(deployment=deployment.id)
        _job, task = await self.updater.start_install(source, options)
        return await task

    def _reboot_device(self) -> None:
        try:
            self._reboot()
        except OtadError as error:
            log.error("cannot reboot into the installed update: %s", error)

    def _rollback(self) -> None:
        try:
            self._on_loop(self.updater.rollback(reboot=False))
        except OtadError as error:
            log.error("cannot cancel the installed update: %s", error)
