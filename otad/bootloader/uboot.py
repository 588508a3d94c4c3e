"""The U-Boot bootloader backend, through libubootenv's fw_printenv and fw_setenv.

The environment must be redundant (two entries in fw_env.config): each copy carries a
CRC and a generation flag, fw_setenv writes only the older copy, and U-Boot and
libubootenv read the copy whose CRC is right and whose flag is newer, so a cut write
leaves the previous environment. Every change otad makes is one fw_setenv call with a
script of several variables, hence one redundant write.

Variables: the conventional `upgrade_available`, `bootcount` and `bootlimit`, and
otad's `otad_default`, `otad_trial`, `otad_slot_a`, `otad_slot_b`. The boot script
(`render_boot_script`) counts boots while `upgrade_available=1` and boots the trial
only while `bootcount` has not passed `bootlimit`.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from otad import process
from otad.bootloader import slots
from otad.bootloader.base import Bootloader, BootStatus, Slot, SlotBootState
from otad.bootloader.cmdline import PARAMETER, PROC_CMDLINE, read_booted_slot
from otad.bootloader.slots import SlotTable
from otad.errors import BootloaderStateError, UsageError

FW_ENV_CONFIG = Path("/etc/fw_env.config")
# setexpr prints hexadecimal: keeping bootcount (at most bootlimit + 1) below 10 makes
# its hex and decimal spellings the same for `test -le`.
MAX_TRIAL_BOOTS = 8

Environment = dict[str, str]


def parse_printenv(output: str) -> Environment:
    """`name=value` lines as fw_printenv prints them."""
    env: Environment = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            env[name] = value
    return env


def table_from_env(env: Mapping[str, str], source: str) -> SlotTable:
    """otad's slot table in a U-Boot environment; BootloaderStateError if it has none."""
    default = env.get("otad_default", "")
    trial = env.get("otad_trial", "")
    if default not in ("a", "b"):
        raise BootloaderStateError(source, f"otad_default is {default!r}, expected a or b")
    if trial not in ("", "a", "b"):
        raise BootloaderStateError(source, f"otad_trial is {trial!r}, expected a, b or nothing")
    states = tuple((slot, _slot_state(env.get(f"otad_slot_{slot.value}", ""))) for slot in Slot)
    return SlotTable(Slot(default), Slot(trial) if trial else None, states)


def boots_left(env: Mapping[str, str]) -> int:
    """Trial boots the boot script still allows; 0 when no upgrade is available."""
    if env.get("upgrade_available") != "1":
        return 0
    try:
        return max(0, int(env.get("bootlimit", "0")) - int(env.get("bootcount", "0")))
    except ValueError:
        return 0


def _slot_state(value: str) -> SlotBootState:
    try:
        return SlotBootState(value)
    except ValueError:
        return SlotBootState.UNKNOWN


def _table_variables(table: SlotTable) -> Environment:
    variables = {
        "otad_default": table.default.value,
        "otad_trial": table.trial.value if table.trial else "",
    }
    for slot in Slot:
        variables[f"otad_slot_{slot.value}"] = table.state_of(slot).value
    return variables


class UBootBootloader(Bootloader):
    """Slots chosen by otad's boot script from the U-Boot environment."""

    name = "u-boot"

    def __init__(
        self,
        config: Path = FW_ENV_CONFIG,
        trial_boots: int = 3,
        cmdline: Path = PROC_CMDLINE,
    ) -> None:
        if not 1 <= trial_boots <= MAX_TRIAL_BOOTS:
            raise UsageError(f"trial_boots must be 1 to {MAX_TRIAL_BOOTS}, got {trial_boots}")
        self.config = config
        self.trial_boots = trial_boots
        self.cmdline = cmdline

    def initialize(self, default: Slot = Slot.A) -> None:
        """Add otad's variables (an empty environment is created) with `default` good."""
        variables = _table_variables(SlotTable.initial(default))
        variables |= {
            "upgrade_available": "0",
            "bootcount": "0",
            "bootlimit": str(self.trial_boots),
        }
        self._set(variables, create=True)

    def read_env(self) -> Environment:
        """The whole environment, as U-Boot would load it."""
        result = process.run(["fw_printenv", "-c", self.config])
        return parse_printenv(result.stdout.decode("utf-8", "replace"))

    def status(self) -> BootStatus:
        env = self.read_env()
        table = table_from_env(env, str(self.config))
        return BootStatus(
            booted=read_booted_slot(self.cmdline),
            default=table.default,
            trial=table.trial,
            trial_boots_left=boots_left(env) if table.trial else None,
            slots=table.slot_states(),
        )

    def start_trial(self, slot: Slot) -> None:
        table = slots.start_trial(self._table(), slot)
        variables = _table_variables(table)
        variables |= {
            "upgrade_available": "1",
            "bootcount": "0",
            "bootlimit": str(self.trial_boots),
        }
        self._set(variables)

    def mark_good(self, slot: Slot) -> None:
        table = slots.mark_good(self._table(), slot)
        self._set(_table_variables(table) | {"upgrade_available": "0", "bootcount": "0"})

    def mark_bad(self, slot: Slot) -> None:
        env = self.read_env()
        table = slots.mark_bad(table_from_env(env, str(self.config)), slot)
        variables = _table_variables(table)
        if table.trial is None:
            variables |= {"upgrade_available": "0", "bootcount": "0"}
        self._set(variables)

    def _table(self) -> SlotTable:
        return table_from_env(self.read_env(), str(self.config))

    def _set(self, variables: Mapping[str, str], create: bool = False) -> None:
        """One fw_setenv call, so one redundant write, for all of `variables`."""
        for name, value in variables.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", name) or "\n" in value:
                raise UsageError(f"{name}={value!r} cannot be written to the U-Boot environment")
        # libubootenv 0.3 reads `name=value` lines; `name=` deletes the variable.
        script = "".join(f"{name}={value}\n" for name, value in variables.items())
        with tempfile.TemporaryDirectory(prefix="otad-fw_setenv-") as temp:
            script_path = Path(temp) / "script"
            script_path.write_text(script)
            argv: list[str | Path] = ["fw_setenv", "-c", self.config, "-s", script_path]
            if create:
                # Used only when no valid copy exists yet: the environment starts empty.
                empty = Path(temp) / "empty"
                empty.write_text("")
                argv[3:3] = ["-f", empty]
            process.run(argv)


