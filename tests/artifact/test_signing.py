"""Signing and verifying manifests with every supported key type, and key refusals."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from otad.artifact.signing import (
    KeyType,
    decode_signature,
    load_signer,
    load_verifier,
    parse_verifier,
    private_pem,
    verify_manifest,
)
from otad.errors import BadSignature, KeyProblem
from tests.artifact.conftest import KeyPair

MANIFEST = b"96bcd965947569404798bcbdb614f103db5a004eb6e364cfc162c146890ea35b  version\n"


@pytest.mark.parametrize(
    ("name", "key_type", "raw_length"),
    [("rsa", KeyType.RSA, 384), ("ecdsa", KeyType.ECDSA, 64), ("ed25519", KeyType.ED25519, 64)],
)
def test_sign_and_verify(
    keys: dict[str, KeyPair], name: str, key_type: KeyType, raw_length: int
) -> None:
    signer = keys[name].signer
    signature = signer.sign(MANIFEST)

    assert signer.type is key_type
    assert len(base64.b64decode(signature, validate=True)) == raw_length
    assert verify_manifest(MANIFEST, signature, (keys["other"].verifier, keys[name].verifier))


def test_ecdsa_der_signature_is_accepted(keys: dict[str, KeyPair]) -> None:
    key = serialization.load_pem_private_key(keys["ecdsa"].private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.sign(MANIFEST, ec.ECDSA(hashes.SHA256()))

    verified = verify_manifest(MANIFEST, base64.b64encode(der), (keys["ecdsa"].verifier,))

    assert verified.type is KeyType.ECDSA


def test_signature_with_surrounding_whitespace_is_accepted(keys: dict[str, KeyPair]) -> None:
    signature = b"\n" + keys["ecdsa"].signer.sign(MANIFEST) + b"\r\n"

    assert verify_manifest(MANIFEST, signature, (keys["ecdsa"].verifier,))


@pytest.mark.parametrize("name", ["rsa", "ecdsa", "ed25519"])
def test_wrong_key_and_altered_manifest_are_refused(keys: dict[str, KeyPair], name: str) -> None:
    signature = keys[name].signer.sign(MANIFEST)

    with pytest.raises(BadSignature, match="does not verify with any trusted key"):
        verify_manifest(MANIFEST, signature, (keys["other"].verifier,))
    with pytest.raises(BadSignature):
        verify_manifest(MANIFEST.replace(b"96", b"69"), signature, (keys[name].verifier,))


@pytest.mark.parametrize("text", [b"not base64!", b"QUJD=X", b"\xff"])
def test_garbage_signature_is_a_bad_signature(text: bytes) -> None:
    with pytest.raises(BadSignature, match="base64"):
        decode_signature(text)


def test_rsa_2048_verifies_but_does_not_sign(keys: dict[str, KeyPair]) -> None:
    assert load_verifier(keys["rsa2048"].public).type is KeyType.RSA
    with pytest.raises(KeyProblem, match="2048 bits, at least 3072 required"):
        load_signer(keys["rsa2048"].private)


def test_weak_and_foreign_keys_are_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    weak_pub = weak.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p384 = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.key"
    path.write_bytes(private_pem(p384))

    with pytest.raises(KeyProblem, match="1024 bits"):
        parse_verifier(weak_pub, "weak.pub")
    with pytest.raises(KeyProblem, match="expected P-256"):
        load_signer(path)
    with pytest.raises(KeyProblem, match="not a PEM public key"):
        parse_verifier(b"-----BEGIN NONSENSE-----", "junk.pub")
    with pytest.raises(KeyProblem, match="cannot read key"):
        load_signer(tmp_path / "missing.key")


def test_pkcs1_rsa_public_key_is_accepted(keys: dict[str, KeyPair]) -> None:
    public = keys["rsa"].verifier.key
    pkcs1 = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)

    assert parse_verifier(pkcs1, "rsa-pkcs1.pub").fingerprint == keys["rsa"].verifier.fingerprint
