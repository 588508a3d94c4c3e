"""Device authentication: the device key, the identity and the signed auth request.

The device key identifies the device to the server; it is made once, kept on the data
partition (mode 0600) and is unrelated to the keys that sign artifacts. Authentication
is POST /api/devices/v1/authentication/auth_requests (deviceauth, devices API v1) with
the JSON body {id_data, pubkey, tenant_token}, where id_data is the identity attributes
as a JSON string. The header X-MEN-Signature is the base64 of the device key's
signature over the exact bytes of the body: RSA PKCS#1 v1.5 with SHA-256, ECDSA with
SHA-256 as an ASN.1 (DER) sequence of r and s (unlike artifact signatures, which are raw
r||s), or Ed25519 over the body itself. 200 carries the JWT as text; 401 means the
device is not accepted (yet): a person accepts it on the server, and the next request
gets a token.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from otad.artifact.signing import PrivateKey, private_pem
from otad.errors import ConfigError, EnvironmentProblem, KeyProblem, OtadError
from otad.fleet.client import BadReply, Client
from otad.fleet.config import KeyType, ServerConfig
from otad.process import run

log = logging.getLogger(__name__)

AUTH_PATH = "/api/devices/v1/authentication/auth_requests"
RSA_BITS = 3072
SCRIPT_TIMEOUT = 60.0  # seconds an identity or inventory script may take


@dataclass(frozen=True)
class DeviceKey:
    """The device's own key pair; `path` is where its private half is kept."""

    key: PrivateKey
    path: Path

    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(self, data: bytes) -> str:
        """The base64 signature of `data`, as X-MEN-Signature carries it."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            raw = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(self.key, ec.EllipticCurvePrivateKey):
            raw = self.key.sign(data, ec.ECDSA(hashes.SHA256()))  # DER, as deviceauth expects
        else:
            raw = self.key.sign(data)
        return base64.b64encode(raw).decode()


def _generate(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.RSA:
        return rsa.generate_private_key(65537, RSA_BITS)
    if key_type is KeyType.ECDSA:
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def _write_private(path: Path, data: bytes) -> None:
    """Write the key atomically, readable by root only from its first byte."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_device_key(path: Path, key_type: KeyType) -> DeviceKey:
    """The device key kept at `path`, made (of `key_type`) the first time.

    An existing key is used whatever its type: a new key would make the server see a
    new device, which a person would have to accept again.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("generating the device key (%s) in %s", key_type.value, path)
        key = _generate(key_type)
        try:
            _write_private(path, private_pem(key))
        except OSError as error:
            raise KeyProblem(f"cannot keep the device key in {path}: {error.strerror}") from None
        return DeviceKey(key, path)
    except OSError as error:
        raise KeyProblem(f"cannot read the device key {path}: {error.strerror}") from None
    if os.stat(path).st_mode & 0o077:
        log.warning("device key %s is readable by others; making it private", path)
        os.chmod(path, 0o600)
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyProblem(f"{path} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(
        loaded, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise KeyProblem(f"{path}: unsupported key type {type(loaded).__name__}")
    return DeviceKey(loaded, path)


def parse_key_values(text: str, source: str) -> dict[str, list[str]]:
    """The `key=value` lines of a script's output (as Mender's identity and inventory
    scripts print them), each key with its values in order; blank lines are skipped."""
    found: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, separator, value = line.partition("=")
        if not separator or not key.strip():
            raise EnvironmentProblem(f"{source}: line {number} is not key=value: {line[:80]!r}")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def run_script(path: Path) -> dict[str, list[str]]:
    """Run an identity or inventory script and parse its output; EnvironmentProblem
    (with the script's name) when it cannot run, fails or prints something else."""
    try:
        result = run([path], timeout=SCRIPT_TIMEOUT)
    except OtadError as error:
        raise EnvironmentProblem(f"{path}: {error}") from None
    try:
        text = result.stdout.decode()
    except UnicodeDecodeError:
        raise EnvironmentProblem(f"{path} printed something that is not UTF-8 text") from None
    return parse_key_values(text, str(path))


def read_identity(
    config: ServerConfig, sys_class_net: Path = Path("/sys/class/net")
) -> dict[str, str]:
    """The identity attributes: identity_script's output, the fixed ones, and the mac
    of identity_interface; ConfigError or EnvironmentProblem when none can be had."""
    identity: dict[str, str] = {}
    if config.identity_script is not None:
        for key, values in run_script(config.identity_script).items():
            if len(values) > 1:
                raise EnvironmentProblem(
                    f"{config.identity_script} printed {key} {len(values)} times: an "
                    "identity attribute must have one value"
                )
            identity[key] = values[0]
    identity.update(config.identity)
    if config.identity_interface:
        path = sys_class_net / config.identity_interface / "address"
        try:
            identity["mac"] = path.read_text().strip()
        except OSError as error:
            raise EnvironmentProblem(
                f"cannot read the mac of {config.identity_interface} ({path}): {error.strerror}"
            ) from None
        if not identity["mac"]:
            raise ConfigError(
                "server.identity_interface", f"{config.identity_interface} has no address"
            )
    if not identity or any(not value for value in identity.values()):
        raise ConfigError("server.identity_script", f"gave an empty identity: {identity!r}")
    return identity


def read_tenant_token(config: ServerConfig) -> str:
    """tenant_token, or the contents of tenant_token_file; ConfigError naming the key."""
    if config.tenant_token_file is None:
        return config.tenant_token
    try:
        token = config.tenant_token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        problem = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(
            "server.tenant_token_file", f"cannot read {config.tenant_token_file}: {problem}"
        ) from None
    if not token or any(char.isspace() for char in token):
        raise ConfigError(
            "server.tenant_token_file", f"{config.tenant_token_file} holds no single token"
        )
    return token


def auth_request_body(identity: Mapping[str, str], key: DeviceKey, tenant_token: str) -> bytes:
    """The AuthRequest JSON; id_data is stable (sorted, compact) so the server sees one
    identity however often it is sent."""
    request = {
        "id_data": json.dumps(dict(identity), sort_keys=True, separators=(",", ":")),
        "pubkey": key.public_pem(),
    }
    if tenant_token:
        request["tenant_token"] = tenant_token
    return json.dumps(request).encode()


def authenticate(
    client: Client, identity: Mapping[str, str], key: DeviceKey, tenant_token: str
) -> str:
    """Ask for a token; store it in `client` and return it.

    Unauthorized (401) while the device waits to be accepted; other ServerErrors as
    the client raises them.
    """
    body = auth_request_body(identity, key, tenant_token)
    reply = client.send(
        "POST",
        AUTH_PATH,
        expect=(200,),
        body=body,
        headers={"X-MEN-Signature": key.sign(body)},
        authorized=False,
    )
    token = reply.body.decode("ascii", errors="replace").strip()
    if token.count(".") != 2 or any(char.isspace() for char in token):
        raise BadReply("POST", AUTH_PATH, reply.status, "the answer is not a JWT")
    client.token = token
    log.info("authenticated to %s", client.base_url)
    return token
