"""Bootloader backends: how otad asks a bootloader which slot boots and starts a trial.

`make_bootloader()` builds the backend that otad.conf's [bootloader] table names, with
that table's keys as the backend's settings:

    backend = "grub"          env_dir (required), trial_boots (default 3)
    backend = "uboot"         fw_env_config (default /etc/fw_env.config), trial_boots
    backend = "rpi-tryboot"   boot_dir (where autoboot.txt lives, required),
                              partition_a, partition_b (boot partition numbers, required)
    backend = "file"          path (required), trial_boots: for tests only
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otad.bootloader.base import Bootloader, Slot
from otad.errors import ConfigError

if TYPE_CHECKING:
    # otad.config imports otad.bootloader.base, which runs this package first: import
    # it only where it is used, or importing otad.config first would be circular.
    from otad.config import BootloaderConfig


def _option(options: Mapping[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in options:
        if default is ...:
            raise ConfigError(f"bootloader.{key}", "is required by this backend but missing")
        return default
    value = options[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"bootloader.{key}", f"must be a {kind.__name__}, found {value!r}")
    return value


def _check_known(options: Mapping[str, Any], known: set[str]) -> None:
    for key in options:
        if key not in known:
            names = ", ".join(sorted(known))
            raise ConfigError(f"bootloader.{key}", f"is not a setting of this backend ({names})")


def make_bootloader(config: BootloaderConfig) -> Bootloader:
    """The backend `config` names, configured from its options."""
    from otad.config import BackendName

    options = config.options
    if config.backend is BackendName.GRUB:
        from otad.bootloader.grub import GrubBootloader

        _check_known(options, {"env_dir", "trial_boots"})
        return GrubBootloader(
            Path(_option(options, "env_dir", str)), _option(options, "trial_boots", int, 3)
        )
    if config.backend is BackendName.UBOOT:
        from otad.bootloader.uboot import FW_ENV_CONFIG, UBootBootloader

        _check_known(options, {"fw_env_config", "trial_boots"})
        return UBootBootloader(
            Path(_option(options, "fw_env_config", str, str(FW_ENV_CONFIG))),
            _option(options, "trial_boots", int, 3),
        )
    if config.backend is BackendName.RPI_TRYBOOT:
        from otad.bootloader.rpi import RpiTrybootBootloader

        _check_known(options, {"boot_dir", "partition_a", "partition_b"})
        partitions = {
            Slot.A: _option(options, "partition_a", int),
            Slot.B: _option(options, "partition_b", int),
        }
        return RpiTrybootBootloader(Path(_option(options, "boot_dir", str)), partitions)
    from otad.bootloader.file import FileBootloader

    _check_known(options, {"path", "trial_boots"})
    return FileBootloader(
        Path(_option(options, "path", str)), _option(options, "trial_boots", int, 3)
    )
