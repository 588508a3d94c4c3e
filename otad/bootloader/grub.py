"""The GRUB bootloader backend (x86 EFI and BIOS).

State lives in a directory on the partition GRUB reads (the EFI system partition,
mounted at /boot/efi on the device) as three GRUB environment blocks, each in its own
directory so that no directory entry is shared between them:

    copy1/grubenv, copy2/grubenv   two copies of the slot table, written only by otad
    counter/grubenv                the trial's boot counter, which GRUB decrements

A copy carries a sequence number as its first variable and again as its last
(`otad_seq`, `otad_seq_end`). otad always overwrites the older copy in place, so a cut
write damages only that one, and the mix of new and old bytes it leaves never shows two
equal sequence numbers. GRUB and otad both discard such a copy and use the valid copy
with the higher sequence.

The counter belongs to one trial (`otad_count_id` first and last, equal to the copy's
`otad_trial_id`) and holds the boots left as one digit. GRUB's save_env rewrites the
block in place with the same size, so a decrement changes that single byte: cut, the
counter reads either the old or the new value. GRUB boots the trial only after it has
saved the decrement and read it back; a counter that is missing, torn or belongs to
another trial counts as spent, and the default boots.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from otad.bootloader import slots
from otad.bootloader.base import Bootloader, BootStatus, Slot, SlotBootState
from otad.bootloader.cmdline import PARAMETER, PROC_CMDLINE, read_booted_slot
from otad.bootloader.durable import overwrite_in_place, read_bytes, write_atomically
from otad.bootloader.grubenv import format_env_block, parse_env_block
from otad.bootloader.slots import SlotTable
from otad.errors import BootloaderStateError, UsageError

COPY_FILES = ("copy1/grubenv", "copy2/grubenv")
COUNTER_FILE = "counter/grubenv"
MAX_TRIAL_BOOTS = 9  # the counter is one digit, so GRUB's in-place save keeps its size

_SEQ = re.compile(r"[1-9][0-9]*")
_SLOT = re.compile(r"[ab]")
_TRIAL = re.compile(r"[ab]?")
_DIGIT = re.compile(r"[0-9]")


@dataclass(frozen=True)
class EnvCopy:
    """One copy of the slot table; `trial_id` ties a pending trial to its counter."""

    seq: int
    table: SlotTable
    trial_id: int | None


def serialize_copy(copy: EnvCopy) -> bytes:
    table = copy.table
    variables = [
        ("otad_seq", str(copy.seq)),
        ("otad_default", table.default.value),
        ("otad_trial", table.trial.value if table.trial else ""),
        ("otad_trial_id", str(copy.trial_id) if copy.trial_id is not None else ""),
    ]
    variables += [(f"otad_slot_{slot.value}", table.state_of(slot).value) for slot in Slot]
    variables.append(("otad_seq_end", str(copy.seq)))
    return format_env_block(variables)


def parse_copy(data: bytes | None) -> EnvCopy | None:
    """The copy in `data`, or None when GRUB's script discards it (same rules)."""
    parsed = parse_env_block(data) if data is not None else None
    if parsed is None:
        return None
    values = dict(parsed)
    seq = values.get("otad_seq", "")
    default = values.get("otad_default", "")
    trial = values.get("otad_trial", "")
    if not _SEQ.fullmatch(seq) or seq != values.get("otad_seq_end", ""):
        return None
    if not _SLOT.fullmatch(default) or not _TRIAL.fullmatch(trial):
        return None

    states = tuple((slot, _slot_state(values.get(f"otad_slot_{slot.value}", ""))) for slot in Slot)
    trial_id = values.get("otad_trial_id", "")
    table = SlotTable(Slot(default), Slot(trial) if trial else None, states)
    return EnvCopy(int(seq), table, int(trial_id) if _SEQ.fullmatch(trial_id) else None)


def serialize_counter(trial_id: int, boots_left: int) -> bytes:
    if not 0 <= boots_left <= MAX_TRIAL_BOOTS:
        raise ValueError(f"boots left must be 0 to {MAX_TRIAL_BOOTS}, got {boots_left}")
    return format_env_block(
        [
            ("otad_count_id", str(trial_id)),
            ("otad_count_left", str(boots_left)),
            ("otad_count_id_end", str(trial_id)),
        ]
    )


def parse_counter(data: bytes | None, trial_id: int) -> int:
    """Boots left for trial `trial_id`; 0 when the counter is missing, torn or another's."""
    parsed = parse_env_block(data) if data is not None else None
    if parsed is None:
        return 0
    values = dict(parsed)
    expected = str(trial_id)
    if values.get("otad_count_id") != expected or values.get("otad_count_id_end") != expected:
        return 0
    left = values.get("otad_count_left", "")
    return int(left) if _DIGIT.fullmatch(left) else 0


def newest_copy_index(copies: tuple[EnvCopy | None, EnvCopy | None]) -> int | None:
    """Which copy GRUB uses: the valid one with the higher sequence, copy 1 on a tie."""
    first, second = copies
    if second is not None and (first is None or second.seq > first.seq):
        return 1
    return 0 if first is not None else None


