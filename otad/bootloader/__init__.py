"""Bootloader backends: how otad asks a bootloader which slot boots and starts a trial."""
