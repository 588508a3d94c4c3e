"""The converter's options added for speed and progress: --artifact-compression, --quiet."""

from __future__ import annotations

from pathlib import Path

import pytest

from convert import cli, pipeline
from otad.errors import UsageError


def _options(*argv: str) -> pipeline.Options:
    return cli.options_from(cli.build_parser().parse_args(["in.img", "-o", "out.img", *argv]))


def test_the_artifact_is_gzip_unless_asked_otherwise(tmp_path: Path) -> None:
    config = tmp_path / "convert.toml"
    config.write_text('artifact_compression = "none"\n')

    assert _options().artifact_compression == "gzip"
    assert _options("--artifact-compression", "zstd").artifact_compression == "zstd"
    assert _options("--config", str(config)).artifact_compression == "none"
    chosen = _options("--config", str(config), "--artifact-compression", "zstd")
    assert chosen.artifact_compression == "zstd"


def test_an_unknown_artifact_compression_is_refused_before_anything_happens(
    tmp_path: Path,
) -> None:
    config = tmp_path / "convert.toml"
    config.write_text('artifact_compression = "lz4"\n')
    image = tmp_path / "in.img"
    image.write_bytes(bytes(4096))
    options = cli.options_from(
        cli.build_parser().parse_args([str(image), "-o", str(tmp_path / "out.img"),
                                       "--config", str(config)])
    )  # fmt: skip

    with pytest.raises(UsageError, match="artifact compression 'lz4': expected one of gzip"):
        pipeline.convert(options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert.toml", "in.img"]


def test_quiet_is_an_option() -> None:
    assert cli.build_parser().parse_args(["in.img", "-o", "out.img", "-q"]).quiet
    assert not cli.build_parser().parse_args(["in.img", "-o", "out.img"]).quiet