def _slot_state(value: str) -> SlotBootState:
    try:
        return SlotBootState(value)
    except ValueError:
        return SlotBootState.UNKNOWN


class GrubBootloader(Bootloader):
    """Slots chosen by otad's GRUB script from environment blocks in `env_dir`."""

    name = "grub"

    def __init__(self, env_dir: Path, trial_boots: int = 3, cmdline: Path = PROC_CMDLINE) -> None:
        if not 1 <= trial_boots <= MAX_TRIAL_BOOTS:
            raise UsageError(f"trial_boots must be 1 to {MAX_TRIAL_BOOTS}, got {trial_boots}")
        self.env_dir = env_dir
        self.trial_boots = trial_boots
        self.cmdline = cmdline

    def initialize(self, default: Slot = Slot.A) -> None:
        """Write a fresh environment in which `default` is good and boots."""
        table = SlotTable.initial(default)
        for name in (*COPY_FILES, COUNTER_FILE):
            (self.env_dir / name).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.env_dir / COUNTER_FILE, serialize_counter(0, 0))
        for seq, name in enumerate(COPY_FILES, start=1):
            write_atomically(self.env_dir / name, serialize_copy(EnvCopy(seq, table, None)))

    def status(self) -> BootStatus:
        copy = self._read_copies()[1]
        left = None
        if copy.table.trial is not None:
            counter = read_bytes(self.env_dir / COUNTER_FILE)
            left = parse_counter(counter, copy.trial_id) if copy.trial_id is not None else 0
        return BootStatus(
            booted=read_booted_slot(self.cmdline),
            default=copy.table.default,
            trial=copy.table.trial,
            trial_boots_left=left,
            slots=copy.table.slot_states(),
        )

    def start_trial(self, slot: Slot) -> None:
        index, copy = self._read_copies()
        table = slots.start_trial(copy.table, slot)
        seq = copy.seq + 1
        # The counter first: until the copy naming this trial is written, GRUB ignores it.
        overwrite_in_place(self.env_dir / COUNTER_FILE, serialize_counter(seq, self.trial_boots))
        self._write_copy(1 - index, EnvCopy(seq, table, seq))

    def mark_good(self, slot: Slot) -> None:
        index, copy = self._read_copies()
        self._write_copy(1 - index, EnvCopy(copy.seq + 1, slots.mark_good(copy.table, slot), None))

    def mark_bad(self, slot: Slot) -> None:
        index, copy = self._read_copies()
        table = slots.mark_bad(copy.table, slot)
        trial_id = copy.trial_id if table.trial is not None else None
        self._write_copy(1 - index, EnvCopy(copy.seq + 1, table, trial_id))

    def _read_copies(self) -> tuple[int, EnvCopy]:
        copies = (
            parse_copy(read_bytes(self.env_dir / COPY_FILES[0])),
            parse_copy(read_bytes(self.env_dir / COPY_FILES[1])),
        )
        index = newest_copy_index(copies)
        if index is None:
            raise BootloaderStateError(
                str(self.env_dir), f"neither {COPY_FILES[0]} nor {COPY_FILES[1]} is a valid copy"
            )
        copy = copies[index]
        assert copy is not None
        return index, copy

    def _write_copy(self, index: int, copy: EnvCopy) -> None:
        overwrite_in_place(self.env_dir / COPY_FILES[index], serialize_copy(copy))


@dataclass(frozen=True)
class GrubSlotEntry:
    """How GRUB boots one slot: the GRUB device holding its kernel, and its PARTUUID.

    `device` is a GRUB device such as "(hd0,gpt3)", or one whose disk is a GRUB
    variable set earlier in the config, such as "(${otad_disk},gpt3)".
    """

    partuuid: str
    device: str
    kernel: str = "/boot/vmlinuz"
    initrd: str | None = "/boot/initrd.img"


_PARTUUID = re.compile(r"[0-9A-Fa-f-]+")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_./,:()+=@-]+")
_VARIABLE_DEVICE = re.compile(r"\(\$\{[A-Za-z_][A-Za-z0-9_]*\}(,[A-Za-z0-9]+)*\)")


