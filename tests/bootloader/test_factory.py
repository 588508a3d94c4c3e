"""otad.conf's [bootloader] table builds the backend it names, or says what is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from otad.bootloader import make_bootloader
from otad.bootloader.file import FileBootloader
from otad.bootloader.grub import GrubBootloader
from otad.bootloader.rpi import RpiTrybootBootloader
from otad.bootloader.uboot import UBootBootloader
from otad.config import BackendName, BootloaderConfig
from otad.errors import ConfigError


@pytest.mark.parametrize(
    ("backend", "options", "kind"),
    [
        (BackendName.GRUB, {"env_dir": "/boot/efi/EFI/otad"}, GrubBootloader),
        (BackendName.UBOOT, {}, UBootBootloader),
        (
            BackendName.RPI_TRYBOOT,
            {"boot_dir": "/boot/firmware", "partition_a": 2, "partition_b": 3},
            RpiTrybootBootloader,
        ),
        (BackendName.FILE, {"path": "/tmp/bootloader.json", "trial_boots": 2}, FileBootloader),
    ],
)
def test_backends(backend: BackendName, options: dict[str, Any], kind: type) -> None:
    assert isinstance(make_bootloader(BootloaderConfig(backend, options)), kind)


@pytest.mark.parametrize(
    ("backend", "options", "key", "fragment"),
    [
        (BackendName.GRUB, {}, "bootloader.env_dir", "required"),
        (BackendName.GRUB, {"env_dir": 3}, "bootloader.env_dir", "must be a str"),
        (
            BackendName.GRUB,
            {"env_dir": "/e", "colour": "red"},
            "bootloader.colour",
            "not a setting",
        ),
        (
            BackendName.RPI_TRYBOOT,
            {"boot_dir": "/b", "partition_a": 2},
            "bootloader.partition_b",
            "required",
        ),
    ],
)
def test_bad_options_name_the_key(
    backend: BackendName, options: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment) as caught:
        make_bootloader(BootloaderConfig(backend, options))

    assert caught.value.key == key
