"""ModuleRunner: one payload's update module, driven state by state by the update engine.

The engine creates a runner per module payload (`ModuleRunner.prepare`), feeds it the
payload's files from the artifact reader (`download`), calls `finish()` on the reader,
and then walks the states in the order the v3 protocol gives:

    install, needs_reboot, [reboot], [verify_reboot], commit, cleanup

and on an error after install has started, when `supports_rollback()`:

    rollback, [rollback_reboot, verify_rollback_reboot], failure, cleanup

(without rollback support: failure, cleanup). A failed download is followed by cleanup
only. After a reboot the engine gets the runner back with `ModuleRunner.resume`, since
the file tree is kept on the data partition. Every state method raises ModuleError
(ModuleTimeout, ModuleProtocolError) when the module fails it; the runner itself keeps
no state beyond the file tree, so the engine's own state record says where it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from otad.artifact.reader import ArtifactHeader, Payload, PayloadFile
from otad.errors import EnvironmentProblem, UsageError
from otad.modules import protocol, streams
from otad.modules.locate import DEFAULT_MODULE_DIRS, find_module
from otad.modules.process import Limits, ModuleCall
from otad.modules.protocol import RebootAction, State
from otad.modules.streams import DownloadMode
from otad.modules.tree import DeviceContext, FileTree, create_tree, tree_path

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = Path("/data/otad/modules/v3")

_T = TypeVar("_T")


@dataclass(frozen=True)
class ModuleConfig:
    """Where modules and their file trees live, and how long a state may take.

    `environment` is added to each module's environment (tests point the deb module
    at a throwaway root with it).
    """

    module_dirs: tuple[Path, ...] = DEFAULT_MODULE_DIRS
    work_dir: Path = DEFAULT_WORK_DIR
    limits: Limits = field(default_factory=Limits)
    environment: Mapping[str, str] = field(default_factory=dict)


class ModuleRunner:
    """Calls one update module for one payload, through that payload's file tree."""

    def __init__(self, module: Path, tree: FileTree, config: ModuleConfig) -> None:
        self.module = module
        self.tree = tree
        self.config = config

    @classmethod
    def prepare(
        cls, header: ArtifactHeader, payload: Payload, device: DeviceContext, config: ModuleConfig
    ) -> ModuleRunner:
        """Find the module for `payload` and lay out a fresh file tree for it.

        Raises UnknownPayloadType when no module of that name is installed.
        """
        if payload.type is None:
            raise UsageError("an empty (bootstrap) payload has no update module")
        module = find_module(payload.type, config.module_dirs)
        root = tree_path(config.work_dir, payload.index)
        tree = create_tree(root, header, payload, device)
        log.info("payload %d (%s) is installed by %s", payload.index, payload.type, module)
        return cls(module, tree, config)

    @classmethod
    def resume(cls, payload_index: int, payload_type: str, config: ModuleConfig) -> ModuleRunner:
        """The runner of a payload whose tree an earlier run (before a reboot) prepared."""
        module = find_module(payload_type, config.module_dirs)
        tree = FileTree(tree_path(config.work_dir, payload_index))
        if not tree.exists():
            raise EnvironmentProblem(f"the module file tree {tree.root} is gone")
        return cls(module, tree, config)

    # -- download --------------------------------------------------------------------

    def download(self, files: Iterable[PayloadFile]) -> DownloadMode:
        """Run ProvidePayloadFileSizes and Download (or DownloadWithFileSizes).

        `files` are this payload's files as the reader yields them; all of them are
        consumed. The caller must still call the reader's `finish()` before install.
        """
        started = time.monotonic()
        with_sizes = self._ask(State.PROVIDE_PAYLOAD_FILE_SIZES, protocol.parse_yes_no)
        state = State.DOWNLOAD_WITH_FILE_SIZES if with_sizes else State.DOWNLOAD
        streams.prepare_streams(self.tree)
        with self._start(state) as call:
            mode = streams.serve(call, self.tree, files, with_sizes)
        log.info(
            "%s: %s took its payload as %s in %.1f s",
            self.module.name,
            state.value,
            mode.value,
            time.monotonic() - started,
        )
        return mode

    # -- the action states ---------------------------------------------------------

    def install(self) -> None:
        self._act(State.ARTIFACT_INSTALL)

    def reboot(self) -> None:
        """ArtifactReboot: only when needs_reboot() answered YES."""
        self._act(State.ARTIFACT_REBOOT)

    def verify_reboot(self) -> None:
        self._act(State.ARTIFACT_VERIFY_REBOOT)

    def commit(self) -> None:
        self._act(State.ARTIFACT_COMMIT)

    def rollback(self) -> None:
        self._act(State.ARTIFACT_ROLLBACK)

    def rollback_reboot(self) -> None:
        self._act(State.ARTIFACT_ROLLBACK_REBOOT)

    def verify_rollback_reboot(self) -> None:
        self._act(State.ARTIFACT_VERIFY_ROLLBACK_REBOOT)

    def failure(self) -> None:
        self._act(State.ARTIFACT_FAILURE)

    def cleanup(self) -> None:
        """Cleanup, then delete the file tree, even when Cleanup fails.

        Without a tree (already cleaned up) there is nothing to do, as under Mender.
        """
        if not self.tree.exists():
            return
        try:
            self._act(State.CLEANUP)
        finally:
            self.tree.remove()

    # -- the query states ----------------------------------------------------------

    def needs_reboot(self) -> RebootAction:
        return self._ask(State.NEEDS_ARTIFACT_REBOOT, protocol.parse_reboot_action)

    def supports_rollback(self) -> bool:
        return self._ask(State.SUPPORTS_ROLLBACK, protocol.parse_yes_no)

    # -- calling the module -------------------------------------------------------

    def _start(self, state: State) -> ModuleCall:
        if not self.tree.exists():
            raise EnvironmentProblem(
                f"{state.value}: the module file tree {self.tree.root} is gone"
            )
        return ModuleCall(
            self.module, state, self.tree.root, self.config.limits, self.config.environment
        )

    def _act(self, state: State) -> None:
        log.info("%s: %s", self.module.name, state.value)
        with self._start(state) as call:
            call.wait()

    def _ask(self, state: State, parse: Callable[[State, bytes], _T]) -> _T:
        with self._start(state) as call:
            output = call.wait()
            try:
                answer = parse(state, output)
            except ValueError as error:
                raise call.protocol_error(f"invalid answer: {error}") from None
        log.info("%s: %s answered %s", self.module.name, state.value, answer)
        return answer


def download_payloads(runners: Sequence[ModuleRunner], files: Iterable[PayloadFile]) -> None:
    """Run the download of every payload of an artifact, in order, from one file stream.

    `runners[i]` serves payload i; a payload without files still gets its Download call.
    """
    pending = _Peekable(iter(files))
    for index, runner in enumerate(runners):
        runner.download(pending.take_payload(index))
    if (left := pending.peek()) is not None:
        raise UsageError(f"payload {left.payload.index} has files but no module runner")


class _Peekable:
    def __init__(self, iterator: Iterator[PayloadFile]) -> None:
        self._iterator = iterator
        self._head: PayloadFile | None = None

    def peek(self) -> PayloadFile | None:
        if self._head is None:
            self._head = next(self._iterator, None)
        return self._head

    def take_payload(self, index: int) -> Iterator[PayloadFile]:
        while (head := self.peek()) is not None and head.payload.index == index:
            self._head = None
            yield head
