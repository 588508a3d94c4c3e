"""The engine installing payloads other than root filesystems: update modules and
bootstrap artifacts, on the running slot, with the real shipped modules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from otad.artifact.compression import Compression
from otad.artifact.writer import ArtifactSpec, bootstrap, module_image, write_artifact
from otad.bootloader.base import Slot
from otad.engine import MAX_RECOVERY_ATTEMPTS, Engine
from otad.errors import BootloaderError, ModuleError
from otad.modules.runner import ModuleConfig
from otad.state import Phase
from tests.conftest import KeyPair
from tests.engine.conftest import Device

SHIPPED = Path(__file__).resolve().parents[2] / "otad" / "modules" / "bin"


def _engine(device: Device, module_dir: Path, work: Path) -> Engine:
    return Engine(
        device.engine().config,
        device.bootloader,
        paths=device.kernel.paths,
        store=device.store,
        verifiers=(device.verifier,),
        modules=ModuleConfig(module_dirs=(module_dir,), work_dir=work),
    )


def _module_artifact(tmp_path: Path, keys: dict[str, KeyPair], module: str,
                     files: dict[str, bytes], meta: dict[str, str]) -> Path:  # fmt: skip
    paths = []
    for name, data in files.items():
        path = tmp_path / "payload" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    spec = ArtifactSpec(
        name="app-config-2",
        device_types=("otad-test",),
        payload=module_image(module, paths, software_version="2", meta_data=meta),
        compression=Compression.GZIP,
        signer=keys["ecdsa"].signer,
    )
    return write_artifact(spec, tmp_path / f"{module}.mender").path


def test_single_file_module_installs_and_updates_provides(
    device: Device, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    destination = tmp_path / "etc-app"
    destination.mkdir()
    (destination / "app.conf").write_text("old\n")
    artifact = _module_artifact(
        tmp_path, keys, "single-file", {"app.conf": b"new\n"}, {"dest_dir": str(destination)}
    )
    slot_b_before = device.slot_digest(Slot.B)
    engine = _engine(device, SHIPPED, tmp_path / "work")

    with artifact.open("rb") as stream:
        result = engine.install(stream)

    state = device.store.load()
    assert result.needs_reboot is False
    assert (destination / "app.conf").read_text() == "new\n"
    assert state is not None
    assert state.phase is Phase.IDLE
    assert state.last is not None
    assert state.last.success
    release = state.slots[Slot.A].release
    assert release is not None
    assert release.artifact == "app-config-2"
    assert release.provides["rootfs-image.single-file.version"] == "2"
    assert release.version == "1.0", "the root filesystem's version is unchanged"
    assert device.slot_digest(Slot.B) == slot_b_before
    assert not (tmp_path / "work" / "payloads" / "0000" / "tree").exists()


def test_failing_module_rolls_back_and_reports(
    device: Device, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    log = tmp_path / "calls"
    script = textwrap.dedent(
        f"""\
        #!/bin/sh
        echo "$1" >> {log}
        case "$1" in
            ArtifactInstall) echo "disk full" >&2; exit 1 ;;
            SupportsRollback) echo Yes ;;
        esac
        exit 0
        """
    )
    (modules / "flaky").write_text(script)
    (modules / "flaky").chmod(0o755)
    artifact = _module_artifact(tmp_path, keys, "flaky", {"blob": b"x" * 100}, {})
    engine = _engine(device, modules, tmp_path / "work")

    with artifact.open("rb") as stream, pytest.raises(ModuleError, match="disk full"):
        engine.install(stream)

    calls = log.read_text().split()
    state = device.store.load()
    assert calls == [
        "ProvidePayloadFileSizes",
        "Download",
        "ArtifactInstall",
        "SupportsRollback",
        "ArtifactRollback",
        "ArtifactFailure",
        "Cleanup",
    ]
    assert state is not None
    assert state.phase is Phase.IDLE
    assert state.last is not None
    assert not state.last.success
    release = state.slots[Slot.A].release
    assert release is not None
    assert release.artifact == "release-1"


def test_module_asking_for_a_host_reboot_commits_after_it(
    device: Device, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    log = tmp_path / "calls"
    script = (
        f'#!/bin/sh\necho "$1" >> {log}\n[ "$1" = NeedsArtifactReboot ] && echo Automatic\nexit 0\n'
    )
    (modules / "kernel-module").write_text(script)
    (modules / "kernel-module").chmod(0o755)
    artifact = _module_artifact(tmp_path, keys, "kernel-module", {"m.ko": b"elf"}, {})
    engine = _engine(device, modules, tmp_path / "work")

    with artifact.open("rb") as stream:
        result = engine.install(stream)
    waiting = device.store.load()
    device.kernel.reboot()
    recovered = _engine(device, modules, tmp_path / "work").recover()

    assert result.needs_reboot is True
    assert waiting is not None
    assert waiting.phase is Phase.INSTALLED
    assert recovered.phase is Phase.IDLE
    assert recovered.last is not None
    assert recovered.last.success
    assert log.read_text().split()[-3:] == ["ArtifactVerifyReboot", "ArtifactCommit", "Cleanup"]


def test_bootstrap_artifact_only_records_provides(
    device: Device, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    spec = ArtifactSpec(
        name="factory-provisioned",
        device_types=("otad-test",),
        payload=bootstrap(provides={"factory.batch": "42"}),
        signer=keys["ecdsa"].signer,
    )
    artifact = write_artifact(spec, tmp_path / "bootstrap.mender").path

    with artifact.open("rb") as stream:
        device.engine().install(stream)

    state = device.store.load()
    assert state is not None
    release = state.slots[Slot.A].release
    assert release is not None
    assert release.provides["factory.batch"] == "42"
    assert release.artifact == "factory-provisioned"


def test_loop_breaker_gives_up_after_repeated_failed_recoveries(
    device: Device, artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.install(artifacts["release-2"])
    # The trial request is lost (as if the bootloader write never happened), and from
    # now on every attempt to set it again fails.
    device.bootloader.mark_bad(Slot.B)

    def refuse(slot: Slot) -> None:
        raise BootloaderError(f"cannot write the environment for slot {slot.value}")

    monkeypatch.setattr(device.bootloader, "start_trial", refuse)
    for _ in range(MAX_RECOVERY_ATTEMPTS):
        with pytest.raises(BootloaderError):
            device.engine().recover()

    given_up = device.engine().recover()

    assert given_up.phase is Phase.IDLE
    assert given_up.last is not None
    assert "gave up after 3 attempts" in given_up.last.message
    assert device.bootloader.status().next_boot is Slot.A
