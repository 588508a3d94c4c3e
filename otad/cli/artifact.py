"""otad-artifact: write, read, validate and sign Mender Artifact v3 files.

Flags follow mender-artifact where the two overlap (-n name, -t device type, -f file,
-k key, -o output, -p/-d provides/depends, -N/-g/-G artifact and group depends).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from otad.artifact.chunks import DEFAULT_CHUNK_SIZE
from otad.artifact.compression import Compression
from otad.artifact.describe import describe, format_text
from otad.artifact.headers import ROOTFS_IMAGE, MetaDataValue, check_meta_data
from otad.artifact.reader import SignatureStatus, VerifyPolicy, verify_artifact
from otad.artifact.release import check_version
from otad.artifact.signing import (
    KeyType,
    PrivateKey,
    Signer,
    load_signer,
    load_verifier,
    private_pem,
    public_pem,
)
from otad.artifact.writer import (
    ArtifactSpec,
    PayloadSpec,
    bootstrap,
    module_image,
    rootfs_image,
    sign_artifact,
    write_artifact,
)
from otad.cli.common import EXIT_OK, run_command, setup_logging
from otad.errors import EnvironmentProblem, MalformedArtifact, UsageError

PROGRAM = "otad-artifact"


def _key_value(text: str) -> tuple[str, str]:
    key, separator, value = text.partition(":")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY:VALUE, found {text!r}")
    return key, value


def _add_common_write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--artifact-name", required=True, help="name of the artifact")
    parser.add_argument(
        "-t",
        "--device-type",
        action="append",
        required=True,
        help="compatible device type (repeat for several)",
    )
    parser.add_argument("-o", "--output-path", required=True, type=Path, help="artifact to write")
    parser.add_argument("-k", "--key", type=Path, help="private key (PEM) to sign with")
    parser.add_argument(
        "--compression",
        default="gzip",
        help="none, gzip, xz (alias lzma) or zstd; default gzip",
    )
    parser.add_argument(
        "-N",
        "--artifact-name-depends",
        action="append",
        default=[],
        help="artifact name the device must currently run (repeatable)",
    )
    parser.add_argument("-g", "--provides-group", help="artifact group this artifact provides")
    parser.add_argument(
        "-G",
        "--depends-groups",
        action="append",
        default=[],
        help="artifact group the device must be in (repeatable)",
    )
    parser.add_argument(
        "-p",
        "--provides",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY:VALUE",
        help="add to type-info artifact_provides (repeatable)",
    )
    parser.add_argument(
        "-d",
        "--depends",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY:VALUE",
        help="add to type-info artifact_depends (repeatable)",
    )
    parser.add_argument(
        "--clears-provides",
        action="append",
        default=None,
        help="add to clears_artifact_provides (repeatable; replaces the defaults)",
    )
    parser.add_argument(
        "--no-default-clears-provides",
        action="store_true",
        help="write no clears_artifact_provides unless --clears-provides is given",
    )
    parser.add_argument(
        "-s",
        "--script",
        action="append",
        default=[],
        type=Path,
        help="state script to include (repeatable)",
    )


def _add_version_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--software-version",
        help="release version used for downgrade protection; defaults to the artifact name",
    )
    parser.add_argument(
        "--no-default-software-version",
        action="store_true",
        help="do not write a software version unless --software-version is given",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = commands.add_parser("write", help="write an artifact")
    kinds = write.add_subparsers(dest="kind", required=True, metavar="KIND")

    rootfs = kinds.add_parser("rootfs-image", help="a full root filesystem image")
    _add_common_write_options(rootfs)
    _add_version_options(rootfs)
    rootfs.add_argument("-f", "--file", required=True, type=Path, help="filesystem image")
    rootfs.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"chunk length of the signed chunk index, bytes (default {DEFAULT_CHUNK_SIZE})",
    )
    rootfs.add_argument("--no-chunk-index", action="store_true", help="write no chunk index")
    rootfs.add_argument(
        "--no-checksum-provide",
        action="store_true",
        help="do not add rootfs-image.checksum to the provides",
    )

    module = kinds.add_parser("module-image", help="a payload for an update module")
    _add_common_write_options(module)
    _add_version_options(module)
    module.add_argument("-T", "--type", required=True, help="update module name")
    module.add_argument(
        "-f", "--file", action="append", default=[], type=Path, help="payload file (repeatable)"
    )
    module.add_argument("-m", "--meta-data", type=Path, help="JSON file of meta-data")

    boot = kinds.add_parser(
        "bootstrap", aliases=["bootstrap-artifact"], help="an empty payload (provides only)"
    )
    _add_common_write_options(boot)

    read = commands.add_parser("read", help="verify an artifact and describe it")
    read.add_argument("artifact", type=Path)
    read.add_argument("-k", "--key", action="append", default=[], type=Path, help="trusted key")
    read.add_argument("--json", action="store_true", help="print JSON")

    validate = commands.add_parser("validate", help="verify an artifact completely")
    validate.add_argument("artifact", type=Path)
    validate.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        type=Path,
        help="trusted public key (repeatable); without one only integrity is checked",
    )

    sign = commands.add_parser("sign", help="sign an existing artifact")
    sign.add_argument("artifact", type=Path)
    sign.add_argument("-k", "--key", required=True, type=Path, help="private key (PEM)")
    sign.add_argument("-o", "--output-path", type=Path, help="default: sign in place")
    sign.add_argument("-F", "--force", action="store_true", help="replace an existing signature")

    genkey = commands.add_parser("genkey", help="make a signing key pair")
    genkey.add_argument("-o", "--output-path", required=True, type=Path, help="private key file")
    genkey.add_argument(
        "--type", default="ecdsa", choices=[t.value for t in KeyType], help="default ecdsa"
    )
    return parser


def _signer(path: Path | None) -> Signer | None:
    return load_signer(path) if path else None


def _software_version(args: argparse.Namespace) -> str | None:
    if args.software_version is not None:
        return check_version(args.software_version)
    if args.no_default_software_version:
        return None
    try:
        return check_version(args.artifact_name)
    except UsageError:
        raise UsageError(
            f"artifact name {args.artifact_name!r} is not an orderable version; "
            "pass --software-version (or --no-default-software-version)"
        ) from None


def _clears(args: argparse.Namespace) -> list[str] | None:
    if args.clears_provides is not None:
        return list(args.clears_provides)
    return [] if args.no_default_clears_provides else None


def _read_meta_data(path: Path | None) -> dict[str, MetaDataValue]:
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise EnvironmentProblem(f"cannot read meta-data {path}: {error.strerror}") from None
    except ValueError as error:
        raise UsageError(f"meta-data {path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"meta-data {path} must hold a JSON object")
    try:
        return check_meta_data(value, str(path))
    except MalformedArtifact as error:
        raise UsageError(str(error)) from None


def _payload(args: argparse.Namespace) -> PayloadSpec:
    provides, depends, clears = dict(args.provides), dict(args.depends), _clears(args)
    if args.kind == ROOTFS_IMAGE:
        return rootfs_image(
            args.file,
            software_version=_software_version(args),
            provides=provides,
            depends=depends,
            clears_provides=clears,
            chunk_size=None if args.no_chunk_index else args.chunk_size,
            checksum_provide=not args.no_checksum_provide,
        )
    if args.kind == "module-image":
        return module_image(
            args.type,
            args.file,
            software_version=_software_version(args),
            meta_data=_read_meta_data(args.meta_data),
            provides=provides,
            depends=depends,
            clears_provides=clears,
        )
    return bootstrap(provides=provides, depends=depends, clears_provides=clears or None)


def _write(args: argparse.Namespace) -> int:
    spec = ArtifactSpec(
        name=args.artifact_name,
        device_types=tuple(args.device_type),
        payload=_payload(args),
        group=args.provides_group,
        depends_names=tuple(args.artifact_name_depends),
        depends_groups=tuple(args.depends_groups),
        scripts=tuple(args.script),
        compression=Compression.from_name(args.compression),
        signer=_signer(args.key),
        mtime=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
    )
    written = write_artifact(spec, args.output_path)
    print(f"wrote {written.path} ({written.size} bytes)")
    return EXIT_OK


def _policy(keys: Sequence[Path]) -> VerifyPolicy:
    return VerifyPolicy(tuple(load_verifier(path) for path in keys))


def _read(args: argparse.Namespace) -> int:
    with args.artifact.open("rb") as stream:
        header, files = verify_artifact(stream, _policy(args.key))
    description = describe(header, files)
    if args.json:
        json.dump(description, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(description))
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    with args.artifact.open("rb") as stream:
        header, files = verify_artifact(stream, _policy(args.key))
    total = sum(payload_file.size for payload_file in files)
    print(f"{args.artifact}: valid, {len(files)} payload files, {total} bytes verified")
    if header.signature is SignatureStatus.VERIFIED:
        assert header.signed_by is not None
        print(f"signature verified with {header.signed_by.source}")
    elif header.signature is SignatureStatus.UNCHECKED:
        print("signature NOT checked: the artifact is signed, but no key was given (-k)")
    else:
        print("signature NOT checked: the artifact is not signed")
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    signer = load_signer(args.key)
    output = args.output_path or args.artifact
    sign_artifact(args.artifact, output, signer, replace=args.force)
    print(f"signed {output} with {args.key} ({signer.type.value})")
    return EXIT_OK


def _genkey(args: argparse.Namespace) -> int:
    kind = KeyType(args.type)
    key: PrivateKey
    if kind is KeyType.RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif kind is KeyType.ECDSA:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    path: Path = args.output_path
    public_path = path.with_name(path.name + ".pub")
    if path.exists() or public_path.exists():
        raise UsageError(f"{path} or {public_path} exists already; not overwriting a key")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(private_pem(key))
    public_path.write_bytes(public_pem(Signer(key, kind, str(path))))
    print(f"wrote {path} (private, {kind.value}) and {public_path} (public)")
    return EXIT_OK


_COMMANDS = {
    "write": _write,
    "read": _read,
    "validate": _validate,
    "sign": _sign,
    "genkey": _genkey,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(PROGRAM, lambda: _COMMANDS[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