def render_selection_script(env_dir: str, fallback: Slot = Slot.A) -> str:
    """GRUB script that sets `otad_boot` (a or b) and `otad_default` from the environment.

    `env_dir` is the GRUB path of the directory the backend writes, such as
    "($root)/otad" or "(hd0,gpt1)/otad"; `fallback` boots when no copy is valid (a
    device whose environment was never written).
    """
    if '"' in env_dir or "\\" in env_dir or "\n" in env_dir:
        raise UsageError(f"GRUB path {env_dir!r} must not contain quotes or backslashes")
    copies = [f'"{env_dir}/{name}"' for name in COPY_FILES]
    counter = f'"{env_dir}/{COUNTER_FILE}"'
    decrements = "\n".join(
        f'        if [ "$otad_count_left" = {n} ]; then set otad_count_next={n - 1}; fi'
        for n in range(1, MAX_TRIAL_BOOTS + 1)
    )
    return f"""\
# otad: choose the slot to boot. Generated by otad; do not edit.
function otad_load_copy {{
    unset otad_seq
    unset otad_default
    unset otad_trial
    unset otad_trial_id
    unset otad_seq_end
    set otad_copy_ok=0
    if load_env --skip-sig --file "$1" \\
            otad_seq otad_default otad_trial otad_trial_id otad_seq_end; then
        if regexp '^[1-9][0-9]*$' "$otad_seq"; then
            if [ "$otad_seq" = "$otad_seq_end" ]; then
                if regexp '^[ab]$' "$otad_default"; then
                    if regexp '^[ab]?$' "$otad_trial"; then set otad_copy_ok=1; fi
                fi
            fi
        fi
    fi
}}
function otad_load_counter {{
    unset otad_count_id
    unset otad_count_left
    unset otad_count_id_end
    set otad_count_ok=0
    if load_env --skip-sig --file "$1" otad_count_id otad_count_left otad_count_id_end; then
        if [ "$otad_count_id" = "$otad_trial_id" ]; then
            if [ "$otad_count_id_end" = "$otad_trial_id" ]; then set otad_count_ok=1; fi
        fi
    fi
}}
function otad_spend_trial_boot {{
    if regexp '^[1-9][0-9]*$' "$otad_trial_id"; then
        otad_load_counter "$1"
    else
        set otad_count_ok=0
    fi
    if [ "$otad_count_ok" = 1 ]; then
        set otad_count_next=
{decrements}
        if [ -n "$otad_count_next" ]; then
            set otad_count_left="$otad_count_next"
            if save_env --file "$1" otad_count_left; then
                otad_load_counter "$1"
                if [ "$otad_count_ok" = 1 ]; then
                    if [ "$otad_count_left" = "$otad_count_next" ]; then
                        set otad_boot="$otad_trial"
                    fi
                fi
            fi
        fi
    fi
}}
set otad_best=
otad_load_copy {copies[0]}
if [ "$otad_copy_ok" = 1 ]; then
    set otad_best=1
    set otad_best_seq="$otad_seq"
fi
otad_load_copy {copies[1]}
if [ "$otad_copy_ok" = 1 ]; then
    if [ -z "$otad_best" ]; then
        set otad_best=2
    elif [ "$otad_seq" -gt "$otad_best_seq" ]; then
        set otad_best=2
    fi
fi
if [ "$otad_best" = 1 ]; then otad_load_copy {copies[0]}; fi
if [ "$otad_best" = 2 ]; then otad_load_copy {copies[1]}; fi
if [ -z "$otad_best" ]; then
    set otad_default={fallback.value}
    set otad_trial=
fi
set otad_boot="$otad_default"
if [ -n "$otad_trial" ]; then otad_spend_trial_boot {counter}; fi
"""


def render_grub_config(
    env_dir: str,
    entries: Mapping[Slot, GrubSlotEntry],
    kernel_args: str = "ro",
    fallback: Slot = Slot.A,
    timeout: int = 0,
) -> str:
    """A grub.cfg fragment: the selection script, then one menu entry per slot.

    Each entry boots its slot's kernel with `root=PARTUUID=...`, `kernel_args` and
    `otad.slot=a|b`; the chosen slot is the menu default and, during a trial, the
    default slot is GRUB's fallback entry.
    """
    if set(entries) != set(Slot):
        raise UsageError("the GRUB configuration needs an entry for slot a and slot b")
    if timeout < 0:
        raise UsageError(f"timeout must not be negative, got {timeout}")
    for word in kernel_args.split():
        _check_word("kernel argument", word)

    parts = [
        render_selection_script(env_dir, fallback),
        'set default="otad-$otad_boot"',
        'if [ "$otad_boot" != "$otad_default" ]; then set fallback="otad-$otad_default"; fi',
        f"set timeout={timeout}",
    ]
    parts += [_render_entry(slot, entries[slot], kernel_args) for slot in Slot]
    return "\n".join(parts) + "\n"


def _render_entry(slot: Slot, entry: GrubSlotEntry, kernel_args: str) -> str:
    if not _PARTUUID.fullmatch(entry.partuuid):
        raise UsageError(f"slot {slot.value}: {entry.partuuid!r} is not a PARTUUID")
    if _VARIABLE_DEVICE.fullmatch(entry.device):
        device = f'"{entry.device}"'  # double quotes: GRUB expands the variable
    else:
        _check_word("GRUB device", entry.device)
        device = f"'{entry.device}'"
    _check_word("kernel path", entry.kernel)
    command_line = " ".join(
        [f"root=PARTUUID={entry.partuuid}", *kernel_args.split(), f"{PARAMETER}={slot.value}"]
    )
    lines = [
        f"menuentry 'otad slot {slot.value.upper()}' --id otad-{slot.value} {{",
        f"    set root={device}",
        f"    linux {entry.kernel} {command_line}",
    ]
    if entry.initrd is not None:
        _check_word("initrd path", entry.initrd)
        lines.append(f"    initrd {entry.initrd}")
    lines.append("}")
    return "\n".join(lines)


def _check_word(what: str, word: str) -> None:
    if not _SAFE_WORD.fullmatch(word):
        raise UsageError(f"{what} {word!r} has characters GRUB would interpret")
