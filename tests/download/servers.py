"""Test servers: a private CA with server and client certificates, and a real nginx.

nginx runs as one process (`master_process off`) with its configuration, logs and
document root in the test's directory, on free ports of 127.0.0.1. It is stopped on
every path by the fixture that starts it.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otad.artifact.signing import private_pem


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    @property
    def sha256(self) -> str:
        der = x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: Identity
    server2: Identity  # another certificate for localhost from the same CA
    client: Identity
    rogue_client: Identity  # issued by other_ca, which nginx does not trust


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    directory: Path,
    stem: str,
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    dns: str | None = None,
    client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Identity]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
    if issuer is not None:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_pem(key))
    return cert, key, Identity(cert_path, key_path)


def make_pki(directory: Path) -> Pki:
    ca_cert, ca_key, ca = _issue(directory, "ca", "otad test CA", None)
    other_cert, other_key, other = _issue(directory, "other-ca", "someone else's CA", None)
    _, _, server = _issue(directory, "server", "localhost", (ca_cert, ca_key), dns="localhost")
    _, _, server2 = _issue(directory, "server2", "localhost", (ca_cert, ca_key), dns="localhost")
    _, _, client = _issue(directory, "client", "device-1", (ca_cert, ca_key), client=True)
    _, _, rogue = _issue(directory, "rogue", "device-2", (other_cert, other_key), client=True)
    return Pki(ca.cert, other.cert, server, server2, client, rogue)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclass(frozen=True)
class Ports:
    tls: int  # the server certificate
    tls2: int  # the second server certificate, same documents
    mtls: int  # client certificates required
    plain: int  # http


_CONFIG = """\
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format otad '$server_port $status "$request_uri" "$http_range" $body_bytes_sent';
    access_log {dir}/access.log otad;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{ports.tls} ssl;
        server_name localhost;
        ssl_certificate {pki.server.cert};
        ssl_certificate_key {pki.server.key};
        root {www};
        location = /moved.mender {{ return 302 http://127.0.0.1:{ports.plain}/artifact.mender; }}
        location /noranges/ {{ alias {www}/; max_ranges 0; }}
    }}
    server {{
        listen 127.0.0.1:{ports.tls2} ssl;
        server_name localhost;
        ssl_certificate {pki.server2.cert};
        ssl_certificate_key {pki.server2.key};
        root {www};
    }}
    server {{
        listen 127.0.0.1:{ports.mtls} ssl;
        server_name localhost;
        ssl_certificate {pki.server.cert};
        ssl_certificate_key {pki.server.key};
        ssl_client_certificate {pki.ca};
        ssl_verify_client on;
        root {www};
    }}
    server {{
        listen 127.0.0.1:{ports.plain};
        root {www};
    }}
}}
"""


@dataclass
class Nginx:
    directory: Path
    www: Path
    ports: Ports
    process: subprocess.Popen[bytes]

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def wait_for_log(self, fragment: str, timeout: float = 5.0) -> list[str]:
        """The access log's lines holding `fragment`, once there is one (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_log() if fragment in line]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_nginx(binary: str, directory: Path, pki: Pki) -> Nginx:
    www = directory / "www"
    www.mkdir(parents=True)
    ports = Ports(*_free_ports(4))
    config = directory / "nginx.conf"
    config.write_text(_CONFIG.format(dir=directory, www=www, ports=ports, pki=pki))
    argv = [binary, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Nginx(directory, www, ports, process)
    try:
        _wait_until_listening(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_listening(server: Nginx) -> None:
    deadline = time.monotonic() + 10
    for port in (server.ports.tls, server.ports.tls2, server.ports.mtls, server.ports.plain):
        while True:
            if server.process.poll() is not None:
                log = (server.directory / "error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx exited with {server.process.returncode}: {log}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx does not listen on port {port}") from None
                time.sleep(0.05)
