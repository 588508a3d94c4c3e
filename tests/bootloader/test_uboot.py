"""U-Boot backend against the real libubootenv (fw_printenv, fw_setenv) on a redundant
environment kept in two files, and the boot script compiled by mkimage.

U-Boot itself does not run here (no sandbox build in Debian), so the boot script's
decision is a small Python model, `model_boot`, that follows boot.cmd line by line; the
environment it decides on is always the one the real fw_printenv reads, which picks
the copy with a good CRC and the newer flag exactly as U-Boot does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.uboot import (
    Environment,
    UBootBootloader,
    UBootSlotEntry,
    render_boot_script,
)
from otad.errors import BootloaderError, OtadError, SlotConflict, UsageError
from tests.bootloader.tearing import distinct
from tests.conftest import require_tool

ENV_SIZE = 0x1000
Operation = Callable[[UBootBootloader], object]


def model_boot(env: Environment, fallback: Slot = Slot.A) -> tuple[Slot, Environment]:
    """What boot.cmd boots on `env`, and the environment after its saveenv (a model)."""
    env = dict(env)
    if env.get("otad_default") not in ("a", "b"):
        env["otad_default"] = fallback.value
    boot = env["otad_default"]
    if env.get("upgrade_available") == "1":
        env.setdefault("bootcount", "0")
        env.setdefault("bootlimit", "1")
        if int(env["bootcount"]) <= int(env["bootlimit"]):
            env["bootcount"] = format(int(env["bootcount"], 16) + 1, "x")  # setexpr is hex
        if int(env["bootcount"]) <= int(env["bootlimit"]) and env.get("otad_trial") in ("a", "b"):
            boot = env["otad_trial"]
    return Slot(boot), env


def make_backend(tmp_path: Path) -> UBootBootloader:
    require_tool("fw_printenv")
    require_tool("fw_setenv")
    lines = []
    for name in ("env1", "env2"):
        (tmp_path / name).write_bytes(bytes(ENV_SIZE))
        lines.append(f"{tmp_path / name} 0x0 {ENV_SIZE:#x}\n")
    (tmp_path / "fw_env.config").write_text("".join(lines))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=PARTUUID=x otad.slot=a\n")
    backend = UBootBootloader(tmp_path / "fw_env.config", trial_boots=3, cmdline=cmdline)
    backend.initialize(Slot.A)
    return backend


def boot_once(backend: UBootBootloader) -> Slot:
    """Power on: the model decides, its saveenv goes through fw_setenv like U-Boot's."""
    env = backend.read_env()
    slot, after = model_boot(env)
    if after != env:
        backend._set({k: v for k, v in after.items() if env.get(k) != v})
    backend.cmdline.write_text(f"otad.slot={slot.value}\n")
    return slot


def env_files(tmp_path: Path) -> dict[str, bytes]:
    return {name: (tmp_path / name).read_bytes() for name in ("env1", "env2")}


def test_initialized_environment(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)

    env = backend.read_env()
    status = backend.status()

    assert {k: env[k] for k in ("otad_default", "upgrade_available", "bootcount")} == {
        "otad_default": "a",
        "upgrade_available": "0",
        "bootcount": "0",
    }
    assert (status.booted, status.default, status.trial) == (Slot.A, Slot.A, None)
    assert status.slots == {Slot.A: SlotBootState.GOOD, Slot.B: SlotBootState.UNKNOWN}


