"""ModuleRunner against real module executables: the file tree, the two ways a module
takes its payload, every state path, timeouts and broken modules."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.reader import ArtifactReader
from otad.errors import (
    ChecksumMismatch,
    EnvironmentProblem,
    ModuleError,
    ModuleProtocolError,
    ModuleTimeout,
    UnknownPayloadType,
    UnsafePath,
)
from otad.modules.locate import find_module
from otad.modules.protocol import RebootAction
from otad.modules.runner import ModuleRunner, download_payloads
from otad.modules.streams import DownloadMode
from otad.modules.tree import tree_path
from tests.modules.conftest import (
    DEVICE,
    Setup,
    download,
    is_process_alive,
    make_artifact,
    prepare,
    run_states,
    write_module,
)

PAYLOAD = {"app.bin": os.urandom(300 * 1024) + b"tail", "empty": b"", "notes.txt": b"hello\n"}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return make_artifact(
        tmp_path, "recording", PAYLOAD, meta_data={"dest_dir": "/opt/app", "ports": [80, 443]}
    )


def test_file_tree_holds_the_headers(setup: Setup, artifact: Path) -> None:
    runner = prepare(artifact, setup.config())
    root = runner.tree.root

    assert root == tree_path(setup.work_dir, 0)
    assert (root / "version").read_text() == "3\n"
    assert (root / "current_artifact_name").read_text() == "release-0\n"
    assert (root / "current_artifact_group").read_text() == "dev\n"
    assert (root / "current_device_type").read_text() == "qemux86-64\n"
    header = root / "header"
    assert (header / "artifact_name").read_text() == "release-1"
    assert (header / "artifact_group").read_text() == ""
    assert (header / "payload_type").read_text() == "recording"
    info = json.loads((header / "header-info").read_text())
    assert info["payloads"] == [{"type": "recording"}]
    assert info["artifact_depends"]["device_type"] == ["qemux86-64"]
    type_info = json.loads((header / "type-info").read_text())
    assert type_info["type"] == "recording"
    assert type_info["artifact_provides"]["rootfs-image.recording.version"] == "1"
    # otad's own size keys are not the module's business
    assert json.loads((header / "meta-data").read_text()) == {
        "dest_dir": "/opt/app",
        "ports": [80, 443],
    }
    assert list((root / "tmp").iterdir()) == []
    assert not (root / "files").exists()


def test_a_module_that_ignores_download_gets_files(setup: Setup, artifact: Path) -> None:
    runner, mode = download(artifact, setup.config())

    assert mode is DownloadMode.FILES
    tree = runner.tree
    assert {path.name: path.read_bytes() for path in tree.files.iterdir()} == PAYLOAD
    assert not tree.stream_next.exists()
    assert not tree.streams.exists()
    assert setup.calls() == ["ProvidePayloadFileSizes", "Download"]


@pytest.mark.parametrize(
    ("sizes_answer", "state", "with_sizes"),
    [("", "Download", False), ("No\\n", "Download", False), ("Yes", "DownloadWithFileSizes", True)],
)
@pytest.mark.parametrize("compression", [Compression.NONE, Compression.XZ])
def test_a_module_that_streams_gets_every_file(
    setup: Setup,
    tmp_path: Path,
    sizes_answer: str,
    state: str,
    with_sizes: bool,
    compression: Compression,
) -> None:
    artifact = make_artifact(tmp_path, "recording", PAYLOAD, compression=compression)
    setup.environment.update(STREAM="1", ANSWER_ProvidePayloadFileSizes=sizes_answer)

    runner, mode = download(artifact, setup.config())

    assert mode is DownloadMode.STREAMS
    tree = runner.tree
    streamed = tree.tmp / "streamed"
    assert {path.name: path.read_bytes() for path in streamed.iterdir()} == PAYLOAD
    expected_lines = [
        f"streams/{name} {len(data)}" if with_sizes else f"streams/{name}"
        for name, data in PAYLOAD.items()
    ]
    assert sorted((tree.tmp / "lines").read_text().splitlines()) == sorted(expected_lines)
    assert not tree.files.exists()
    assert not tree.stream_next.exists()
    assert setup.calls() == ["ProvidePayloadFileSizes", state]


def test_a_payload_without_files_streams_nothing(setup: Setup, tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path, "recording", {})
    setup.environment["STREAM"] = "1"

    runner, mode = download(artifact, setup.config())

    assert mode is DownloadMode.STREAMS
    assert not (runner.tree.tmp / "lines").exists()


def test_download_payloads_serves_each_runner(setup: Setup, artifact: Path) -> None:
    with artifact.open("rb") as stream:
        reader = ArtifactReader(stream)
        header = reader.read_header()
        runner = ModuleRunner.prepare(header, header.payloads[0], DEVICE, setup.config())
        download_payloads([runner], reader.payload_files())
        reader.finish()

    assert sorted(path.name for path in runner.tree.files.iterdir()) == sorted(PAYLOAD)


@pytest.mark.parametrize(
    ("environment", "error", "problem"),
    [
        ({"FAIL_STATE": "Download"}, ModuleError, "exited with 3"),
        ({"FAIL_STATE": "ProvidePayloadFileSizes"}, ModuleError, "exited with 3"),
        ({"STREAM": "partial"}, ModuleProtocolError, "before reading every stream"),
        ({"ANSWER_ProvidePayloadFileSizes": "Sure"}, ModuleProtocolError, "invalid answer"),
    ],
)
def test_download_failures(
    setup: Setup,
    artifact: Path,
    environment: dict[str, str],
    error: type[ModuleError],
    problem: str,
) -> None:
    setup.environment.update(environment)
    runner = prepare(artifact, setup.config())

    with artifact.open("rb") as stream:
        reader = ArtifactReader(stream)
        reader.read_header()
        with pytest.raises(error, match=problem) as caught:
            runner.download(reader.payload_files())

    assert caught.value.state in ("ProvidePayloadFileSizes", "Download")
    if "FAIL_STATE" in environment:
        assert caught.value.exit_code == 3
        assert "failing" in caught.value.stderr
    runner.cleanup()
    assert not runner.tree.root.exists()
    assert not Path(setup.environment["TARGET"]).exists()


def test_a_corrupt_payload_stops_the_streaming_module(setup: Setup, tmp_path: Path) -> None:
    data = b"A" * 100_000
    artifact = make_artifact(tmp_path, "recording", {"app.bin": data}, compression=Compression.NONE)
    raw = bytearray(artifact.read_bytes())
    raw[raw.index(data) + 500] ^= 0xFF
    artifact.write_bytes(bytes(raw))
    setup.environment["STREAM"] = "1"

    with pytest.raises(ChecksumMismatch):
        download(artifact, setup.config())

    # the reader held back the last block: the module never had the whole file
    streamed = tree_path(setup.work_dir, 0) / "tmp" / "streamed" / "app.bin"
    assert not streamed.exists() or len(streamed.read_bytes()) < len(data)


@pytest.mark.parametrize(
    ("environment", "expected_calls", "outcome"),
    [
        (
            {},
            ["ArtifactInstall", "NeedsArtifactReboot", "ArtifactCommit", "Cleanup"],
            "committed",
        ),
        (
            {"ANSWER_NeedsArtifactReboot": "Yes\\n"},
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "ArtifactReboot",
                "ArtifactVerifyReboot",
                "ArtifactCommit",
                "Cleanup",
            ],
            "committed",
        ),
        (
            {"ANSWER_NeedsArtifactReboot": "Automatic"},
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "ArtifactVerifyReboot",
                "ArtifactCommit",
                "Cleanup",
            ],
            "committed",
        ),
        (
            {"FAIL_STATE": "ArtifactInstall", "ANSWER_SupportsRollback": "Yes"},
            [
                "ArtifactInstall",
                "SupportsRollback",
                "ArtifactRollback",
                "ArtifactFailure",
                "Cleanup",
            ],
            "failed",
        ),
        (
            {"FAIL_STATE": "ArtifactInstall"},
            ["ArtifactInstall", "SupportsRollback", "ArtifactFailure", "Cleanup"],
            "failed",
        ),
        (
            {
                "FAIL_STATE": "ArtifactVerifyReboot",
                "ANSWER_NeedsArtifactReboot": "Yes",
                "ANSWER_SupportsRollback": "Yes",
            },
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "ArtifactReboot",
                "ArtifactVerifyReboot",
                "SupportsRollback",
                "ArtifactRollback",
                "ArtifactRollbackReboot",
                "ArtifactVerifyRollbackReboot",
                "ArtifactFailure",
                "Cleanup",
            ],
            "failed",
        ),
        (
            {
                "FAIL_STATE": "ArtifactReboot",
                "ANSWER_NeedsArtifactReboot": "Yes",
                "ANSWER_SupportsRollback": "Yes",
            },
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "ArtifactReboot",
                "SupportsRollback",
                "ArtifactRollback",
                "ArtifactRollbackReboot",
                "ArtifactVerifyRollbackReboot",
                "ArtifactFailure",
                "Cleanup",
            ],
            "failed",
        ),
        (
            {"FAIL_STATE": "ArtifactCommit", "ANSWER_SupportsRollback": "Yes"},
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "ArtifactCommit",
                "SupportsRollback",
                "ArtifactRollback",
                "ArtifactFailure",
                "Cleanup",
            ],
            "failed",
        ),
        (
            {"FAIL_STATE": "ArtifactRollback", "ANSWER_SupportsRollback": "Yes\\n"},
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "ArtifactCommit",
                "Cleanup",
            ],
            "committed",
        ),
        (
            {"ANSWER_NeedsArtifactReboot": "Perhaps"},
            [
                "ArtifactInstall",
                "NeedsArtifactReboot",
                "SupportsRollback",
                "ArtifactFailure",
                "Cleanup",
            ],
            "failed",
        ),
    ],
)
def test_state_paths(
    setup: Setup,
    artifact: Path,
    environment: dict[str, str],
    expected_calls: list[str],
    outcome: str,
) -> None:
    runner, _ = download(artifact, setup.config())
    setup.log.unlink()
    setup.environment.update(environment)
    runner.config = setup.config()

    assert run_states(runner) == outcome

    assert setup.calls() == expected_calls
    assert not runner.tree.root.exists()
    target = Path(setup.environment["TARGET"])
    if environment.get("FAIL_STATE") != "ArtifactInstall":
        assert sorted(path.name for path in target.iterdir()) == sorted(PAYLOAD)
    else:
        assert not target.exists()


def test_a_failed_rollback_still_reaches_failure(setup: Setup, artifact: Path) -> None:
    runner, _ = download(artifact, setup.config())
    setup.log.unlink()
    runner.config = setup.config()
    setup.environment.update({"FAIL_STATE": "ArtifactRollback", "ANSWER_SupportsRollback": "Yes"})
    runner.install()
    runner.config = setup.config()

    with pytest.raises(ModuleError, match="ArtifactRollback: exited with 3") as caught:
        runner.rollback()
    runner.failure()
    runner.cleanup()

    assert caught.value.exit_code == 3
    assert setup.calls() == ["ArtifactInstall", "ArtifactRollback", "ArtifactFailure", "Cleanup"]


@pytest.mark.parametrize(
    ("query", "output", "problem"),
    [
        ("NeedsArtifactReboot", "Maybe", "expected one of No, Yes, Automatic"),
        ("NeedsArtifactReboot", "Yes\\nYes\\n", "expected one line"),
        ("SupportsRollback", "yes", "expected one of No, Yes"),
    ],
)
def test_invalid_query_answers(
    setup: Setup, artifact: Path, query: str, output: str, problem: str
) -> None:
    setup.environment[f"ANSWER_{query}"] = output
    runner, _ = download(artifact, setup.config())
    ask = runner.needs_reboot if query == "NeedsArtifactReboot" else runner.supports_rollback

    with pytest.raises(ModuleProtocolError, match=problem) as caught:
        ask()

    assert caught.value.state == query
    assert caught.value.exit_code == 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("", RebootAction.NO), ("No\\n", RebootAction.NO), ("Automatic\\n", RebootAction.AUTOMATIC)],
)
def test_reboot_queries(setup: Setup, artifact: Path, answer: str, expected: RebootAction) -> None:
    setup.environment["ANSWER_NeedsArtifactReboot"] = answer
    runner, _ = download(artifact, setup.config())

    assert runner.needs_reboot() is expected


@pytest.mark.parametrize(
    ("hang_state", "environment"),
    [
        ("Download", {}),
        ("Download", {"STREAM": "1"}),
        ("ArtifactInstall", {}),
        ("SupportsRollback", {}),
    ],
)
def test_a_hanging_module_is_killed(
    setup: Setup, artifact: Path, hang_state: str, environment: dict[str, str]
) -> None:
    setup.environment.update(environment)
    if hang_state != "Download":
        runner, _ = download(artifact, setup.config())
    setup.environment["HANG_STATE"] = hang_state
    setup.timeout = 0.5
    config = setup.config()

    def step() -> None:
        if hang_state == "Download":
            download(artifact, config)
            return
        runner.config = config
        if hang_state == "ArtifactInstall":
            runner.install()
        else:
            runner.supports_rollback()

    started = time.monotonic()
    with pytest.raises(ModuleTimeout, match="did not finish within 0.5 s") as caught:
        step()

    assert time.monotonic() - started < 5
    assert caught.value.state == hang_state
    assert caught.value.exit_code is None
    sleeper = int(Path(f"{setup.log}.pid").read_text())
    assert not is_process_alive(sleeper)
    assert not Path(setup.environment["TARGET"]).exists()


def test_a_module_stuck_before_reading_a_stream_times_out(setup: Setup, tmp_path: Path) -> None:
    write_module(
        setup.module_dir,
        "stuck",
        '#!/bin/sh\n[ "$1" = Download ] && cat "$2/stream-next" >/dev/null && sleep 60\nexit 0\n',
    )
    artifact = make_artifact(tmp_path, "stuck", {"big": os.urandom(1 << 20)})
    setup.timeout = 0.5

    with pytest.raises(ModuleTimeout) as caught:
        download(artifact, setup.config())

    assert caught.value.state == "Download"


def test_cleanup_removes_the_tree_even_when_it_fails(setup: Setup, artifact: Path) -> None:
    runner, _ = download(artifact, setup.config())
    setup.environment["FAIL_STATE"] = "Cleanup"
    runner.config = setup.config()

    with pytest.raises(ModuleError, match="Cleanup"):
        runner.cleanup()

    assert not runner.tree.root.exists()
    runner.cleanup()  # a second cleanup finds nothing to do
    assert setup.calls().count("Cleanup") == 1


def test_resume_finds_the_tree_after_a_reboot(setup: Setup, artifact: Path) -> None:
    runner, _ = download(artifact, setup.config())

    resumed = ModuleRunner.resume(0, "recording", setup.config())
    resumed.verify_reboot()

    assert resumed.tree == runner.tree
    assert setup.calls()[-1] == "ArtifactVerifyReboot"
    runner.tree.remove()
    with pytest.raises(EnvironmentProblem, match="is gone"):
        ModuleRunner.resume(0, "recording", setup.config())


def test_an_unknown_payload_type_is_named(setup: Setup, tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path, "no-such-module", {"a": b"a"})

    with pytest.raises(UnknownPayloadType, match="no-such-module") as caught:
        prepare(artifact, setup.config())

    assert caught.value.searched == (str(setup.module_dir),)
    assert not setup.work_dir.exists()


@pytest.mark.parametrize("payload_type", ["", ".", "..", "a/b"])
def test_unsafe_payload_types_are_refused(setup: Setup, payload_type: str) -> None:
    with pytest.raises(UnsafePath):
        find_module(payload_type, (setup.module_dir,))


def test_otad_modules_come_before_mender_modules(tmp_path: Path) -> None:
    otad, mender = tmp_path / "otad", tmp_path / "mender"
    write_module(mender, "single-file", "#!/bin/sh\n")
    write_module(mender, "other", "#!/bin/sh\n")
    write_module(otad, "single-file", "#!/bin/sh\n")
    write_module(otad, "other", "not executable").chmod(0o644)

    assert find_module("single-file", (otad, mender)) == otad / "single-file"
    assert find_module("other", (otad, mender)) == mender / "other"
