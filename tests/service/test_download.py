"""Install(s source) with an https URL: the daemon downloads the artifact straight into
the engine, trusting only what [download] in otad.conf says; plain http is refused."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_next.errors import DBusError

from otad.bootloader.base import Slot
from tests.conftest import require_tool
from tests.download.servers import Nginx, Pki, make_pki, start_nginx
from tests.service.conftest import MakeDaemon, connect, run
from tests.service.test_install import until_completed


@pytest.fixture
def served(tmp_path: Path, artifacts: dict[str, Path]) -> Iterator[tuple[Nginx, Pki]]:
    binary = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin") or require_tool("nginx")
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server = start_nginx(binary, tmp_path / "nginx", pki)
    try:
        shutil.copy(artifacts["release-2"], server.www / "release-2.mender")
        yield server, pki
    finally:
        server.stop()


def test_install_from_an_https_url(make_daemon: MakeDaemon, served: tuple[Nginx, Pki]) -> None:
    server, pki = served
    daemon = make_daemon(extra_config=f'\n[download]\nca_bundle = "{pki.ca}"\nretries = 2\n')
    daemon.start()
    url = f"https://localhost:{server.ports.tls}/release-2.mender"

    async def body() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        done, _ = await until_completed(events, await client.install(url, {}))
        assert done.result == 0, done.message
        await client.close()

    run(body())

    assert daemon.device.bootloader.status().next_boot is Slot.B
    assert server.wait_for_log('"/release-2.mender"')


def test_untrusted_server_and_plain_http_are_refused(
    make_daemon: MakeDaemon, served: tuple[Nginx, Pki]
) -> None:
    server, _ = served
    daemon = make_daemon()  # no [download]: the system's CAs, which never signed this one
    daemon.start()

    async def body() -> None:
        client = await connect(daemon.bus)
        events = await client.subscribe()
        https = f"https://localhost:{server.ports.tls}/release-2.mender"
        done, _ = await until_completed(events, await client.install(https, {}))
        assert done.result != 0
        assert "certificate" in done.message.lower()
        with pytest.raises(DBusError) as raised:
            await client.install(f"http://localhost:{server.ports.plain}/release-2.mender", {})
        assert raised.value.type == "org.otad.Error.InvalidArgs"
        assert "plain http is refused" in raised.value.text
        await client.close()

    run(body())

    assert daemon.device.bootloader.status().next_boot is Slot.A
