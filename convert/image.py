"""The input image: raw as given, or decompressed (xz, gzip, zstd) into a sparse copy.

The input is only ever read. A raw image is used in place; a compressed one is
streamed through its decompressor into the work directory, skipping runs of zeros so
that the copy is as sparse as the original image was.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from pathlib import Path

from convert import progress
from convert.errors import ImageError
from otad.errors import MissingTool

log = logging.getLogger(__name__)

BLOCK = 1 << 20
_MAGIC = {
    b"\xfd7zXZ\x00": ("xz", "-dc"),
    b"\x1f\x8b": ("gzip", "-dc"),
    b"\x28\xb5\x2f\xfd": ("zstd", "-dcq"),
}


def decompressor(path: Path) -> tuple[str, str] | None:
    """The (tool, option) that decompresses `path`, or None for a raw image."""
    with path.open("rb") as stream:
        head = stream.read(8)
    for magic, command in _MAGIC.items():
        if head.startswith(magic):
            return command
    return None


def raw_image(source: Path, work: Path) -> Path:
    """A raw image with the content of `source`: `source` itself or a sparse copy in `work`."""
    if not source.is_file():
        raise ImageError(f"{source} is not a regular file")
    command = decompressor(source)
    if command is None:
        log.info("input %s is a raw image (%d MiB)", source, source.stat().st_size >> 20)
        return source
    target = work / "input.img"
    log.info("decompressing %s with %s", source, command[0])
    with progress.watch_reads(f"decompressing {source.name}", source, source.stat().st_size):
        _decompress_sparse([*command, str(source)], target)
    return target


def _decompress_sparse(argv: list[str], target: Path) -> None:
    # Streams gigabytes, so it cannot go through otad.process.run, which buffers output.
    log.debug("running %s", shlex.join(argv))
    started = time.monotonic()
    environment = {**os.environ, "LC_ALL": "C"}
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
    except FileNotFoundError:
        raise MissingTool(argv[0]) from None
    with process:
        assert process.stdout is not None
        assert process.stderr is not None
        written = 0
        try:
            with target.open("wb") as out:
                while block := process.stdout.read(BLOCK):
                    if block.count(0) == len(block):
                        out.seek(len(block), os.SEEK_CUR)
                    else:
                        out.write(block)
                    written += len(block)
                out.truncate(written)
        except BaseException:
            process.kill()
            raise
        stderr = process.stderr.read().decode("utf-8", "replace").strip()
    if process.returncode != 0:
        last_line = stderr.splitlines()[-1] if stderr else "no error output"
        raise ImageError(f"{argv[-1]} does not decompress ({argv[0]}: {last_line})")
    log.info("decompressed %d MiB in %.1f s", written >> 20, time.monotonic() - started)
