"""Removable media in the daemon: watch for them, install through the Updater, keep offers.

otad.removable finds and verifies a medium's artifact; this module runs it inside the
daemon. A thread waits for media (otad.removable.MediumWatcher) and hands each to
RemovableUpdates. Installing goes through Updater.start_install, so that it is refused
as any install is (another operation runs, the booted slot is on trial) and clients see
State, Progress and Completed as for Install; the thread keeps the medium mounted until
the install ended. In announce mode a verified artifact becomes an offer, kept per
medium (its kernel name) until the medium is removed or replaced, a new artifact is
offered from it, or it was installed; `install_offered` installs one once a client
confirmed it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable
from io import BufferedReader
from pathlib import Path

from otad.artifact.streams import Readable
from otad.config import RemovableConfig
from otad.errors import DeviceError, StateConflict, UsageError
from otad.removable import (
    MEDIA_DIR,
    MediumArtifact,
    MediumFile,
    MediumPredicate,
    MediumWatcher,
    RemovableUpdates,
    is_present,
    is_removable,
)
from otad.updater import InstallOptions, Updater

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # seconds between looks at the stop flag

Offered = Callable[[MediumArtifact], None]
Started = concurrent.futures.Future[str]  # the job id, once the install started


class MediaUpdates:
    """Updates from removable media for a running Updater, on the Updater's loop."""

    def __init__(
        self,
        updater: Updater,
        config: RemovableConfig,
        *,
        predicate: MediumPredicate = is_removable,
        media_dir: Path = MEDIA_DIR,
    ) -> None:
        self.updater = updater
        self.config = config
        self.offered: Offered = lambda found: None  # the daemon points this at D-Bus
        self._predicate = predicate
        self._media_dir = media_dir
        self._offers: dict[str, MediumArtifact] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.Future[None] | None = None  # the last offer being installed

    # -- watching -------------------------------------------------------------------

    def start(self) -> None:
        """Start watching (when enabled); media inserted from now on are used."""
        if not self.config.enabled:
            log.debug("updates from removable media are disabled")
            return
        self._loop = asyncio.get_running_loop()
        updates = self._updates(InstallOptions(), None)  # checks the keys before the thread
        watcher = MediumWatcher(self._predicate)
        self._thread = threading.Thread(
            target=self._watch, args=(updates, watcher), name="otad-media", daemon=True
        )
        self._thread.start()
        log.info(
            "watching for removable media (%s events); artifacts found are %s",
            watcher.source,
            "installed" if self.config.action.value == "install" else "announced",
        )

    def _watch(self, updates: RemovableUpdates, watcher: MediumWatcher) -> None:
        try:
            with watcher:
                updates.serve(watcher, self._stop, interval=WATCH_INTERVAL)
        except Exception:
            log.exception("watching for removable media failed; media are ignored from now on")

    def stop(self) -> None:
        """Stop watching and starting installs; one that runs is the Updater's to stop."""
        self._stop.set()

    async def join(self, timeout: float) -> None:
        """Wait up to `timeout` s for the watching thread to let go of its medium."""
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
            if thread.is_alive():
                log.warning("a removable medium is still being read; it is left as it is")

    # -- offers ---------------------------------------------------------------------

    def offers(self) -> list[MediumArtifact]:
        """The artifacts on offer from media still present, by medium."""
        self._forget_gone()
        return [self._offers[name] for name in sorted(self._offers)]

    def _forget_gone(self) -> None:
        for name, offer in list(self._offers.items()):
            if not is_present(offer.medium):
                log.info("medium %s was removed; its offer of %s ends", name, offer.artifact)
                del self._offers[name]

    def _announce(self, found: MediumArtifact) -> None:  # on the watching thread
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._offer, found)

    def _offer(self, found: MediumArtifact) -> None:
        self._offers[found.medium.name] = found
        self.offered(found)

    async def install_offered(self, medium: str, options: InstallOptions) -> str:
        """Install what `medium` offers; return the job id once the install started."""
        self._forget_gone()
        offer = self._offers.get(medium)
        if offer is None:
            known = ", ".join(sorted(self._offers)) or "none"
            raise UsageError(f"no artifact is on offer from medium {medium!r} (on offer: {known})")
        started: Started = concurrent.futures.Future()
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, self._install_offered, offer, options, started)
        try:
            job = await asyncio.wrap_future(started)
        except StateConflict:
            raise  # refused for now (another operation, a trial): the offer stands
        except Exception:
            self._withdraw(offer)  # the medium does not hold it as it was offered
            raise
        self._withdraw(offer)
        return job

    def _withdraw(self, offer: MediumArtifact) -> None:
        if self._offers.get(offer.medium.name) is offer:
            del self._offers[offer.medium.name]

    def _install_offered(
        self, offer: MediumArtifact, options: InstallOptions, started: Started
    ) -> None:  # on a worker thread, for as long as the install runs
        try:
            outcome = self._updates(options, started).install_offered(offer)
            error: Exception = outcome.error or DeviceError(outcome.message)
        except Exception as unexpected:  # the caller must hear of it, not wait forever
            log.exception("installing the offer of medium %s failed", offer.medium.name)
            error = unexpected
        if not started.done():
            started.set_exception(error)

    # -- installing -----------------------------------------------------------------

    def _updates(self, options: InstallOptions, started: Started | None) -> RemovableUpdates:
        return RemovableUpdates(
            self.config,
            self.updater.trusted_keys(),
            install=functools.partial(self._install, options, started),
            announce=self._announce,
            media_dir=self._media_dir,
        )

    def _install(self, options: InstallOptions, started: Started | None, stream: Readable) -> None:
        """RemovableUpdates' install: on its thread, until the Updater's install ended."""
        assert self._loop is not None
        if self._stop.is_set():
            raise DeviceError("otad is stopping; the medium is not installed")
        if not isinstance(stream, MediumFile):
            raise DeviceError("the artifact on the medium is not an open file")
        # The Updater reads a file object of its own and closes it; the medium's
        # descriptor stays RemovableUpdates' to close once this returns.
        source = open(os.dup(stream.fileno()), "rb")  # noqa: SIM115
        running = asyncio.run_coroutine_threadsafe(
            self._install_to_end(source, options, started), self._loop
        )
        running.result()

    async def _install_to_end(
        self, source: BufferedReader, options: InstallOptions, started: Started | None
    ) -> None:
        job, task = await self.updater.start_install(source, options)
        if started is not None:
            started.set_result(job)
        error = await task
        if error is not None:
            raise error
