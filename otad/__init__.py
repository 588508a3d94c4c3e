"""otad: A/B over-the-air updates for Debian-based devices."""

__version__ = "0.1.0"
