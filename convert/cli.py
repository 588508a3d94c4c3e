"""otad-convert: the command line of the image converter.

    otad-convert INPUT -o OUTPUT [--storage-size N] [--data-size N] [--device-type T]
                 [--artifact-name N] [--key K] [--verify-key P ...] [--deb FILE ...]
                 [--overlay DIR] [--bootloader auto|grub|rpi-tryboot] [--config FILE]
                 [--artifact-compression gzip|zstd|none] [--watchdog SECONDS] [-q | -v]

Sizes take a K, M, G or T suffix (powers of 1024). --config names a TOML file whose
keys are the long options (storage_size, data_size, device_type, artifact_name, key,
verify_key, deb, overlay, bootloader, artifact_compression, watchdog); options on the
command line override it. Long steps show progress on stderr (a bar on a terminal, a line
every few seconds otherwise); --quiet shows only warnings and errors, and the report.
--watchdog sets the hardware watchdog's timeout, which the image arms in its initramfs
(0: not armed by the image; see convert/watchdog.py).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convert import progress
from convert.errors import ImageError
from convert.pipeline import Options, convert
from convert.report import render
from convert.watchdog import DEFAULT_TIMEOUT as WATCHDOG_TIMEOUT
from otad.cli.common import EXIT_INVALID, run_command, setup_logging
from otad.errors import UsageError

PROGRAM = "otad-convert"
DEFAULTS: dict[str, Any] = {
    "storage_size": "8G",
    "data_size": "128M",
    "bootloader": "auto",
    "artifact_compression": "gzip",
    "watchdog": WATCHDOG_TIMEOUT,
    "verify_key": [],
    "deb": [],
}
_SIZE = re.compile(r"([0-9]+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CONFIG_KEYS = {
    "storage_size": str, "data_size": str, "device_type": str, "artifact_name": str,
    "key": str, "verify_key": list, "deb": list, "overlay": str, "bootloader": str,
    "artifact_compression": str, "watchdog": int,
}  # fmt: skip


def parse_size(text: str, option: str) -> int:
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise UsageError(f"{option}: {text!r} is not a size such as 4G or 512M")
    return int(match[1]) * _UNITS[match[2].upper()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Convert a stock Debian 12 amd64 image (GPT laid out like Debian's cloud "
        "images, or a BIOS/MBR disk as the Debian installer makes it) into an A/B image "
        "with otad, and emit its first signed artifact, OUTPUT with .img replaced by .mender.",
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="raw, .xz, .gz or .zst image")
    parser.add_argument("-o", "--output", type=Path, required=True, help="image to write")
    parser.add_argument("--storage-size", help="size of the target medium (default 8G)")
    parser.add_argument("--data-size", help="initial size of the data partition (default 128M)")
    parser.add_argument("--device-type", help="device type in otad.conf and the artifact "
                        "(default x86_64 for a PC image, raspberrypi-ARCH for a Pi's)")  # fmt: skip
    parser.add_argument("--artifact-name", help="name of the first artifact (default: INPUT's)")
    parser.add_argument("--key", type=Path, help="private key (PEM) to sign the artifact with")
    parser.add_argument("--verify-key", type=Path, action="append", metavar="PUBLIC-KEY",
                        help="public key the device trusts (repeatable)")  # fmt: skip
    parser.add_argument("--deb", type=Path, action="append", metavar="FILE",
                        help="a .deb to install into the image (repeatable)")  # fmt: skip
    parser.add_argument("--overlay", type=Path, metavar="DIR", help="tree to copy over the root")
    parser.add_argument("--bootloader", choices=("auto", "grub", "rpi-tryboot"),
                        help="default auto: grub, or rpi-tryboot for Pi images")  # fmt: skip
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file of these options")
    parser.add_argument("--artifact-compression", choices=("gzip", "zstd", "none"),
                        help="default gzip, which every Mender tool reads; zstd is "
                        "faster, but Debian's mender-artifact cannot read it")  # fmt: skip
    parser.add_argument("--watchdog", type=int, metavar="SECONDS",
                        help="timeout of the hardware watchdog that the image arms in its "
                        f"initramfs and systemd then pings (default {WATCHDOG_TIMEOUT}; "
                        "0: off)")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, no phase lines")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
    return parser


def read_config(path: Path) -> dict[str, Any]:
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"cannot read the config file {path}: {error}") from None
    for key, value in table.items():
        kind = _CONFIG_KEYS.get(key)
        if kind is None:
            raise UsageError(f"{path}: {key!r} is not an option ({', '.join(_CONFIG_KEYS)})")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"{path}: {key} must be a {kind.__name__}")
    return table


def options_from(args: argparse.Namespace) -> Options:
    settings = dict(DEFAULTS)
    if args.config is not None:
        settings.update(read_config(args.config))
    for key in _CONFIG_KEYS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    name = settings.get("artifact_name") or _default_name(args.input)
    overlay = settings.get("overlay")
    signing_key = settings.get("key")
    return Options(
        input=args.input,
        output=args.output,
        storage_size=parse_size(settings["storage_size"], "--storage-size"),
        data_size=parse_size(settings["data_size"], "--data-size"),
        device_type=settings.get("device_type"),
        artifact_name=str(name),
        key=Path(signing_key) if signing_key else None,
        verify_keys=tuple(Path(p) for p in settings["verify_key"]),
        debs=tuple(Path(p) for p in settings["deb"]),
        overlay=Path(overlay) if overlay else None,
        bootloader=str(settings["bootloader"]),
        artifact_compression=str(settings["artifact_compression"]),
        watchdog=int(settings["watchdog"]),
    )


def _default_name(source: Path) -> str:
    name = source.name
    for suffix in (".xz", ".gz", ".zst", ".img", ".raw"):
        name = name.removesuffix(suffix)
    return name or "converted"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else 1 + args.verbose)  # phase lines, and progress:
    progress.configure(sys.stderr, quiet=args.quiet)

    def command() -> int:
        try:
            report = convert(options_from(args))
        except ImageError as error:
            if args.debug:
                raise
            print(f"{PROGRAM}: error: {error}", file=sys.stderr)
            return EXIT_INVALID
        print(render(report), end="")
        return 0

    return run_command(PROGRAM, command, args.debug)


if __name__ == "__main__":
    sys.exit(main())
