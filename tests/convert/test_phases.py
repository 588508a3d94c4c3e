"""The converter's phases one by one, on small inputs: fast, no root needed for most."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from convert import cli, image, layout, rootfs
from convert.errors import AlreadyConverted, ImageError, NotSupportedYet, TooSmall
from convert.partition import render_script
from otad.bootloader.base import Slot
from otad.config import parse_config
from otad.errors import UsageError
from tests.conftest import require_tool

MIB = 1 << 20


def _table(*partitions: dict[str, object], label: str = "gpt") -> layout.Table:
    entries: list[dict[str, object]] = []
    for partition in partitions:
        entry: dict[str, object] = {"node": f"disk.img{partition['number']}"}
        entry.update((k, v) for k, v in partition.items() if k != "number")
        entries.append(entry)
    return layout.parse_table({"partitiontable": {"label": label, "partitions": entries}})


CLOUD: tuple[dict[str, object], ...] = (
    {"number": 1, "start": 262144, "size": 3930112, "type": layout.ROOT_X86_64_TYPE},
    {"number": 14, "start": 2048, "size": 6144, "type": layout.BIOS_BOOT_TYPE},
    {"number": 15, "start": 8192, "size": 253952, "type": layout.ESP_TYPE},
)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("4K", 4096), ("100M", 100 * MIB), ("8G", 8 << 30), ("2GiB", 2 << 30)],
)
def test_sizes(text: str, size: int) -> None:
    assert cli.parse_size(text, "--storage-size") == size


def test_a_bad_size_names_the_option() -> None:
    with pytest.raises(UsageError, match="--data-size: '12X'"):
        cli.parse_size("12X", "--data-size")


def test_cloud_layout_is_recognised_and_planned() -> None:
    stock = layout.recognise(_table(*CLOUD), 2 << 30, Path("disk.img"))
    plan = layout.plan_layout(stock, 4 << 30, 128 * MIB)

    assert stock.bios_boot is not None
    assert stock.esp is not None
    assert (stock.root.number, stock.bios_boot.number, stock.esp.number) == (1, 14, 15)
    assert [p.name for p in plan.partitions] == ["esp", "bios-boot", "root-a", "root-b", "data"]
    assert plan.slot_a.size == plan.slot_b.size
    for before, after in zip(plan.partitions, plan.partitions[1:], strict=False):
        assert before.end == after.start
    assert plan.esp.start == 2048
    assert plan.data.end * 512 <= (4 << 30) - layout.GPT_TAIL * 512
    assert plan.data.bytes >= 128 * MIB
    assert len({p.uuid for p in plan.partitions}) == 5
    script = render_script(plan)
    assert f'uuid={plan.slot_b.uuid}, name="root-b"' in script


@pytest.mark.parametrize(
    ("partitions", "label", "error", "message"),
    [
        (CLOUD[:1], "gpt", ImageError, "unknown partition layout"),
        (
            ({"number": 1, "start": 2048, "size": 4096, "type": "c"},
             {"number": 2, "start": 8192, "size": 4096, "type": "83"}),
            "dos", NotSupportedYet, "Raspberry Pi and U-Boot",
        ),
        (
            ({"number": 1, "start": 1, "size": 4095, "type": "ee"},),
            "dos", ImageError, "truncated or its GPT is damaged",
        ),
        (
            (*CLOUD[1:], {"number": 1, "start": 262144, "size": 4096,
                          "type": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}),
            "gpt", NotSupportedYet, "root for arm64",
        ),
        (
            (*CLOUD, {"number": 2, "start": 9000000, "size": 4096, "type": layout.LINUX_TYPE}),
            "gpt", ImageError, "is truncated: partition 2 ends",
        ),
        (
            tuple(
                dict(p, name=n) for p, n in zip(CLOUD, ("root-a", "x", "root-b"), strict=True)
            ),
            "gpt", AlreadyConverted, "already has otad's A/B layout",
        ),
    ],
)  # fmt: skip
def test_layouts_that_are_refused(
    partitions: tuple[dict[str, object], ...], label: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        layout.recognise(_table(*partitions, label=label), 2 << 30, Path("disk.img"))


def test_a_slot_too_small_for_the_root_says_what_size_would_do() -> None:
    stock = layout.recognise(_table(*CLOUD), 2 << 30, Path("disk.img"))
    plan = layout.plan_layout(stock, 2 << 30, 128 * MIB)

    with pytest.raises(TooSmall, match=r"pass --storage-size [0-9]+M or more") as caught:
        layout.check_slot_fits(plan, plan.slot_a.bytes + 100 * MIB, 2 << 30)
    suggested = int(str(caught.value).split("--storage-size ")[1].split("M")[0]) * MIB
    bigger = layout.plan_layout(stock, suggested, 128 * MIB)
    layout.check_slot_fits(bigger, plan.slot_a.bytes + 100 * MIB, suggested)


def test_otad_conf_parses_and_names_the_slots() -> None:
    stock = layout.recognise(_table(*CLOUD), 2 << 30, Path("disk.img"))
    plan = layout.plan_layout(stock, 4 << 30, 128 * MIB)

    config = parse_config(rootfs.render_otad_conf(plan, "qemux86-64", ["a.pub", "b.pub"]))

    assert config.slots[Slot.A].root.value == plan.slot_a.uuid
    assert config.slots[Slot.B].root.value == plan.slot_b.uuid
    assert config.trusted_keys == (Path("/etc/otad/keys/a.pub"), Path("/etc/otad/keys/b.pub"))
    assert config.bootloader.backend.value == "grub"


def test_fstab_names_stable_mounts_and_keeps_the_others(tmp_path: Path) -> None:
    stock = layout.recognise(_table(*CLOUD), 2 << 30, Path("disk.img"))
    plan = layout.plan_layout(stock, 4 << 30, 128 * MIB)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/fstab").write_text(
        "# a comment\n"
        "PARTUUID=1234 / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1\n"
        "PARTUUID=5678 /boot/efi vfat umask=0077 0 0\n"
        "tmpfs /tmp tmpfs defaults 0 0\n"
    )

    rootfs.rewrite_fstab(tmp_path, plan)

    lines = (tmp_path / "etc/fstab").read_text().splitlines()
    entries = {line.split()[1]: line.split() for line in lines if not line.startswith("#")}
    assert entries["/"] == ["/dev/root", "/", "ext4", "rw,discard,errors=remount-ro", "0", "1"]
    assert entries["/boot/efi"][:4] == [
        f"PARTUUID={plan.esp.uuid}",
        "/boot/efi",
        "vfat",
        "umask=0077",
    ]
    assert entries["/data"][0] == f"PARTUUID={plan.data.uuid}"
    assert entries["/tmp"] == ["tmpfs", "/tmp", "tmpfs", "defaults", "0", "0"]
    assert "# a comment" in lines
    assert (tmp_path / "data").is_dir()


def test_kernel_arguments_come_from_etc_default_grub(tmp_path: Path) -> None:
    (tmp_path / "etc/default/grub.d").mkdir(parents=True)
    (tmp_path / "etc/default/grub").write_text(
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX="console=ttyS0,115200 root=/x"\n'
    )
    (tmp_path / "etc/default/grub.d/50-cloud.cfg").write_text(
        'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX net.ifnames=0"\n'
    )

    assert rootfs.kernel_arguments(tmp_path) == "ro quiet console=ttyS0,115200 net.ifnames=0"


def test_a_root_for_another_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    header = b"\x7fELF\x02\x01\x01" + bytes(11) + (0xB7).to_bytes(2, "little")
    (tmp_path / "usr/bin/dpkg").write_bytes(header + bytes(44))

    with pytest.raises(NotSupportedYet, match="for arm64"):
        rootfs.check_convertible(tmp_path)

    (tmp_path / "etc/otad").mkdir(parents=True)
    (tmp_path / "etc/otad/otad.conf").write_text("")
    with pytest.raises(AlreadyConverted):
        rootfs.check_convertible(tmp_path)


@pytest.mark.parametrize("tool", ["xz", "gzip", "zstd"])
def test_compressed_input_becomes_a_sparse_copy(tool: str, tmp_path: Path) -> None:
    require_tool(tool)
    raw = tmp_path / "disk.img"
    with raw.open("wb") as out:
        out.write(b"head" * 1000)
        out.seek(64 * MIB)
        out.write(b"tail")
    subprocess.run([tool, "-k", raw], check=True, capture_output=True)
    compressed = next(p for p in tmp_path.iterdir() if p.name != "disk.img")
    work = tmp_path / "work"
    work.mkdir()

    copy = image.raw_image(compressed, work)

    assert copy.parent == work
    assert copy.read_bytes() == raw.read_bytes()
    assert os.stat(copy).st_blocks * 512 < 4 * MIB


def test_a_raw_input_is_used_in_place(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(4096))

    assert image.raw_image(raw, tmp_path / "unused") == raw


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "convert.toml"
    config.write_text(
        'storage_size = "4G"\ndevice_type = "board"\nverify_key = ["/k/a.pub"]\n'
        'deb = ["/p/x.deb"]\n'
    )
    args = cli.build_parser().parse_args(
        ["in.img.xz", "-o", "out.img", "--config", str(config), "--device-type", "other"]
    )

    options = cli.options_from(args)

    assert options.storage_size == 4 << 30
    assert options.device_type == "other"
    assert options.verify_keys == (Path("/k/a.pub"),)
    assert options.debs == (Path("/p/x.deb"),)
    assert options.artifact_name == "in"
    assert options.data_size == 128 * MIB


def test_config_file_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "convert.toml"
    config.write_text('colour = "blue"\n')

    with pytest.raises(UsageError, match="'colour' is not an option"):
        cli.read_config(config)


def test_a_link_where_the_converter_writes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/dpkg").write_bytes(Path("/usr/bin/dpkg").read_bytes()[:64])
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/fstab").symlink_to("/etc/fstab")

    with pytest.raises(ImageError, match="/etc/fstab in the root filesystem is a symbolic link"):
        rootfs.check_convertible(tmp_path)