def test_trial_counts_boots_then_falls_back(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    assert backend.status().trial_boots_left == 3

    booted = [boot_once(backend) for _ in range(5)]

    assert booted == [Slot.B, Slot.B, Slot.B, Slot.A, Slot.A]
    status = backend.status()
    assert (status.trial, status.trial_boots_left, status.next_boot) == (Slot.B, 0, Slot.A)
    backend.mark_bad(Slot.B)
    assert backend.read_env()["upgrade_available"] == "0"
    assert backend.status().slots[Slot.B] is SlotBootState.BAD


def test_commit_after_trial_boot(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    assert boot_once(backend) is Slot.B
    assert backend.status().is_trial_boot

    backend.mark_good(Slot.B)

    status = backend.status()
    assert (status.default, status.trial, status.is_trial_boot) == (Slot.B, None, False)
    assert [boot_once(backend) for _ in range(3)] == [Slot.B] * 3


def test_each_change_is_one_redundant_write(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    before = env_files(tmp_path)

    backend.start_trial(Slot.B)

    after = env_files(tmp_path)
    assert [name for name in before if before[name] != after[name]] in (["env1"], ["env2"])


CASES: list[tuple[str, list[Operation], Operation]] = [
    ("start trial", [], lambda b: b.start_trial(Slot.B)),
    ("commit", [lambda b: b.start_trial(Slot.B)], lambda b: b.mark_good(Slot.B)),
    ("reject", [lambda b: b.start_trial(Slot.B)], lambda b: b.mark_bad(Slot.B)),
    ("count a boot", [lambda b: b.start_trial(Slot.B)], boot_once),
]


@pytest.mark.parametrize(
    ("prepare", "operation"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cut_write_boots_a_good_slot(
    tmp_path: Path, prepare: list[Operation], operation: Operation
) -> None:
    backend = make_backend(tmp_path)
    for step in prepare:
        step(backend)
    before_env, before_files = backend.read_env(), env_files(tmp_path)
    operation(backend)
    after_env, after_files = backend.read_env(), env_files(tmp_path)
    changed = [name for name in before_files if before_files[name] != after_files[name]]
    assert len(changed) == 1
    name = changed[0]
    old, new = before_files[name], after_files[name]

    states = distinct([{name: new[:cut] + old[cut:]} for cut in range(len(new) + 1)])
    assert len(states) > 10, "the write changed too little to be a real environment write"
    allowed = {model_boot(before_env)[0], model_boot(after_env)[0]}
    for files in states:
        (tmp_path / name).write_bytes(files[name])
        env = backend.read_env()
        assert env in (before_env, after_env)
        status = backend.status()
        assert model_boot(env)[0] is status.next_boot
        assert status.next_boot in allowed


@pytest.mark.parametrize("damage", [b"", b"\xff" * ENV_SIZE, bytes(ENV_SIZE)])
def test_status_on_damaged_environment_raises_only_otad_errors(
    tmp_path: Path, damage: bytes
) -> None:
    backend = make_backend(tmp_path)
    for name in ("env1", "env2"):
        (tmp_path / name).write_bytes(damage)

    with pytest.raises(OtadError):
        backend.status()


def test_refused_request_leaves_the_environment(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    before = env_files(tmp_path)

    with pytest.raises(SlotConflict):
        backend.mark_bad(Slot.A)

    assert env_files(tmp_path) == before
    assert isinstance(SlotConflict("x"), BootloaderError)


def test_boot_script_compiles_with_mkimage(tmp_path: Path) -> None:
    mkimage = require_tool("mkimage")
    dumpimage = require_tool("dumpimage")
    entries = {
        Slot.A: UBootSlotEntry(
            "1a2b-02", "mmc 0:2", "/boot/Image", "/boot/board.dtb", "/boot/initrd"
        ),
        Slot.B: UBootSlotEntry(
            "1a2b-03", "mmc 0:3", "/boot/Image", "/boot/board.dtb", "/boot/initrd"
        ),
    }
    source = tmp_path / "boot.cmd"
    source.write_text(render_boot_script(entries, kernel_args="ro rootwait quiet"))
    image = tmp_path / "boot.scr"

    subprocess.run(
        [mkimage, "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-d", source, image],
        check=True,
        capture_output=True,
    )

    listing = subprocess.run([dumpimage, "-l", image], check=True, capture_output=True, text=True)
    assert "Script" in listing.stdout
    text = source.read_text()
    assert 'setenv bootargs "root=PARTUUID=1a2b-03 ro rootwait quiet otad.slot=b"' in text
    assert "load mmc 0:2 ${kernel_addr_r} /boot/Image" in text
    assert text.rstrip().endswith("booti ${kernel_addr_r} ${otad_initrd} ${fdt_addr_r}")
    # mkimage only wraps the text; the model above stands for what the script decides.
    assert image.read_bytes().endswith(source.read_bytes())


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (UBootSlotEntry("zz;reset", "mmc 0:2"), "is not a PARTUUID"),
        (UBootSlotEntry("1a2b", "mmc 0:2; reset"), "is not like"),
        (UBootSlotEntry("1a2b", "mmc 0:2", kernel="Image"), "plain absolute path"),
    ],
)
def test_generator_refuses_unsafe_values(entry: UBootSlotEntry, message: str) -> None:
    good = UBootSlotEntry("1a2b-03", "mmc 0:3")
    with pytest.raises(UsageError, match=message):
        render_boot_script({Slot.A: entry, Slot.B: good})
