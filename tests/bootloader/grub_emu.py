"""Runs otad's GRUB script in the real GRUB (grub-emu) over environments on a FAT image.

Each state is a directory tree (copy1/grubenv, copy2/grubenv, counter/grubenv). All of
them go onto one FAT image, which grub-emu sees as (hd0); the generated configuration
runs once per state and prints what it chose; save_env writes to the image as it would
to an EFI system partition. The counters GRUB left behind are read back.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from otad.bootloader.base import Slot
from otad.bootloader.grub import COUNTER_FILE, render_selection_script
from tests.conftest import require_tool

_RESULT = re.compile(r"OTAD-RESULT (\d+) boot=([ab]?) default=([ab]?)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class GrubChoice:
    boot: Slot
    default: Slot
    counter: bytes | None


def run_grub(
    states: list[dict[str, bytes]], work: Path, fallback: Slot = Slot.A
) -> list[GrubChoice]:
    """What GRUB chooses for each state, and the counter each state has afterwards."""
    tree = {
        f"s{index}/{name}": data
        for index, files in enumerate(states)
        for name, data in files.items()
    }
    script = []
    for index in range(len(states)):
        script.append(render_selection_script(f"(hd0)/s{index}", fallback))
        script.append(f'echo "OTAD-RESULT {index} boot=$otad_boot default=$otad_default"')
    script.append("halt")
    output, back = boot_grub(tree, "\n".join(script), work)
    found = {int(m[1]): (m[2], m[3]) for m in _RESULT.finditer(output)}
    assert sorted(found) == list(range(len(states))), output[-2000:]

    choices = []
    for index in range(len(states)):
        boot, default = found[index]
        counter = back / f"s{index}" / COUNTER_FILE
        data = counter.read_bytes() if counter.exists() else None
        choices.append(GrubChoice(Slot(boot), Slot(default), data))
    return choices


def boot_grub(files: dict[str, bytes], config: str, work: Path) -> tuple[str, Path]:
    """Run grub.cfg `config` in grub-emu with `files` on a FAT (hd0); output and files after."""
    for tool in ("grub-emu", "mkfs.vfat", "mcopy"):
        require_tool(tool)
    tree = work / "tree"
    tree.mkdir()
    for name, data in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    image = work / "esp.img"
    _run(["mkfs.vfat", "-C", str(image), str(4096 + 4 * len(files))])
    if files:
        _run(["mcopy", "-s", "-i", str(image), *map(str, sorted(tree.iterdir())), "::/"])

    grub_dir = work / "grub"
    grub_dir.mkdir()
    (grub_dir / "x86_64-emu").symlink_to("/usr/lib/grub/x86_64-emu")
    (grub_dir / "grub.cfg").write_text(config + "\n")
    device_map = work / "device.map"
    device_map.write_text(f"(hd0) {image}\n")
    output = _run(["grub-emu", "-d", str(grub_dir), "-m", str(device_map)], timeout=60)

    back = work / "back"
    _run(["mcopy", "-s", "-n", "-i", str(image), "::/", str(back)])
    return _ANSI.sub("", output).replace("\r", ""), back


def _run(argv: list[str], timeout: float = 30) -> str:
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
        env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MTOOLS_SKIP_CHECK": "1"},
    )
    assert result.returncode == 0, f"{argv}: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode("latin-1")
