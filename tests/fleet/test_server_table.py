"""[server] in otad.conf, the identity and inventory scripts, and the poller's `begin` hook."""

from __future__ import annotations

from pathlib import Path

import pytest

from otad.config import parse_config
from otad.download import DownloadSettings
from otad.errors import ConfigError, EnvironmentProblem, StateConflict
from otad.fleet.auth import read_identity, read_tenant_token
from otad.fleet.config import KeyType, parse_server_config
from otad.fleet.deployments import Deployment
from otad.fleet.inventory import run_inventory_scripts
from otad.fleet.poller import DeviceHooks
from tests.fleet.conftest import FakeClock, FakeDevice, PollerFactory, open_over_http
from tests.fleet.server import INVENTORY, FakeMender, Offer

BASE = """
device_type = "otad-test"
data_dir = "/data/otad"
trusted_keys = ["/etc/otad/release.pub"]
[bootloader]
backend = "file"
path = "/tmp/bootloader.json"
[slots.a]
root = "LABEL=root-a"
[slots.b]
root = "LABEL=root-b"
"""


def script(path: Path, text: str) -> Path:
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(0o755)
    return path


def test_server_table_in_otad_conf_takes_defaults_from_data_dir_and_download() -> None:
    config = parse_config(
        BASE + '[download]\nca_bundle = "/etc/otad/ca.pem"\n'
        '[server]\nurl = "https://mender.example.com/"\nidentity_interface = "eth0"\n'
    )

    server = config.server
    assert server is not None
    assert server.url == "https://mender.example.com"
    assert server.device_key == Path("/data/otad/fleet/device-key.pem")
    assert server.key_type is KeyType.RSA
    assert server.tls.ca_bundle == Path("/etc/otad/ca.pem")  # [download]'s trust
    assert (server.poll_interval, server.backoff_limit) == (1800, 1800)
    assert parse_config(BASE).server is None


def test_server_sets_its_own_tls_and_keeps_download_timeouts() -> None:
    download = DownloadSettings(ca_bundle=Path("/etc/otad/ca.pem"), read_timeout=5)
    pin = "ab" * 32
    server = parse_server_config(
        {"url": "https://m.example.com", "identity": {"id": "1"}, "pinned_sha256": pin},
        download,
    )
    assert (server.tls.ca_bundle, server.tls.pinned_sha256) == (None, pin)
    assert server.tls.read_timeout == 5
    assert server.tls_from_server


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('url = "http://m.example.com"', "server.url"),
        ('url = "ftp://m.example.com"', "server.url"),
        ('url = "https://m.example.com"\ntenant_token = "t"\ntenant_token_file = "/t"',
         "server.tenant_token_file"),
        ('url = "https://m.example.com"\ndevice_key = "key.pem"', "server.device_key"),
        ('url = "https://m.example.com"\nretry_interval = 600\nmax_retry_interval = 300',
         "server.retry_interval"),
        ('url = "https://m.example.com"\ninventory_dir = "inventory"', "server.inventory_dir"),
        ('url = "https://m.example.com"\nclient_key = "/k.pem"', "server.client_key"),
        ('url = "https://m.example.com"\n[server.inventory]\nsite = 3', "server.inventory.site"),
    ],
)  # fmt: skip
def test_bad_server_table_in_otad_conf_names_the_key(extra: str, key: str) -> None:
    text = BASE + f"[server]\nidentity_interface = 'eth0'\n{extra}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.key == key


def test_plain_http_server_only_where_download_allows_it() -> None:
    text = BASE + '[download]\nallow_http = true\n[server]\nurl = "http://lab:8080"\n'
    config = parse_config(text + 'identity_interface = "eth0"\n')
    assert config.server is not None
    assert config.server.url == "http://lab:8080"


