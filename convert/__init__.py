"""otad-convert: turns a stock Debian disk image into an A/B image with otad installed.

The converter reads a stock image (never changing it), lays out a new one with an EFI
system partition, a BIOS boot partition, two root filesystem slots and a data
partition, copies the root filesystem into both slots, installs otad's GRUB
integration, and emits the first signed artifact, which holds slot A's filesystem.
Its phases are the functions `convert.pipeline.convert` calls, in that order.
Supported today: Debian 12 amd64 GPT images laid out like the official cloud images.
"""
