"""Golden round trips of the small JSON and text members, and their refusals."""

from __future__ import annotations

import pytest

from otad.artifact.headers import (
    FormatVersion,
    HeaderInfo,
    Manifest,
    TypeInfo,
    is_state_script_name,
    parse_meta_data,
)
from otad.errors import MalformedArtifact, UnknownFormat

# Members exactly as Debian's mender-artifact 3.9 writes them.
MENDER_HEADER_INFO = (
    b'{"payloads":[{"type":"rootfs-image"}],"artifact_provides":{"artifact_name":"release-1",'
    b'"artifact_group":"grp"},"artifact_depends":{"artifact_name":["n0"],"device_type":'
    b'["qemux86-64","other"],"artifact_group":["g1"]}}'
)
MENDER_TYPE_INFO = (
    b'{"type":"","artifact_depends":{"dep":"val"},"artifact_provides":{"foo":"bar",'
    b'"rootfs-image.version":"release-1"},"clears_artifact_provides":["artifact_group",'
    b'"rootfs_image_checksum","rootfs-image.*"]}'
)
MENDER_MANIFEST = (
    b"87d7e7ac0def7205e89b7394173e299ce07336bbe1238f9fdd0a6968e57d6517  data/0000/rootfs.ext4\n"
    b"a38d11158157b831a9dc5e9d352769652dad30601af1de5075babd91bb47ef38  header.tar.gz\n"
    b"96bcd965947569404798bcbdb614f103db5a004eb6e364cfc162c146890ea35b  version\n"
)


def test_version_golden() -> None:
    assert FormatVersion().serialize() == b'{"format":"mender","version":3}'
    assert FormatVersion.parse(b'{"format": "mender", "version": 3}') == FormatVersion()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"format":"mender","version":2}', "version 2"),
        (b'{"format":"rauc","version":3}', "'rauc'"),
        (b'{"format":"mender"}', "version None"),
    ],
)
def test_version_refuses_other_formats(data: bytes, fragment: str) -> None:
    with pytest.raises(UnknownFormat, match=fragment):
        FormatVersion.parse(data)


def test_manifest_golden() -> None:
    manifest = Manifest.parse(MENDER_MANIFEST)

    assert manifest.checksums["version"].startswith("96bcd9")
    assert manifest.serialize() == MENDER_MANIFEST


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"abc  version\n", "line 1"),
        (b"96bcd965947569404798bcbdb614f103db5a004eb6e364cfc162c146890ea35b version\n", "line 1"),
        (b"\xff\xfe", "ASCII"),
        (b"", "empty"),
        (MENDER_MANIFEST + MENDER_MANIFEST.splitlines(keepends=True)[0], "twice"),
    ],
)
def test_manifest_refusals(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedArtifact, match=fragment):
        Manifest.parse(data)


def test_header_info_golden() -> None:
    info = HeaderInfo.parse(MENDER_HEADER_INFO)

    assert info == HeaderInfo(
        payload_types=("rootfs-image",),
        artifact_name="release-1",
        artifact_group="grp",
        compatible_devices=("qemux86-64", "other"),
        depends_artifact_names=("n0",),
        depends_groups=("g1",),
    )
    assert info.serialize() == MENDER_HEADER_INFO


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"[]", "JSON object"),
        (b"{", "not valid JSON"),
        (b'{"payloads":[],"artifact_provides":{},"artifact_depends":{}}', "payloads"),
        (
            b'{"payloads":[{"type":"x"}],"artifact_provides":{},"artifact_depends":'
            b'{"device_type":["d"]}}',
            "artifact_name",
        ),
        (
            b'{"payloads":[{"type":"x"}],"artifact_provides":{"artifact_name":"n"},'
            b'"artifact_depends":{}}',
            "device_type",
        ),
        (
            b'{"payloads":[{"type":"x"}],"artifact_provides":{"artifact_name":"n"},'
            b'"artifact_depends":{"device_type":[1]}}',
            "list of strings",
        ),
    ],
)
def test_header_info_refusals(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedArtifact, match=fragment):
        HeaderInfo.parse(data)


def test_type_info_reads_mender_empty_type_as_rootfs_image() -> None:
    info = TypeInfo.parse(MENDER_TYPE_INFO)

    assert info.type == "rootfs-image"
    assert info.provides == {"foo": "bar", "rootfs-image.version": "release-1"}
    assert info.depends == {"dep": "val"}
    assert info.clears_provides == ("artifact_group", "rootfs_image_checksum", "rootfs-image.*")


@pytest.mark.parametrize(
    "info",
    [
        TypeInfo("rootfs-image", {"a": "b"}, {"c": ("d", "e"), "f": "g"}, ("x.*",)),
        TypeInfo("single-file", {}, {}, None),
        TypeInfo(None, {"rootfs-image.version": "1"}),
    ],
)
def test_type_info_round_trip(info: TypeInfo) -> None:
    assert TypeInfo.parse(info.serialize()) == info


def test_type_info_bootstrap_golden() -> None:
    assert TypeInfo(None, {"x": "y"}).serialize() == b'{"type":null,"artifact_provides":{"x":"y"}}'


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"artifact_provides":{}}', "'type'"),
        (b'{"type":3}', "'type'"),
        (b'{"type":"x","artifact_provides":{"a":1}}', "strings"),
        (b'{"type":"x","artifact_depends":[]}', "object"),
    ],
)
def test_type_info_refusals(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedArtifact, match=fragment):
        TypeInfo.parse(data)


def test_meta_data_rules() -> None:
    assert parse_meta_data(b"") == {}
    assert parse_meta_data(b'{"a":"b","n":2,"l":["x",1.5]}') == {"a": "b", "n": 2, "l": ["x", 1.5]}
    for bad in (b'{"a":{"b":1}}', b'{"a":[["x"]]}', b'{"a":true}', b'{"a":null}'):
        with pytest.raises(MalformedArtifact, match="values must be"):
            parse_meta_data(bad)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("ArtifactInstall_Enter_00", True),
        ("ArtifactCommit_Leave_99_notify-server", True),
        ("Download_Error_10", True),
        ("ArtifactInstall_Enter", False),
        ("Idle_Enter_00", False),
        ("../ArtifactInstall_Enter_00", False),
    ],
)
def test_state_script_names(name: str, valid: bool) -> None:
    assert is_state_script_name(name) is valid
