"""otad.conf: a valid file parses into typed settings; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from otad.bootloader.base import Slot
from otad.config import BackendName, DeviceRef, RefKind, load_config, parse_config
from otad.errors import ConfigError

VALID = """
device_type = "qemux86-64"
data_dir = "/data/otad"
trusted_keys = ["/etc/otad/keys/release.pub"]
health_timeout = 120

[bootloader]
backend = "grub"
env_dir = "/boot/efi/EFI/otad"

[slots.a]
root = "PARTUUID=5B1C9E63-02"
[slots.b]
root = "LABEL=root-b"
boot = "PARTUUID=5b1c9e63-04"

[install]
verify_readback = true
"""


def test_valid_configuration() -> None:
    config = parse_config(VALID)

    assert config.device_type == "qemux86-64"
    assert config.data_dir == Path("/data/otad")
    assert config.trusted_keys == (Path("/etc/otad/keys/release.pub"),)
    assert config.health_timeout == 120
    assert config.bootloader.backend is BackendName.GRUB
    assert config.bootloader.options == {"env_dir": "/boot/efi/EFI/otad"}
    assert config.slots[Slot.A].root == DeviceRef(RefKind.PARTUUID, "5b1c9e63-02")
    assert config.slots[Slot.B].root == DeviceRef(RefKind.LABEL, "root-b")
    assert config.slots[Slot.B].boot == DeviceRef(RefKind.PARTUUID, "5b1c9e63-04")
    assert config.install.verify_readback is True
    assert config.install.fsync_interval == 64 << 20
    assert config.install.allow_downgrade is False


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [
        ('device_type = "qemux86-64"\n', "", "device_type", "required"),
        ('device_type = "qemux86-64"', "device_type = 3", "device_type", "must be a str"),
        ('data_dir = "/data/otad"', 'data_dir = "data"', "data_dir", "absolute path"),
        ('["/etc/otad/keys/release.pub"]', "[]", "trusted_keys", "at least one"),
        ("health_timeout = 120", "health_timeout = 0", "health_timeout", "positive"),
        ("health_timeout = 120", "health_timeout = true", "health_timeout", "must be a int"),
        ('backend = "grub"', 'backend = "lilo"', "bootloader.backend", "'lilo' is not one of"),
        ('root = "LABEL=root-b"', 'root = "/dev/sda3"', "slots.b.root", "PARTUUID=<uuid>"),
        ('root = "LABEL=root-b"', 'root = "PARTUUID=5b1c9e63-02"', "slots.b.root", "same"),
        ("[slots.b]", "[slots.c]", "slots.c", "not a known setting"),
        ("verify_readback = true", "verify_readback = 1", "install.verify_readback", "bool"),
        ("verify_readback = true", "fsync_interval = 4096", "install.fsync_interval", "1 MiB"),
        ("health_timeout = 120", "health_timout = 120", "health_timout", "not a known"),
    ],
)
def test_mistakes_name_the_key(old: str, new: str, key: str, fragment: str) -> None:
    text = VALID.replace(old, new, 1)
    assert text != VALID

    with pytest.raises(ConfigError, match=fragment) as caught:
        parse_config(text)

    assert caught.value.key == key
    assert key in str(caught.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("device_type = ")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "otad.conf")