@dataclass(frozen=True)
class UBootSlotEntry:
    """How U-Boot boots one slot: `load` device and partition, PARTUUID, file paths."""

    partuuid: str
    device: str  # interface and dev:part for `load`, such as "mmc 0:2"
    kernel: str = "/boot/Image"
    fdt: str | None = None
    initrd: str | None = None


_PARTUUID = re.compile(r"[0-9A-Fa-f-]+")
_DEVICE = re.compile(r"[a-z]+ [0-9a-fA-F]+:[0-9a-fA-F]+")
_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")
_ARG = re.compile(r"[A-Za-z0-9_./,:=+@-]+")


def render_boot_script(
    entries: Mapping[Slot, UBootSlotEntry],
    kernel_args: str = "ro rootwait",
    fallback: Slot = Slot.A,
    boot_command: str = "booti",
) -> str:
    """boot.cmd source: choose the slot, count trial boots, set bootargs, boot.

    Compile it with `mkimage -A <arch> -T script -C none -d boot.cmd boot.scr`.
    """
    if set(entries) != set(Slot):
        raise UsageError("the boot script needs an entry for slot a and slot b")
    if boot_command not in ("booti", "bootz", "bootm"):
        raise UsageError(f"boot command {boot_command!r} is not booti, bootz or bootm")
    for word in kernel_args.split():
        if not _ARG.fullmatch(word):
            raise UsageError(f"kernel argument {word!r} has characters U-Boot would interpret")

    lines = [
        "# otad: choose the slot to boot. Generated by otad; do not edit.",
        'if test "${otad_default}" != a && test "${otad_default}" != b; then',
        f"    setenv otad_default {fallback.value}",
        "fi",
        "setenv otad_boot ${otad_default}",
        'if test "${upgrade_available}" = 1; then',
        '    if test -z "${bootcount}"; then setenv bootcount 0; fi',
        '    if test -z "${bootlimit}"; then setenv bootlimit 1; fi',
        "    if test ${bootcount} -le ${bootlimit}; then",
        "        setexpr bootcount ${bootcount} + 1",
        "        saveenv",
        "    fi",
        "    if test ${bootcount} -le ${bootlimit}; then",
        '        if test "${otad_trial}" = a || test "${otad_trial}" = b; then',
        "            setenv otad_boot ${otad_trial}",
        "        fi",
        "    else",
        '        echo "otad: the trial of ${otad_trial} used its ${bootlimit} boots"',
        "    fi",
        "fi",
    ]
    for index, slot in enumerate(Slot):
        keyword = "if" if index == 0 else "elif"
        lines.append(f'{keyword} test "${{otad_boot}}" = {slot.value}; then')
        lines += [f"    {line}" for line in _load_commands(slot, entries[slot], kernel_args)]
    lines += ["fi", _boot_line(entries, boot_command)]
    return "\n".join(lines) + "\n"


def _load_commands(slot: Slot, entry: UBootSlotEntry, kernel_args: str) -> list[str]:
    if not _PARTUUID.fullmatch(entry.partuuid):
        raise UsageError(f"slot {slot.value}: {entry.partuuid!r} is not a PARTUUID")
    if not _DEVICE.fullmatch(entry.device):
        raise UsageError(f"slot {slot.value}: device {entry.device!r} is not like 'mmc 0:2'")
    for path in (entry.kernel, entry.fdt, entry.initrd):
        if path is not None and not _PATH.fullmatch(path):
            raise UsageError(f"slot {slot.value}: {path!r} is not a plain absolute path")

    args = " ".join([f"root=PARTUUID={entry.partuuid}", *kernel_args.split()])
    commands = [
        f'setenv bootargs "{args} {PARAMETER}={slot.value}"',
        f"load {entry.device} ${{kernel_addr_r}} {entry.kernel}",
    ]
    if entry.fdt is not None:
        commands.append(f"load {entry.device} ${{fdt_addr_r}} {entry.fdt}")
    if entry.initrd is not None:
        commands.append(f"load {entry.device} ${{ramdisk_addr_r}} {entry.initrd}")
        commands.append("setenv otad_initrd ${ramdisk_addr_r}:${filesize}")
    else:
        commands.append("setenv otad_initrd -")
    return commands


def _boot_line(entries: Mapping[Slot, UBootSlotEntry], boot_command: str) -> str:
    with_fdt = {entry.fdt is not None for entry in entries.values()}
    if len(with_fdt) != 1:
        raise UsageError("give a device tree for both slots or for neither")
    # Without a file, boot with the device tree U-Boot itself runs on.
    fdt = "${fdt_addr_r}" if with_fdt == {True} else "${fdtcontroladdr}"
    return f"{boot_command} ${{kernel_addr_r}} ${{otad_initrd}} {fdt}"
