"""Signing and verifying the manifest of an artifact.

The signature (`manifest.sig`) covers the raw bytes of `manifest` and is stored as
standard base64. Algorithms, chosen by the key type:

- RSA: PKCS#1 v1.5 with SHA-256. otad signs only with keys of 3072 bits or more and
  verifies keys of 2048 bits or more.
- ECDSA P-256 with SHA-256: written as the raw 64-byte r||s that Mender uses; a DER
  signature is accepted when verifying.
- Ed25519: an otad extension. Mender tools cannot verify it; use RSA or ECDSA for
  artifacts that Mender clients or servers must check.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from otad.errors import BadSignature, KeyProblem, SignatureError

MIN_SIGNING_RSA_BITS = 3072
MIN_VERIFYING_RSA_BITS = 2048
MAX_SIGNATURE_SIZE = 16 * 1024

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class KeyType(enum.Enum):
    RSA = "rsa"
    ECDSA = "ecdsa"
    ED25519 = "ed25519"


def _key_type(key: PrivateKey | PublicKey, source: str, minimum_rsa_bits: int) -> KeyType:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < minimum_rsa_bits:
            raise KeyProblem(
                f"{source}: RSA key of {key.key_size} bits, at least {minimum_rsa_bits} required"
            )
        return KeyType.RSA
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyProblem(f"{source}: ECDSA key on curve {key.curve.name}, expected P-256")
        return KeyType.ECDSA
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return KeyType.ED25519
    raise KeyProblem(f"{source}: unsupported key type {type(key).__name__}")


def _fingerprint(public: PublicKey) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Signer:
    """A private key able to sign manifests."""

    key: PrivateKey
    type: KeyType
    source: str

    def sign(self, manifest: bytes) -> bytes:
        """Return the base64 text of the signature over `manifest`, as manifest.sig holds."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            raw = self.key.sign(manifest, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(self.key, ec.EllipticCurvePrivateKey):
            r, s = utils.decode_dss_signature(self.key.sign(manifest, ec.ECDSA(hashes.SHA256())))
            raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            raw = self.key.sign(manifest)
        return base64.b64encode(raw)

    @property
    def verifier(self) -> Verifier:
        public = self.key.public_key()
        return Verifier(public, self.type, self.source, _fingerprint(public))


@dataclass(frozen=True)
class Verifier:
    """A trusted public key; `fingerprint` is the SHA-256 of its SubjectPublicKeyInfo."""

    key: PublicKey
    type: KeyType
    source: str
    fingerprint: str

    def is_valid(self, manifest: bytes, raw: bytes) -> bool:
        """True when `raw` (decoded from base64) is this key's signature of `manifest`."""
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(raw, manifest, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(_ecdsa_der(raw), manifest, ec.ECDSA(hashes.SHA256()))
            else:
                self.key.verify(raw, manifest)
        except (InvalidSignature, ValueError):
            return False
        return True


def _ecdsa_der(raw: bytes) -> bytes:
    if len(raw) == 64:
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        return utils.encode_dss_signature(r, s)
    return raw


def decode_signature(text: bytes) -> bytes:
    """Decode manifest.sig; surrounding white space is tolerated, nothing else."""
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("manifest.sig is not valid base64") from None


def verify_manifest(manifest: bytes, signature: bytes, keys: tuple[Verifier, ...]) -> Verifier:
    """Return the trusted key that signed `manifest`, or raise BadSignature."""
    raw = decode_signature(signature)
    for verifier in keys:
        if verifier.is_valid(manifest, raw):
            return verifier
    names = ", ".join(key.source for key in keys)
    raise BadSignature(f"manifest.sig does not verify with any trusted key ({names})")


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise KeyProblem(f"cannot read key {path}: {error.strerror}") from None


def load_signer(path: Path) -> Signer:
    """Load a PEM private key (PKCS#1, SEC1 or PKCS#8, unencrypted)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyProblem(f"{path} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise KeyProblem(f"{path}: unsupported key type {type(key).__name__}")
    return Signer(key, _key_type(key, str(path), MIN_SIGNING_RSA_BITS), str(path))


def parse_verifier(data: bytes, source: str) -> Verifier:
    """Parse a PEM public key (SubjectPublicKeyInfo, or PKCS#1 for RSA)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyProblem(f"{source} is not a PEM public key: {error}") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise KeyProblem(f"{source}: unsupported key type {type(key).__name__}")
    return Verifier(key, _key_type(key, source, MIN_VERIFYING_RSA_BITS), source, _fingerprint(key))


def load_verifier(path: Path) -> Verifier:
    """Load a trusted public key from a PEM file."""
    return parse_verifier(_read_key_file(path), str(path))


def private_pem(key: PrivateKey) -> bytes:
    """Unencrypted PEM in the form mender-artifact can load: PKCS#1 for RSA, SEC1 for
    ECDSA, PKCS#8 for Ed25519 (which has no other form)."""
    form = (
        serialization.PrivateFormat.PKCS8
        if isinstance(key, ed25519.Ed25519PrivateKey)
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    # Debian's typeshed stubs for cryptography declare private_bytes only on the
    # *WithSerialization subclasses, which at run time are the same classes.
    serializable: Any = key
    pem: bytes = serializable.private_bytes(
        serialization.Encoding.PEM, form, serialization.NoEncryption()
    )
    return pem


def public_pem(signer: Signer) -> bytes:
    """The PEM SubjectPublicKeyInfo of a signer, for distributing to devices."""
    return signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


__all__ = [
    "MAX_SIGNATURE_SIZE",
    "KeyType",
    "SignatureError",
    "Signer",
    "Verifier",
    "load_signer",
    "load_verifier",
    "parse_verifier",
    "private_pem",
    "public_pem",
    "verify_manifest",
]
