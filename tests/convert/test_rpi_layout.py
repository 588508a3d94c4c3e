"""The Raspberry Pi layout's pieces that need no image: cmdline.txt, the MBR plan, emulation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from convert import emulation, mbr, rpi
from convert.errors import AlreadyConverted, EmulationMissing, ImageError, TooSmall
from convert.layout import MIB, Partition, Table
from tests.conftest import require_tool

STOCK = Table("dos", 512, (Partition(1, 8192, 131072, "C"), Partition(2, 139264, 1703936, "83")))


@pytest.mark.parametrize(
    ("text", "expected", "removed"),
    [
        (
            "console=serial0,115200 root=PARTUUID=4e639091-02 rootwait quiet "
            "init=/usr/lib/raspberrypi-sys-mods/firstboot splash\n",
            "console=serial0,115200 root=PARTUUID=ab-05 rootwait quiet splash\n",
            ("init=/usr/lib/raspberrypi-sys-mods/firstboot",),
        ),
        (
            "root=/dev/mmcblk0p2 init=/usr/lib/raspi-config/init_resize.sh rw",
            "root=PARTUUID=ab-05 rw\n",
            ("init=/usr/lib/raspi-config/init_resize.sh",),
        ),
        (  # Debian's Pi images: root by label, no init=
            "console=tty0 root=LABEL=RASPIROOT rw fsck.repair=yes cma=64M rootwait",
            "console=tty0 root=PARTUUID=ab-05 rw fsck.repair=yes cma=64M rootwait\n",
            (),
        ),
        ("init=/sbin/my-init root=x", "init=/sbin/my-init root=PARTUUID=ab-05\n", ()),
    ],
)
def test_cmdline_keeps_everything_but_the_resizing_init(
    text: str, expected: str, removed: tuple[str, ...]
) -> None:
    change = rpi.clean_cmdline(text, "PARTUUID=ab-05")

    assert change.text == expected
    assert change.first_boot_text == expected  # no first run asked for
    assert change.removed == removed


def test_imagers_first_run_is_only_for_the_first_boot() -> None:
    first_run = (
        "systemd.run=/boot/firmware/firstrun.sh systemd.run_success_action=reboot "
        "systemd.unit=kernel-command-line.target"
    )
    change = rpi.clean_cmdline(f"quiet {first_run} splash", "PARTUUID=ab-05")

    assert change.text == "root=PARTUUID=ab-05 quiet splash\n"
    assert change.first_boot_text == f"root=PARTUUID=ab-05 quiet {first_run} splash\n"


def test_first_boot_files_are_split_off(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    (boot / "overlays").mkdir(parents=True)
    for name in ("config.txt", "cmdline.txt", "firstrun.sh", "SSH", "user-data", "kernel8.img"):
        (boot / name).write_text(name)

    moved = rpi.split_first_boot_files(boot, tmp_path / "first")

    assert sorted(moved) == ["SSH", "firstrun.sh", "user-data"]
    assert sorted(p.name for p in boot.iterdir()) == [
        "cmdline.txt", "config.txt", "kernel8.img", "overlays"
    ]  # fmt: skip
    assert (tmp_path / "first/SSH").read_text() == "SSH"


def test_an_empty_cmdline_is_refused() -> None:
    with pytest.raises(ImageError, match="cmdline.txt is empty"):
        rpi.clean_cmdline(" \n", "PARTUUID=ab-05")


def test_the_plan_fits_four_primary_partitions_and_sfdisk_writes_it(tmp_path: Path) -> None:
    require_tool("sfdisk")
    stock = mbr.recognise(STOCK, 1 << 30, Path("pi.img"))
    plan = mbr.plan_layout(stock, 1600 * MIB, 128 * MIB, disk_id="0badcafe")
    image = tmp_path / "disk.img"

    mbr.create_disk(image, plan)

    value = json.loads(subprocess.run(["sfdisk", "--json", image], capture_output=True,
                                      check=True).stdout)["partitiontable"]  # fmt: skip
    assert value["id"] == "0x0badcafe"
    sizes = {int(e["node"][len(str(image)):]): (e["start"], e["size"], e["type"])
             for e in value["partitions"]}  # fmt: skip
    assert [sizes[n][2] for n in range(1, 8)] == ["c", "c", "c", "5", "83", "83", "83"]
    for part in plan.partitions:
        assert sizes[part.number][:2] == (part.start, part.size)
        assert part.uuid == f"0badcafe-{part.number:02d}"
    assert sizes[2][1] == sizes[3][1] == 131072
    assert plan.data.end * 512 == 1600 * MIB


def test_too_small_storage_is_refused() -> None:
    stock = mbr.recognise(STOCK, 1 << 30, Path("pi.img"))
    with pytest.raises(TooSmall, match="no room for two slots"):
        mbr.plan_layout(stock, 200 * MIB, 128 * MIB)


@pytest.mark.parametrize(
    ("partitions", "error", "message"),
    [
        ((Partition(1, 8192, 1000, "c"),), ImageError, "expected a FAT boot partition 1"),
        (
            (Partition(1, 8192, 1000, "83"), Partition(2, 9216, 1000, "c")),
            ImageError,
            "expected a FAT boot partition 1",
        ),  # fmt: skip
        (
            tuple(
                Partition(n, 2048 * n, 1024, t)
                for n, t in enumerate(["c", "c", "c", "5", "83", "83", "83"], 1)
            ),
            AlreadyConverted,
            "already has otad's Raspberry Pi A/B layout",
        ),  # fmt: skip
        (
            (Partition(1, 8192, 1000, "c"), Partition(2, 9216, 1 << 30, "83")),
            ImageError,
            "truncated",
        ),  # fmt: skip
    ],
)
def test_unknown_pi_layouts_are_refused(
    partitions: tuple[Partition, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mbr.recognise(Table("dos", 512, partitions), 1 << 30, Path("pi.img"))


def test_an_interpreter_without_the_f_flag_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "register").write_text("")
    (tmp_path / "qemu-aarch64").write_text(
        "enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: P\noffset 0\n"
    )
    monkeypatch.setattr(emulation, "BINFMT", tmp_path)
    monkeypatch.setattr(emulation, "host_architecture", lambda: "amd64")

    with pytest.raises(EmulationMissing, match="without the F flag"):
        emulation.enable("arm64", tmp_path)


def test_an_unregistered_interpreter_names_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "register").write_text("")
    monkeypatch.setattr(emulation, "BINFMT", tmp_path)
    monkeypatch.setattr(emulation, "host_architecture", lambda: "amd64")
    monkeypatch.setattr("shutil.which", lambda name: None)

    with pytest.raises(EmulationMissing, match="qemu-user-static and binfmt-support"):
        emulation.enable("armhf", tmp_path)
