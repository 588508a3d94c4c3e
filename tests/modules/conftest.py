"""Fixtures for the update module tests: artifacts through the real writer and reader,
small test modules written as shell scripts, and an engine-like walk through the states."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.headers import MetaDataValue
from otad.artifact.reader import ArtifactReader
from otad.artifact.writer import ArtifactSpec, module_image, write_artifact
from otad.errors import ModuleError
from otad.modules.process import Limits
from otad.modules.protocol import RebootAction
from otad.modules.runner import ModuleConfig, ModuleRunner
from otad.modules.streams import DownloadMode
from otad.modules.tree import DeviceContext

SHIPPED = Path(__file__).resolve().parents[2] / "otad" / "modules" / "bin"
DEVICE = DeviceContext(device_type="qemux86-64", artifact_name="release-0", artifact_group="dev")

# A module that records every call in $OTAD_TEST_LOG and behaves as the environment says:
# FAIL_STATE fails that state, HANG_STATE sleeps in it, ANSWER_<State> is printed
# verbatim for a query, STREAM=1 reads the streams in Download (STREAM=partial: only the
# first line of stream-next), and ArtifactInstall copies what arrived to $TARGET.
RECORDING_MODULE = textwrap.dedent(
    r"""
    #!/bin/sh
    state="$1"
    tree="$2"
    echo "$state" >> "$OTAD_TEST_LOG"
    if [ "$state" = "${HANG_STATE:-}" ]; then
        sleep 60 &
        echo $! > "$OTAD_TEST_LOG.pid"
        wait
    fi
    if [ "$state" = "${FAIL_STATE:-}" ]; then
        echo "failing $state on purpose" >&2
        exit 3
    fi
    eval "answer=\${ANSWER_$state:-}"
    [ -n "$answer" ] && printf "$answer"
    case "$state" in
        Download|DownloadWithFileSizes)
            [ "$(pwd)" = "$tree" ] || exit 9
            case "${STREAM:-}" in
                1)
                    mkdir -p "$tree/tmp/streamed"
                    while :; do
                        line=$(cat "$tree/stream-next")
                        [ -z "$line" ] && break
                        echo "$line" >> "$tree/tmp/lines"
                        name=${line%% *}
                        cat "$tree/$name" > "$tree/tmp/streamed/${name#streams/}"
                    done
                    ;;
                partial)
                    cat "$tree/stream-next" > /dev/null
                    ;;
            esac
            ;;
        ArtifactInstall)
            mkdir -p "$TARGET"
            if [ -d "$tree/files" ]; then cp "$tree"/files/* "$TARGET"/; fi
            if [ -d "$tree/tmp/streamed" ]; then cp "$tree"/tmp/streamed/* "$TARGET"/; fi
            ;;
    esac
    exit 0
    """
).lstrip()


def write_module(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def make_artifact(
    directory: Path,
    module: str,
    files: Mapping[str, bytes],
    meta_data: Mapping[str, MetaDataValue] | None = None,
    provides: Mapping[str, str] | None = None,
    compression: Compression = Compression.GZIP,
) -> Path:
    """A module-image artifact written by otad's writer, with `files` as its payload."""
    source = directory / "payload-files"
    source.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        (source / name).write_bytes(data)
        paths.append(source / name)
    spec = ArtifactSpec(
        name="release-1",
        device_types=("qemux86-64",),
        payload=module_image(
            module, paths, software_version="1", meta_data=meta_data, provides=provides
        ),
        compression=compression,
    )
    return write_artifact(spec, directory / f"{module}.mender").path


@dataclass
class Setup:
    """A module directory, a work directory and the environment the modules get."""

    root: Path
    environment: dict[str, str] = field(default_factory=dict)
    timeout: float = 20.0

    @property
    def module_dir(self) -> Path:
        return self.root / "modules"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def log(self) -> Path:
        return self.root / "calls.log"

    def calls(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def config(self, module_dirs: Sequence[Path] | None = None) -> ModuleConfig:
        return ModuleConfig(
            module_dirs=tuple(module_dirs or (self.module_dir,)),
            work_dir=self.work_dir,
            limits=Limits(timeout=self.timeout, kill_grace=1.0),
            environment={"OTAD_TEST_LOG": str(self.log), **self.environment},
        )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    result = Setup(tmp_path)
    write_module(result.module_dir, "recording", RECORDING_MODULE)
    result.environment["TARGET"] = str(tmp_path / "target")
    return result


def prepare(artifact: Path, config: ModuleConfig) -> ModuleRunner:
    """Read the artifact's header and lay out the file tree of its one payload."""
    with artifact.open("rb") as stream:
        header = ArtifactReader(stream).read_header()
    return ModuleRunner.prepare(header, header.payloads[0], DEVICE, config)


def download(artifact: Path, config: ModuleConfig) -> tuple[ModuleRunner, DownloadMode]:
    """Prepare and run the download phase from the reader, then finish the reader."""
    with artifact.open("rb") as stream:
        reader = ArtifactReader(stream)
        header = reader.read_header()
        runner = ModuleRunner.prepare(header, header.payloads[0], DEVICE, config)
        mode = runner.download(reader.payload_files())
        reader.finish()
    return runner, mode


Step = Callable[[], object]


def run_states(runner: ModuleRunner) -> str:
    """Walk the states after Download as the v3 protocol orders them, as an engine would.

    Returns "committed" or "failed" (after rollback and failure states), having always
    run Cleanup. The module's own record of its calls is what the tests compare.
    """
    reboot = RebootAction.NO
    try:
        runner.install()
        reboot = runner.needs_reboot()
        if reboot is RebootAction.YES:
            runner.reboot()
        if reboot is not RebootAction.NO:
            runner.verify_reboot()
        runner.commit()
    except ModuleError:
        _recover(runner, reboot)
        return "failed"
    finally:
        _ignore_failure(runner.cleanup)
    return "committed"


def _recover(runner: ModuleRunner, reboot: RebootAction) -> None:
    try:
        if runner.supports_rollback():
            runner.rollback()
            if reboot is RebootAction.YES:
                runner.rollback_reboot()
            if reboot is not RebootAction.NO:
                runner.verify_rollback_reboot()
    except ModuleError:
        pass
    _ignore_failure(runner.failure)


def _ignore_failure(step: Step) -> None:
    with contextlib.suppress(ModuleError):
        step()


def is_process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its parent counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
