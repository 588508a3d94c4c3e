"""The EFI system partition, read and written with mtools only (FAT is never mounted)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otad.process import run

TOOLS = ("mcopy", "mmd", "mdir", "mtype")
FORMAT_TOOL = "mkfs.vfat"  # only needed when an ESP is made (MBR inputs)
# No geometry check (a partition has none to offer), and no personal ~/.mtoolsrc.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


@dataclass(frozen=True)
class FatVolume:
    """A FAT filesystem at byte `offset` of `image`."""

    image: Path
    offset: int

    @property
    def spec(self) -> str:
        return f"{self.image}@@{self.offset}"

    def exists(self, path: str) -> bool:
        result = run(["mdir", "-b", "-i", self.spec, f"::/{path}"], env=MTOOLS_ENV, check=False)
        return result.returncode == 0

    def read_text(self, path: str) -> str:
        result = run(["mtype", "-i", self.spec, f"::/{path}"], env=MTOOLS_ENV)
        return result.stdout.decode("utf-8", "replace")

    def make_directory(self, path: str) -> None:
        if not self.exists(path):
            run(["mmd", "-i", self.spec, f"::/{path}"], env=MTOOLS_ENV)

    def put(self, source: Path, path: str) -> None:
        """Copy the file or tree `source` to `path`, replacing what is there."""
        run(["mcopy", "-o", "-s", "-i", self.spec, source, f"::/{path}"], env=MTOOLS_ENV)


def format_volume(image: Path, offset: int, size: int, label: str) -> FatVolume:
    """A new, empty FAT32 filesystem of `size` bytes at byte `offset` of `image`."""
    # One sector per cluster keeps FAT32's cluster count above its minimum on a small ESP.
    run([FORMAT_TOOL, "-F", "32", "-s", "1", "-n", label, "--offset", str(offset // 512),
         image, str(size // 1024)])  # fmt: skip
    return FatVolume(image, offset)
