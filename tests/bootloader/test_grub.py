"""GRUB backend: the environment format against grub-editenv, the boot logic in grub-emu.

The oracle is the real GRUB: grub-editenv for the block format and its parser, and
grub-emu running the generated script over the environments on a FAT image, with GRUB's
own load_env and save_env. Every write the backend makes is cut at every byte.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from otad.bootloader import grub
from otad.bootloader.base import Slot, SlotBootState
from otad.bootloader.grub import (
    COPY_FILES,
    COUNTER_FILE,
    GrubBootloader,
    GrubSlotEntry,
    render_grub_config,
)
from otad.bootloader.grubenv import format_env_block, parse_env_block
from otad.errors import BootloaderError, BootloaderStateError, SlotConflict, UsageError
from tests.bootloader.grub_emu import boot_grub, run_grub
from tests.bootloader.tearing import (
    WriteRecorder,
    distinct,
    key,
    restore,
    snapshot,
    torn_states,
)
from tests.conftest import require_tool

Operation = Callable[[GrubBootloader], None]


def make_backend(tmp_path: Path, booted: Slot = Slot.A) -> GrubBootloader:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"BOOT_IMAGE=/boot/vmlinuz root=PARTUUID=x ro otad.slot={booted.value}\n")
    backend = GrubBootloader(tmp_path / "esp" / "otad", trial_boots=3, cmdline=cmdline)
    backend.initialize(Slot.A)
    return backend


def workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def apply_grub_boot(backend: GrubBootloader, tmp_path: Path, name: str) -> Slot:
    """Boot once in grub-emu: GRUB's counter write lands in the backend's directory."""
    choice = run_grub([snapshot(backend.env_dir)], workdir(tmp_path, name))[0]
    if choice.counter is not None:
        (backend.env_dir / COUNTER_FILE).write_bytes(choice.counter)
    backend.cmdline.write_text(f"otad.slot={choice.boot.value}\n")
    return choice.boot


@pytest.mark.parametrize(
    "variables",
    [
        [],
        [("otad_seq", "1"), ("otad_default", "a"), ("otad_trial", "")],
        [("name", "with\\backslash"), ("multi", "line\nvalue")],
    ],
)
def test_block_is_what_grub_editenv_writes(
    tmp_path: Path, variables: list[tuple[str, str]]
) -> None:
    editenv = require_tool("grub-editenv")
    path = tmp_path / "grubenv"
    subprocess.run([editenv, str(path), "create"], check=True)
    for name, value in variables:
        subprocess.run([editenv, str(path), "set", f"{name}={value}"], check=True)

    assert format_env_block(variables) == path.read_bytes()
    assert parse_env_block(path.read_bytes()) == variables


def test_initialized_environment_boots_default(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)

    status = backend.status()

    assert (status.booted, status.default, status.trial) == (Slot.A, Slot.A, None)
    assert status.slots == {Slot.A: SlotBootState.GOOD, Slot.B: SlotBootState.UNKNOWN}
    assert run_grub([snapshot(backend.env_dir)], workdir(tmp_path, "w"))[0].boot is Slot.A


def test_trial_spends_boots_then_falls_back(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    assert backend.status().trial_boots_left == 3

    booted = [apply_grub_boot(backend, tmp_path, f"boot{n}") for n in range(5)]

    assert booted == [Slot.B, Slot.B, Slot.B, Slot.A, Slot.A]
    status = backend.status()
    assert (status.default, status.trial, status.trial_boots_left) == (Slot.A, Slot.B, 0)
    backend.mark_bad(Slot.B)
    assert backend.status().slots == {Slot.A: SlotBootState.GOOD, Slot.B: SlotBootState.BAD}
    assert apply_grub_boot(backend, tmp_path, "after-bad") is Slot.A


def test_commit_keeps_the_trial_slot(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    assert apply_grub_boot(backend, tmp_path, "trial") is Slot.B
    assert backend.status().is_trial_boot

    backend.mark_good(Slot.B)

    status = backend.status()
    assert (status.booted, status.default, status.trial, status.is_trial_boot) == (
        Slot.B,
        Slot.B,
        None,
        False,
    )
    assert [apply_grub_boot(backend, tmp_path, f"boot{n}") for n in range(4)] == [Slot.B] * 4


def test_missing_environment_boots_the_fallback(tmp_path: Path) -> None:
    backend = GrubBootloader(tmp_path / "otad", cmdline=tmp_path / "cmdline")
    (tmp_path / "otad").mkdir()

    with pytest.raises(BootloaderStateError, match="neither copy1/grubenv nor copy2/grubenv"):
        backend.status()
    (tmp_path / "w").mkdir()
    assert run_grub([{}], tmp_path / "w", fallback=Slot.B)[0].boot is Slot.B


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        (lambda b: b.start_trial(Slot.A), SlotConflict),
        (lambda b: b.mark_bad(Slot.A), SlotConflict),
    ],
)
def test_refused_requests_leave_the_environment(
    tmp_path: Path, operation: Operation, error: type[Exception]
) -> None:
    backend = make_backend(tmp_path)
    before = snapshot(backend.env_dir)

    with pytest.raises(error):
        operation(backend)

    assert snapshot(backend.env_dir) == before


def prepare_fresh(backend: GrubBootloader) -> None:
    del backend


def prepare_trial(backend: GrubBootloader) -> None:
    backend.start_trial(Slot.B)


def prepare_failed_trial(backend: GrubBootloader) -> None:
    backend.start_trial(Slot.B)
    backend.mark_bad(Slot.B)


def prepare_seq_rollover(backend: GrubBootloader) -> None:
    for _ in range(3):
        backend.start_trial(Slot.B)
        backend.mark_bad(Slot.B)
    backend.start_trial(Slot.B)
    backend.mark_good(Slot.B)  # seq 10 now, copy 2 holds 10 and copy 1 holds 9


CASES: list[tuple[str, Callable[[GrubBootloader], None], Operation]] = [
    ("start trial", prepare_fresh, lambda b: b.start_trial(Slot.B)),
    ("commit trial", prepare_trial, lambda b: b.mark_good(Slot.B)),
    ("reject trial", prepare_trial, lambda b: b.mark_bad(Slot.B)),
    ("retry after failure", prepare_failed_trial, lambda b: b.start_trial(Slot.B)),
    ("trial across seq 10", prepare_seq_rollover, lambda b: b.start_trial(Slot.A)),
    ("roll back committed", prepare_seq_rollover, lambda b: b.mark_bad(Slot.B)),
]


@pytest.mark.parametrize(
    ("prepare", "operation"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cut_write_boots_a_good_slot(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: Callable[[GrubBootloader], None],
    operation: Operation,
) -> None:
    backend = make_backend(tmp_path)
    prepare(backend)
    before_status = backend.status()
    before = snapshot(backend.env_dir)
    recorder = WriteRecorder(monkeypatch, grub, backend.env_dir)
    operation(backend)
    after_status = backend.status()
    assert recorder.writes, "the operation wrote nothing"
    assert all(write.in_place for write in recorder.writes)

    states = [files for _, _, files in torn_states(before, recorder.writes)]
    views: dict[tuple[tuple[str, bytes], ...], tuple[Slot, Slot]] = {}
    for files in states:
        restore(backend.env_dir, files)
        status = backend.status()
        views[key(files)] = (status.next_boot, status.default)
        assert status.default in (before_status.default, after_status.default)

    unique = distinct(states)
    (tmp_path / "grub").mkdir()
    choices = run_grub(unique, tmp_path / "grub")

    allowed = {before_status.next_boot, after_status.next_boot}
    for files, choice in zip(unique, choices, strict=True):
        assert choice.boot in allowed
        assert (choice.boot, choice.default) == views[key(files)]


def test_cut_counter_decrement_boots_the_trial(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    before = snapshot(backend.env_dir)
    (tmp_path / "first").mkdir()
    after = run_grub([before], tmp_path / "first")[0].counter
    assert after is not None
    old = before[COUNTER_FILE]
    assert sum(a != b for a, b in zip(old, after, strict=True)) == 1

    states = [{**before, COUNTER_FILE: after[:cut] + old[cut:]} for cut in range(len(after) + 1)]
    for files in states:
        restore(backend.env_dir, files)
        assert backend.status().trial_boots_left in (3, 2)
    (tmp_path / "torn").mkdir()
    choices = run_grub(distinct(states), tmp_path / "torn")

    assert [choice.boot for choice in choices] == [Slot.B, Slot.B]


def test_parser_reads_torn_blocks_as_grub_editenv_does(tmp_path: Path) -> None:
    editenv = require_tool("grub-editenv")
    backend = make_backend(tmp_path)
    old = (backend.env_dir / COPY_FILES[1]).read_bytes()
    backend.start_trial(Slot.B)
    new = (backend.env_dir / COPY_FILES[1]).read_bytes()
    blocks = distinct([{"x": new[:cut] + old[cut:]} for cut in range(len(new) + 1)])
    blocks += [{"x": b"# GRUB Environment Block\nbroken=\\"}, {"x": b"# GRUB Env"}]

    path = tmp_path / "torn"
    for block in blocks:
        path.write_bytes(block["x"])
        listed = subprocess.run([editenv, str(path), "list"], capture_output=True, check=False)
        parsed = parse_env_block(block["x"])
        if listed.returncode != 0:
            assert parsed is None
        else:
            assert parsed is not None
            expected = "".join(f"{name}={value}\n" for name, value in parsed)
            assert listed.stdout.decode("latin-1") == expected


@pytest.mark.parametrize("damage", [b"", b"garbage", b"# GRUB Environment Block\n", bytes(1024)])
def test_status_on_damaged_files_raises_only_otad_errors(tmp_path: Path, damage: bytes) -> None:
    backend = make_backend(tmp_path)
    for name in (*COPY_FILES, COUNTER_FILE):
        (backend.env_dir / name).write_bytes(damage)

    with pytest.raises(BootloaderError):
        backend.status()


def test_generated_menu_boots_the_chosen_slot(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.start_trial(Slot.B)
    entries = {
        Slot.A: GrubSlotEntry("0fc63daf-0001", "(hd0)", "/boot/vmlinuz", "/boot/initrd.img"),
        Slot.B: GrubSlotEntry("0fc63daf-0002", "(hd0)", "/boot/vmlinuz", "/boot/initrd.img"),
    }
    config = render_grub_config("(hd0)/otad", entries, kernel_args="ro quiet")
    # grub-emu has no Linux loader: stand-ins print what the menu entry would load.
    stubs = (
        'function linux { echo "LINUX $*"; }\n'
        'function initrd { echo "INITRD $*"; echo "FALLBACK=$fallback"; halt; }\n'
    )
    files = {f"otad/{name}": data for name, data in snapshot(backend.env_dir).items()}

    output, back = boot_grub(files, stubs + config, workdir(tmp_path, "w"))

    assert "LINUX /boot/vmlinuz root=PARTUUID=0fc63daf-0002 ro quiet otad.slot=b" in output
    assert "INITRD /boot/initrd.img" in output
    assert "FALLBACK=otad-a" in output
    assert b"otad_count_left=2" in (back / "otad" / COUNTER_FILE).read_bytes()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (GrubSlotEntry("not a uuid", "(hd0,gpt2)"), "is not a PARTUUID"),
        (GrubSlotEntry("0fc6", "(hd0,gpt2)'; reboot"), "GRUB device"),
        (GrubSlotEntry("0fc6", "(hd0,gpt2)", kernel="/vmlinuz $x"), "kernel path"),
    ],
)
def test_generator_refuses_unsafe_values(entry: GrubSlotEntry, message: str) -> None:
    good = GrubSlotEntry("0fc6", "(hd0,gpt3)")
    with pytest.raises(UsageError, match=message):
        render_grub_config("/otad", {Slot.A: entry, Slot.B: good})
