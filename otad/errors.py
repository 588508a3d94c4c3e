"""The exception hierarchy of otad.

Every error that otad raises on purpose derives from OtadError. The tree is split by who
is to blame: the artifact (ArtifactError), the keys and signatures (SignatureError), the
person calling a command (UsageError) or the machine (EnvironmentProblem). Messages say
what was expected and what was found; the edges (CLI, D-Bus) print them as one line.
"""

from __future__ import annotations


class OtadError(Exception):
    """Root of every error otad raises on purpose."""


class UsageError(OtadError):
    """The caller asked for something that cannot be done as asked."""


class EnvironmentProblem(OtadError):
    """The machine is missing something (a file, a tool, a permission)."""


class ArtifactError(OtadError):
    """The artifact is not a valid, trustworthy Mender Artifact v3."""


class UnknownFormat(ArtifactError):
    """The `version` member names a format or version otad does not read."""


class TruncatedArtifact(ArtifactError):
    """The artifact, or a member inside it, ends before its declared end."""


class MalformedArtifact(ArtifactError):
    """A member is present but cannot be parsed (bad tar header, bad JSON, bad fields)."""


class MemberOrderError(ArtifactError):
    """Members are missing, repeated, out of order or not allowed at all."""


class UnexpectedMember(MemberOrderError):
    """A member the format does not allow at this place, or one the manifest does not list."""


class MissingMember(MemberOrderError):
    """A member the format or the manifest requires is absent."""


class UnsafePath(ArtifactError):
    """A name inside the artifact is absolute or climbs out of its directory."""


class LimitExceeded(ArtifactError):
    """A member is larger than a sane bound or than what the signed header promises."""


class ChecksumMismatch(ArtifactError):
    """A member's SHA-256 differs from the one the manifest lists."""

    def __init__(self, name: str, expected: str, found: str) -> None:
        super().__init__(f"checksum of {name} is {found}, the manifest says {expected}")
        self.name = name
        self.expected = expected
        self.found = found


class ChunkMismatch(ArtifactError):
    """A payload chunk's SHA-256 differs from the signed chunk index."""

    def __init__(self, name: str, index: int, expected: str, found: str) -> None:
        super().__init__(
            f"chunk {index} of {name} has checksum {found}, the signed chunk index says {expected}"
        )
        self.name = name
        self.index = index
        self.expected = expected
        self.found = found


class CompressionError(ArtifactError):
    """A compressed member is corrupt or uses a compression otad does not know."""


class UnsupportedFeature(ArtifactError):
    """A valid artifact uses a feature otad deliberately does not accept."""


class SignatureError(ArtifactError):
    """The artifact's signature is missing, malformed or made by an untrusted key."""


class MissingSignature(SignatureError):
    """A trusted key is required but the artifact carries no manifest.sig."""


class BadSignature(SignatureError):
    """manifest.sig does not verify with any trusted key."""


class KeyProblem(OtadError):
    """A key file cannot be used: unreadable, unknown type or too weak."""


class MissingTool(EnvironmentProblem):
    """An external command otad needs is not installed."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"required tool {tool!r} is not installed")
        self.tool = tool


class CommandFailed(EnvironmentProblem):
    """An external command exited with an error (or timed out: exit code None)."""

    def __init__(self, argv: list[str], exit_code: int | None, stderr: str) -> None:
        last = stderr.splitlines()[-1] if stderr else "no error output"
        status = "timed out" if exit_code is None else f"exited with {exit_code}"
        super().__init__(f"{argv[0]} {status}: {last}")
        self.argv = argv
        self.exit_code = exit_code
        self.stderr = stderr


class ConfigError(OtadError):
    """The device configuration is invalid; `key` names the setting ('' for the file)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration: {key} {problem}" if key else f"configuration: {problem}")
        self.key = key
        self.problem = problem


class DeviceError(OtadError):
    """A device cannot be found, is ambiguous, or must not be touched (mounted, booted)."""


class StateConflict(OtadError):
    """The request does not fit the current state (busy, not in trial, already on trial)."""


class Incompatible(ArtifactError):
    """The artifact is valid but not for this device or its current software."""


class Downgrade(Incompatible):
    """The artifact is older than the software it would replace."""


class NoSpace(OtadError):
    """The payload does not fit the slot."""


class StateCorrupt(OtadError):
    """The engine's state record cannot be read as one."""


class UnknownPayloadType(EnvironmentProblem):
    """No update module for a payload's type is installed on this device."""

    def __init__(self, payload_type: str, searched: tuple[str, ...]) -> None:
        places = ", ".join(searched) or "no directory"
        super().__init__(
            f"no update module for payload type {payload_type!r}: "
            f"no executable of that name in {places}"
        )
        self.payload_type = payload_type
        self.searched = searched


class ModuleError(OtadError):
    """An update module failed a state: it exited non-zero, hung or broke the protocol.

    `exit_code` is None when the module was killed (timeout) or never started; `stderr`
    holds the end of what the module wrote there.
    """

    def __init__(
        self, module: str, state: str, exit_code: int | None, stderr: str, problem: str
    ) -> None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"update module {module} failed in {state}: {problem} ({last})")
        self.module = module
        self.state = state
        self.exit_code = exit_code
        self.stderr = stderr
        self.problem = problem


class ModuleTimeout(ModuleError):
    """An update module did not finish a state in time and was killed."""


class ModuleProtocolError(ModuleError):
    """An update module answered a query wrongly or did not follow the streams protocol."""


class NotInTrial(StateConflict):
    """Commit was asked for, but the running slot is not on trial."""


class Cancelled(OtadError):
    """The operation was cancelled on request."""


class BootloaderError(OtadError):
    """A bootloader backend cannot read or change the bootloader's state."""


class BootloaderIOError(BootloaderError):
    """A file of the bootloader's state cannot be read or written."""

    def __init__(self, path: str, action: str, reason: str) -> None:
        super().__init__(f"cannot {action} {path}: {reason}")
        self.path = path
        self.action = action
        self.reason = reason


class BootloaderStateError(BootloaderError):
    """The bootloader's state is missing, torn beyond repair or inconsistent."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class SlotConflict(BootloaderError):
    """A request contradicts the slots' states (a trial of the default, no good slot left)."""


class FirmwareTooOld(BootloaderError):
    """The boot firmware lacks a feature the backend needs."""

    def __init__(self, feature: str, found: str, required: str) -> None:
        super().__init__(f"{feature} needs a bootloader built {required} or later, found {found}")
        self.feature = feature
        self.found = found
        self.required = required


class BootSyncError(OtadError):
    """A slot's boot partition cannot be filled from its root filesystem, or reads back wrong.

    `changed` tells whether the partition had already been formatted when it failed: if
    not, its old content is intact; if so, the slot must not boot until a sync succeeds.
    """

    def __init__(self, device: str, problem: str, *, changed: bool) -> None:
        state = "its old content was erased" if changed else "it was not changed"
        super().__init__(f"boot partition {device}: {problem} ({state})")
        self.device = device
        self.problem = problem
        self.changed = changed


class NotAuthorized(OtadError):
    """The caller of a daemon method is not allowed to do what it asked."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"not authorized to {action}: {reason}")
        self.action = action
        self.reason = reason
