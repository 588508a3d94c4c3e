"""The converter's errors, which all name the image or option that caused them."""

from __future__ import annotations

from otad.errors import EnvironmentProblem, OtadError


class ImageError(OtadError):
    """The input image cannot be converted: corrupt, truncated, of a layout not known."""


class NotSupportedYet(ImageError):
    """The image is valid but of a kind (architecture, bootloader) otad does not convert yet."""


class AlreadyConverted(ImageError):
    """The input image already has otad's A/B layout or configuration."""


class TooSmall(ImageError):
    """The requested storage or data size cannot hold what the image needs."""


class PackageFailed(ImageError):
    """A .deb given with --deb did not install into the image."""


class EmulationMissing(EnvironmentProblem):
    """The image is for another architecture and this machine cannot run its programs."""


class InitramfsFailed(ImageError):
    """The image's initramfs could not be rebuilt with the watchdog armed."""
