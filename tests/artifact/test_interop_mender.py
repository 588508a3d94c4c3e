"""otad and Debian's mender-artifact 3.9 read, verify and sign each other's artifacts.

Both tools write the same artifact from the same flags (-n, -t, -f, -p, -d, -g, -G, -N,
-m, -s, --software-version, --clears-provides), so one table of cases drives both
directions. mender-artifact has no JSON output: `parse_mender_read` turns the text of
`mender-artifact read` into a `Summary`, the shape otad's `read --json` is reduced to,
and the two are compared with each other and with what the case asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from otad.artifact.chunks import PREFIX
from otad.artifact.compression import Compression
from otad.artifact.describe import describe
from otad.artifact.reader import SignatureStatus, VerifyPolicy, verify_artifact
from otad.artifact.writer import ArtifactSpec, rootfs_image, write_artifact
from otad.errors import BadSignature
from tests.artifact.conftest import KeyPair, make_payload
from tests.conftest import require_tool

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "ArtifactInstall_Enter_01"
SIGNED_BY_MENDER = "signed and verified correctly"
VALIDATED_BY_MENDER = "validated successfully"


# -- what both tools report ----------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """The fields both tools report about a one-payload artifact, comparable with ==."""

    name: str
    signature: str  # a SignatureStatus value
    devices: tuple[str, ...]
    group: str | None
    depends_names: tuple[str, ...]
    depends_groups: tuple[str, ...]
    scripts: tuple[str, ...]
    payload_type: str | None
    provides: dict[str, str]
    depends: dict[str, str]
    clears_provides: tuple[str, ...] | None
    meta_data: dict[str, Any]
    files: tuple[tuple[str, int, str], ...]  # name, size, SHA-256 hex


def summary_from_otad(description: Mapping[str, Any]) -> Summary:
    """Reduce `otad-artifact read --json` output (or `describe()`) to a Summary."""
    (payload,) = description["payloads"]
    clears = payload["clears_provides"]
    return Summary(
        name=description["name"],
        signature=description["signature"]["status"],
        devices=tuple(description["compatible_devices"]),
        group=description["provides_group"],
        depends_names=tuple(description["depends_artifact_names"]),
        depends_groups=tuple(description["depends_groups"]),
        scripts=tuple(sorted(description["state_scripts"])),
        payload_type=payload["type"],
        provides=payload["provides"],
        depends=payload["depends"],
        clears_provides=None if clears is None else tuple(clears),
        meta_data=payload["meta_data"],
        files=tuple((f["name"], f["size"], f["checksum"]) for f in payload["files"]),
    )


# -- parsing `mender-artifact read` ----------------------------------------------------


def _mender_signature(text: str) -> str:
    if text == SIGNED_BY_MENDER:
        return SignatureStatus.VERIFIED.value
    if text == "no signature":
        return SignatureStatus.UNSIGNED.value
    if text.startswith("signed but no key"):
        return SignatureStatus.UNCHECKED.value
    raise ValueError(f"unknown signature line from mender-artifact: {text!r}")


def _go_list(text: str, separator: str | None) -> tuple[str, ...]:
    """`[a b]` (Go's %v of a slice) or `[a, b]` as a tuple; `[]` is empty."""
    inner = text.strip("'").removeprefix("[").removesuffix("]")
    return tuple(item for item in inner.split(separator) if item)


def _sections(block: str, depth: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Split `Key: value` lines indented by `depth` spaces into inline values and the
    deeper lines under each key (provides, meta-data JSON, files, script names)."""
    inline: dict[str, str] = {}
    nested: dict[str, list[str]] = {}
    current: str | None = None
    for line in block.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t") or len(line) - len(line.lstrip(" ")) > depth:
            if current is None:
                raise ValueError(f"indented line {line!r} outside a section")
            nested[current].append(line.strip())
            continue
        current, _, value = line.strip().partition(":")
        inline[current] = value.strip()
        nested[current] = []
    return inline, nested


def _pairs(lines: Sequence[str]) -> dict[str, str]:
    return dict(line.partition(": ")[::2] for line in lines)


def _mender_files(lines: Sequence[str]) -> tuple[tuple[str, int, str], ...]:
    values: dict[str, list[str]] = {"name": [], "size": [], "checksum": []}
    for line in lines:
        key, _, value = line.partition(":")
        if key in values:
            values[key].append(value.strip())
    return tuple(
        (name, int(size), checksum)
        for name, size, checksum in zip(
            values["name"], values["size"], values["checksum"], strict=True
        )
    )


def parse_mender_read(text: str) -> Summary:
    """Parse the text `mender-artifact read` prints for a one-payload artifact."""
    _, found, rest = text.partition("Mender artifact:\n")
    head, updates_found, body = rest.partition("\nUpdates:\n")
    if not found or not updates_found:
        raise ValueError(f"not the output of mender-artifact read:\n{text}")
    top, top_nested = _sections(head, depth=2)
    updates = re.split(r"^ {4}[0-9]+:$", body, flags=re.MULTILINE)[1:]
    if len(updates) != 1:
        raise ValueError(f"expected one payload, mender-artifact shows {len(updates)}")
    update, nested = _sections(updates[0], depth=4)
    clears = update.get("Clears Provides")
    meta = update["Metadata"]
    return Summary(
        name=top["Name"],
        signature=_mender_signature(top["Signature"]),
        devices=_go_list(top["Compatible devices"], None),
        group=top["Provides group"] or None,
        depends_names=_go_list(top["Depends on one of artifact(s)"], ", "),
        depends_groups=_go_list(top["Depends on one of group(s)"], ", "),
        scripts=tuple(sorted(top_nested["State scripts"])),
        payload_type=None if update["Type"] == "Empty type" else update["Type"],
        provides=_pairs(nested["Provides"]),
        depends=_pairs(nested["Depends"]),
        clears_provides=None if clears is None else tuple(json.loads(clears)),
        meta_data={} if meta == "Nothing" else json.loads("\n".join(nested["Metadata"])),
        files=() if update["Files"] == "None" else _mender_files(nested["Files"]),
    )


def without_otad_keys(summary: Summary) -> tuple[Summary, set[str]]:
    """The summary without otad's own meta-data keys, and those keys.

    otad keeps its signed size promise and chunk index in meta-data under `otad.`;
    mender-artifact shows them as ordinary meta-data, otad's reader hides them.
    """
    user = {key: value for key, value in summary.meta_data.items() if not key.startswith(PREFIX)}
    own = set(summary.meta_data) - set(user)
    return dataclasses.replace(summary, meta_data=user), own


PARSER_CASES = [
    pytest.param(
        "Mender artifact:\n  Name: rel-1\n  Format: mender\n  Version: 3\n"
        "  Signature: signed and verified correctly\n"
        "  Compatible devices: '[dev1 dev2]'\n  Provides group: grp\n"
        "  Depends on one of artifact(s): [a, b]\n  Depends on one of group(s): []\n"
        "  State scripts:\n    ArtifactInstall_Enter_01\n\nUpdates:\n    0:\n"
        "    Type:   directory\n    Provides:\n\tk: v: w\n    Depends: Nothing\n"
        '    Clears Provides: ["x.*"]\n    Metadata:\n\t{\n\t  "n": [1, "s"]\n\t}\n'
        "    Files:\n      name:     f\n      size:     3\n"
        "      modified: 2024-01-01 00:00:00 +0000 UTC\n      checksum: abc\n",
        Summary(
            name="rel-1",
            signature="verified",
            devices=("dev1", "dev2"),
            group="grp",
            depends_names=("a", "b"),
            depends_groups=(),
            scripts=(SCRIPT,),
            payload_type="directory",
            provides={"k": "v: w"},
            depends={},
            clears_provides=("x.*",),
            meta_data={"n": [1, "s"]},
            files=(("f", 3, "abc"),),
        ),
        id="module",
    ),
    pytest.param(
        "Mender artifact:\n  Name: boot\n  Format: mender\n  Version: 3\n"
        "  Signature: no signature\n  Compatible devices: '[dev1]'\n  Provides group: \n"
        "  Depends on one of artifact(s): []\n  Depends on one of group(s): [g]\n"
        "  State scripts:\n\nUpdates:\n    0:\n    Type:   Empty type\n"
        "    Provides:\n\tp: 1\n    Depends:\n\td: 2\n\te: 3\n    Metadata: Nothing\n"
        "    Files: None\n",
        Summary(
            name="boot",
            signature="unsigned",
            devices=("dev1",),
            group=None,
            depends_names=(),
            depends_groups=("g",),
            scripts=(),
            payload_type=None,
            provides={"p": "1"},
            depends={"d": "2", "e": "3"},
            clears_provides=None,
            meta_data={},
            files=(),
        ),
        id="bootstrap",
    ),
]


@pytest.mark.parametrize(("text", "summary"), PARSER_CASES)
def test_parser_reads_every_field(text: str, summary: Summary) -> None:
    assert parse_mender_read(text) == summary


# -- running the tools -----------------------------------------------------------------


def _run(argv: Sequence[str | Path], check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C", PYTHONPATH=str(REPO), SOURCE_DATE_EPOCH="0")
    return subprocess.run(
        [str(arg) for arg in argv],
        check=check,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.fixture(scope="module")
def mender() -> str:
    return require_tool("mender-artifact")


def otad(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "otad.cli.artifact", *args], check=check)


def otad_read(artifact: Path, key: Path | None) -> dict[str, Any]:
    key_args: list[str | Path] = ["-k", key] if key else []
    description: dict[str, Any] = json.loads(otad("read", "--json", *key_args, artifact).stdout)
    return description


def mender_read(tool: str, artifact: Path, key: Path | None) -> Summary:
    key_args: list[str | Path] = ["-k", key] if key else []
    return parse_mender_read(_run([tool, "read", *key_args, artifact]).stdout)


def mender_validate(tool: str, artifact: Path, key: Path) -> subprocess.CompletedProcess[str]:
    return _run([tool, "validate", "-k", key, artifact], check=False)


# -- the artifacts -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One artifact, written with the same `write` flags by either tool."""

    command: str  # the write subcommand; otad accepts mender-artifact's spelling
    name: str
    payload_type: str | None
    devices: tuple[str, ...]
    default_clears: tuple[str, ...] | None  # what both write without --clears-provides
    files: tuple[tuple[str, int], ...] = ()  # name, size
    software_version: str | None = None
    group: str | None = None
    depends_names: tuple[str, ...] = ()
    depends_groups: tuple[str, ...] = ()
    provides: tuple[tuple[str, str], ...] = ()
    depends: tuple[tuple[str, str], ...] = ()
    clears_provides: tuple[str, ...] = ()
    meta_data: dict[str, Any] = field(default_factory=dict)
    scripts: tuple[str, ...] = ()
    otad_flags: tuple[str, ...] = ()
    otad_meta_keys: frozenset[str] = frozenset()  # what otad adds to the meta-data


ROOTFS = Case(
    command="rootfs-image",
    name="rel-1",
    payload_type="rootfs-image",
    devices=("qemux86-64", "rpi4"),
    default_clears=("artifact_group", "rootfs_image_checksum", "rootfs-image.*"),
    files=(("rootfs.ext4", 20_000),),
    software_version="1.2.3",
    group="stable",
    depends_names=("rel-0", "rel-0.9"),
    depends_groups=("canary", "stable"),
    provides=(("build.id", "42"), ("vendor", "acme")),
    depends=(("bootloader", "u-boot"),),
    otad_flags=("--chunk-size", "4096"),
    otad_meta_keys=frozenset({"otad.chunk_size", "otad.chunks", "otad.files", "otad.sizes"}),
)
MODULE = Case(
    command="module-image",
    name="app-2",
    payload_type="directory",
    devices=("rpi4",),
    default_clears=("rootfs-image.directory.*",),
    files=(("app.tar", 3000), ("app.conf", 17), ("empty", 0)),
    software_version="2.0",
    provides=(("app.flavour", "lite"),),
    depends=(("os", "bookworm"),),
    meta_data={"dest_dir": "/opt/app", "mode": 493, "ratio": 0.5, "tags": ["a", 1]},
    scripts=(SCRIPT,),
    otad_meta_keys=frozenset({"otad.files", "otad.sizes"}),
)
BOOTSTRAP = Case(
    command="bootstrap-artifact",
    name="factory-1",
    payload_type=None,
    devices=("qemux86-64", "rpi4"),
    default_clears=None,
    group="factory",
    depends_names=("rel-0",),
    depends_groups=("lab",),
    provides=(("rootfs-image.version", "1.0"), ("data.layout", "v2")),
    depends=(("hw.rev", "3"),),
    clears_provides=("rootfs-image.*", "data.*"),
)
CASES = [pytest.param(case, id=case.command) for case in (ROOTFS, MODULE, BOOTSTRAP)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_argv(case: Case, directory: Path) -> list[str | Path]:
    """The `write` arguments both tools take, after creating the payload files."""
    argv: list[str | Path] = ["write", case.command, "-n", case.name]
    for device in case.devices:
        argv += ["-t", device]
    if case.payload_type and case.command == "module-image":
        argv += ["-T", case.payload_type]
    for seed, (name, size) in enumerate(case.files, start=1):
        argv += ["-f", make_payload(directory / name, size, seed)]
    if case.software_version:
        argv += ["--software-version", case.software_version]
    if case.group:
        argv += ["-g", case.group]
    for name in case.depends_names:
        argv += ["-N", name]
    for group in case.depends_groups:
        argv += ["-G", group]
    argv += [arg for key, value in case.provides for arg in ("-p", f"{key}:{value}")]
    argv += [arg for key, value in case.depends for arg in ("-d", f"{key}:{value}")]
    for pattern in case.clears_provides:
        argv += ["--clears-provides", pattern]
    if case.meta_data:
        meta = directory / "meta-data.json"
        meta.write_text(json.dumps(case.meta_data))
        argv += ["-m", meta]
    for script in case.scripts:
        path = directory / script
        path.write_text("#!/bin/sh\nexit 0\n")
        argv += ["-s", path]
    return argv


def expected(case: Case, directory: Path, signature: SignatureStatus) -> Summary:
    """What both tools must report for `case`, its payload files written in `directory`."""
    files = tuple((name, size, _digest(directory / name)) for name, size in case.files)
    provides = dict(case.provides)
    # Mender's conventions for the provides a payload implies.
    if case.command == "rootfs-image":
        provides["rootfs-image.checksum"] = files[0][2]
        provides["rootfs-image.version"] = str(case.software_version)
    elif case.command == "module-image":
        provides[f"rootfs-image.{case.payload_type}.version"] = str(case.software_version)
    return Summary(
        name=case.name,
        signature=signature.value,
        devices=case.devices,
        group=case.group,
        depends_names=case.depends_names,
        depends_groups=case.depends_groups,
        scripts=case.scripts,
        payload_type=case.payload_type,
        provides=provides,
        depends=dict(case.depends),
        clears_provides=case.clears_provides or case.default_clears,
        meta_data=case.meta_data,
        files=files,
    )


def write_with_mender(
    tool: str, case: Case, directory: Path, compression: str, key: KeyPair | None
) -> Path:
    output = directory / f"mender-{case.command}-{compression}.mender"
    key_args: list[str | Path] = ["-k", key.private] if key else []
    argv = [tool, *write_argv(case, directory), "--compression", compression, *key_args]
    _run([*argv, "-o", output])
    return output


def write_with_otad(case: Case, directory: Path, compression: str, key: KeyPair | None) -> Path:
    output = directory / f"otad-{case.command}-{compression}.mender"
    key_args: list[str | Path] = ["-k", key.private] if key else []
    argv = [*write_argv(case, directory), *case.otad_flags, "--compression", compression]
    otad(*argv, *key_args, "-o", output)
    return output


def verify_with_otad(artifact: Path, key: KeyPair | None) -> Summary:
    """Verify in-process and through the CLI; both must describe the artifact alike."""
    policy = VerifyPolicy((key.verifier,)) if key else VerifyPolicy()
    with artifact.open("rb") as stream:
        header, files = verify_artifact(stream, policy)

    assert all(payload_file.verified for payload_file in files)
    description = describe(header, files)
    assert otad_read(artifact, key.public if key else None) == description
    return summary_from_otad(description)


# -- A: artifacts mender-artifact writes, read by otad ----------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("key_name", [None, "rsa", "ecdsa"])
@pytest.mark.parametrize("compression", ["none", "gzip", "lzma"])
def test_otad_reads_what_mender_writes(
    mender: str,
    tmp_path: Path,
    keys: dict[str, KeyPair],
    case: Case,
    key_name: str | None,
    compression: str,
) -> None:
    key = keys[key_name] if key_name else None
    artifact = write_with_mender(mender, case, tmp_path, compression, key)
    status = SignatureStatus.VERIFIED if key else SignatureStatus.UNSIGNED

    by_otad = verify_with_otad(artifact, key)
    by_mender = mender_read(mender, artifact, key.public if key else None)

    assert by_otad == by_mender
    assert by_otad == expected(case, tmp_path, status)


@pytest.mark.parametrize(
    ("signed_with", "trusted"),
    [("rsa", "rsa2048"), ("rsa", "ecdsa"), ("ecdsa", "other"), ("ecdsa", "rsa")],
)
def test_otad_refuses_mender_signature_with_the_wrong_key(
    mender: str, tmp_path: Path, keys: dict[str, KeyPair], signed_with: str, trusted: str
) -> None:
    artifact = write_with_mender(mender, ROOTFS, tmp_path, "gzip", keys[signed_with])
    before = _digest(artifact)

    with artifact.open("rb") as stream, pytest.raises(BadSignature):
        verify_artifact(stream, VerifyPolicy((keys[trusted].verifier,)))
    refused = otad("validate", "-k", keys[trusted].public, artifact, check=False)

    assert refused.returncode == 1
    assert "does not verify" in refused.stderr
    assert _digest(artifact) == before


# -- B: artifacts otad writes, read by mender-artifact ----------------------------------


def in_otad_manifest_order(summary: Summary) -> Summary:
    """mender-artifact lists files in manifest order, and otad writes its manifest sorted
    by name; the data archive keeps the order the files were given in."""
    return dataclasses.replace(summary, files=tuple(sorted(summary.files)))


def check_mender_accepts(tool: str, artifact: Path, key: KeyPair, want: Summary) -> set[str]:
    """mender-artifact validates `artifact` with `key` and reports `want`.

    Returns the otad meta-data keys mender-artifact showed besides the user's.
    """
    validated = mender_validate(tool, artifact, key.public)
    assert (validated.returncode, validated.stderr) == (0, "")
    assert VALIDATED_BY_MENDER in validated.stdout

    by_mender, otad_keys = without_otad_keys(mender_read(tool, artifact, key.public))
    assert by_mender == want
    return otad_keys


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("key_name", ["rsa", "ecdsa"])
@pytest.mark.parametrize("compression", ["none", "gzip", "xz", "lzma"])
def test_mender_reads_what_otad_writes(
    mender: str,
    tmp_path: Path,
    keys: dict[str, KeyPair],
    case: Case,
    key_name: str,
    compression: str,
) -> None:
    key = keys[key_name]
    artifact = write_with_otad(case, tmp_path, compression, key)
    want = expected(case, tmp_path, SignatureStatus.VERIFIED)

    shown = check_mender_accepts(mender, artifact, key, in_otad_manifest_order(want))
    assert shown == case.otad_meta_keys
    assert verify_with_otad(artifact, key) == want


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("key_name", ["rsa", "ecdsa"])
def test_mender_accepts_otad_signing_an_otad_artifact(
    mender: str, tmp_path: Path, keys: dict[str, KeyPair], case: Case, key_name: str
) -> None:
    key = keys[key_name]
    unsigned = write_with_otad(case, tmp_path, "gzip", None)
    signed = tmp_path / "signed.mender"

    otad("sign", "-k", key.private, "-o", signed, unsigned)

    want = expected(case, tmp_path, SignatureStatus.VERIFIED)
    shown = check_mender_accepts(mender, signed, key, in_otad_manifest_order(want))
    assert shown == case.otad_meta_keys
    assert verify_with_otad(signed, key) == want
    assert verify_with_otad(unsigned, None) == dataclasses.replace(want, signature="unsigned")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("key_name", "compression"), [("rsa", "lzma"), ("ecdsa", "none")])
def test_mender_accepts_otad_signing_a_mender_artifact(
    mender: str,
    tmp_path: Path,
    keys: dict[str, KeyPair],
    case: Case,
    key_name: str,
    compression: str,
) -> None:
    key = keys[key_name]
    artifact = write_with_mender(mender, case, tmp_path, compression, None)

    otad("sign", "-k", key.private, artifact)

    want = expected(case, tmp_path, SignatureStatus.VERIFIED)
    assert check_mender_accepts(mender, artifact, key, want) == set()
    assert verify_with_otad(artifact, key) == want


def test_mender_cannot_verify_otad_ed25519_signature(
    mender: str, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    """Ed25519 signing is an otad extension that mender-artifact 3.9 does not read."""
    key = keys["ed25519"]
    artifact = write_with_otad(ROOTFS, tmp_path, "gzip", key)

    assert verify_with_otad(artifact, key) == expected(ROOTFS, tmp_path, SignatureStatus.VERIFIED)

    # mender-artifact 3.9 refuses the key but still exits 0, so look at what it says.
    with_ed25519 = mender_validate(mender, artifact, key.public)
    assert "unsupported public key type" in with_ed25519.stderr
    assert VALIDATED_BY_MENDER not in with_ed25519.stdout
    shown = _run([mender, "read", "-k", key.public, artifact], check=False)
    assert SIGNED_BY_MENDER not in shown.stdout

    for other in ("rsa", "ecdsa"):
        refused = mender_validate(mender, artifact, keys[other].public)
        assert refused.returncode != 0
        assert "verification failed" in refused.stderr or "verification error" in refused.stderr


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.XZ])
def test_mender_reads_an_image_compressed_in_many_members(
    mender: str, tmp_path: Path, keys: dict[str, KeyPair], compression: Compression
) -> None:
    """otad-artifact cuts a rootfs image's compressed data into members (what lets a
    download resume); mender-artifact reads across all of them: `validate` checks the
    image's SHA-256, and fails once a byte of the last member is changed."""
    key = keys["ecdsa"]
    image = tmp_path / "rootfs.img"
    image.write_bytes(random.Random(5).randbytes(40 * 65536 + 1000))  # every member large
    spec = ArtifactSpec(
        name="release-1",
        device_types=("otad-test",),
        payload=rootfs_image(image, software_version="1", chunk_size=65536),
        compression=compression,
        member_chunks=4,
        signer=key.signer,
    )
    artifact = write_artifact(spec, tmp_path / "members.mender").path
    with artifact.open("rb") as stream:
        _, files = verify_artifact(stream)
    boundaries = files[0].boundaries()
    assert len(boundaries) == 10
    member = files[0].member_offset
    assert member is not None

    validated = mender_validate(mender, artifact, key.public)
    assert (validated.returncode, validated.stderr) == (0, "")
    assert VALIDATED_BY_MENDER in validated.stdout
    assert mender_read(mender, artifact, key.public).name == "release-1"

    raw = bytearray(artifact.read_bytes())
    raw[member + boundaries[-1].compressed + 100] ^= 0xFF
    tampered = tmp_path / "tampered.mender"
    tampered.write_bytes(bytes(raw))
    refused = mender_validate(mender, tampered, key.public)
    assert refused.returncode != 0
    assert VALIDATED_BY_MENDER not in refused.stdout