def test_identity_script_lines_join_the_fixed_identity(tmp_path: Path) -> None:
    identity = script(tmp_path / "identity", "echo mac=52:54:00:12:34:56\necho\necho cpu=x86")
    config = parse_server_config(
        {"url": "https://m.example.com", "identity_script": str(identity),
         "identity": {"serial": "SN-1"}}
    )  # fmt: skip
    assert read_identity(config) == {"mac": "52:54:00:12:34:56", "cpu": "x86", "serial": "SN-1"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("exit 3", "exited"),
        ("echo no-equals-sign", "line 1 is not key=value"),
        ("echo a=1; echo a=2", "printed a 2 times"),
    ],
)
def test_bad_identity_script_is_a_clear_error(tmp_path: Path, text: str, problem: str) -> None:
    identity = script(tmp_path / "identity", text)
    config = parse_server_config({"url": "https://m.example.com", "identity_script": str(identity)})
    with pytest.raises(EnvironmentProblem) as caught:
        read_identity(config)
    assert str(identity) in str(caught.value)
    assert problem in str(caught.value)


def test_tenant_token_file(tmp_path: Path) -> None:
    token = tmp_path / "tenant-token"
    token.write_text("eyJ.abc.def\n")
    table = {"url": "https://m.example.com", "identity": {"id": "1"}}
    config = parse_server_config({**table, "tenant_token_file": str(token)})
    assert read_tenant_token(config) == "eyJ.abc.def"
    token.write_text("\n")
    with pytest.raises(ConfigError, match="holds no single token"):
        read_tenant_token(config)


def test_inventory_scripts_and_fixed_attributes_reach_the_server(
    tmp_path: Path, server: FakeMender, make_poller: PollerFactory
) -> None:
    directory = tmp_path / "inventory"
    directory.mkdir()
    script(directory / "mender-inventory-network", "echo ipv4=10.0.0.2\necho ipv4=10.0.0.3")
    script(directory / "mender-inventory-broken", "echo half=1; exit 1")
    script(directory / "mender-inventory-os", "echo device_type=spoofed\necho bootloader=grub")
    (directory / "README").write_text("not executable=1\n")

    assert run_inventory_scripts(directory) == {
        "ipv4": ("10.0.0.2", "10.0.0.3"),
        "device_type": "spoofed",
        "bootloader": "grub",
    }
    make_poller(inventory_dir=directory, inventory={"site": "Hall 3"}).step()

    [sent] = server.requests("PATCH", INVENTORY)
    values = {attribute["name"]: attribute["value"] for attribute in sent.body}
    assert values["ipv4"] == ["10.0.0.2", "10.0.0.3"]
    assert values["bootloader"] == "grub"
    assert values["site"] == "Hall 3"
    assert values["device_type"] == "otad-test"  # a script cannot override otad's own
    assert "half" not in values


def test_busy_device_leaves_the_deployment_for_a_later_poll(
    server: FakeMender,
    make_poller: PollerFactory,
    fake_device: FakeDevice,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    artifact = tmp_path / "release-2.mender"
    artifact.write_bytes(b"x" * 1000)
    busy = [True]
    ended: list[str] = []

    def begin(deployment: Deployment) -> None:
        if busy[0]:
            raise StateConflict("another operation is in progress: install")

    hooks = DeviceHooks(
        read_device=lambda: fake_device.view,
        open_artifact=open_over_http,
        install=fake_device.install,
        reboot=fake_device.reboot,
        begin=begin,
        end=lambda: ended.append("end"),
    )
    # A server hands a deployment out again until the device reports on it; the fake
    # one hands out each offer once.
    server.script.offers.extend([Offer("d-1", "release-2", artifact)] * 2)
    poller = make_poller(hooks)

    assert poller.step() == 60  # declined: asked again after retry_interval
    assert server.statuses == []
    assert fake_device.installed == []
    assert ended == []

    busy[0] = False
    clock.advance(60)
    poller.step()
    assert [status for _, status in server.statuses] == ["downloading", "installing", "rebooting"]
    assert ended == ["end"]
