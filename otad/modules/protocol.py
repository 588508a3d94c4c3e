"""The states of the Update Module v3 protocol and the answers of its query states.

A module is called as `MODULE STATE TREE`. Action states succeed by exiting 0; query
states also print one word on stdout. Answers are parsed as strictly as Mender parses
them (one line, exact words, nothing printed means the default), so a module tested
with otad behaves the same under a Mender client.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Every state a module can be called with; the values are the argv spelling."""

    PROVIDE_PAYLOAD_FILE_SIZES = "ProvidePayloadFileSizes"
    DOWNLOAD = "Download"
    DOWNLOAD_WITH_FILE_SIZES = "DownloadWithFileSizes"
    ARTIFACT_INSTALL = "ArtifactInstall"
    NEEDS_ARTIFACT_REBOOT = "NeedsArtifactReboot"
    ARTIFACT_REBOOT = "ArtifactReboot"
    ARTIFACT_VERIFY_REBOOT = "ArtifactVerifyReboot"
    ARTIFACT_COMMIT = "ArtifactCommit"
    SUPPORTS_ROLLBACK = "SupportsRollback"
    ARTIFACT_ROLLBACK = "ArtifactRollback"
    ARTIFACT_ROLLBACK_REBOOT = "ArtifactRollbackReboot"
    ARTIFACT_VERIFY_ROLLBACK_REBOOT = "ArtifactVerifyRollbackReboot"
    ARTIFACT_FAILURE = "ArtifactFailure"
    CLEANUP = "Cleanup"

    @property
    def is_query(self) -> bool:
        """True for the states whose stdout is an answer rather than a log."""
        return self in _ANSWERS


class RebootAction(enum.Enum):
    """The answer to NeedsArtifactReboot.

    NO: no reboot. YES: call the module's own ArtifactReboot (a peripheral device).
    AUTOMATIC: the engine reboots the host once, for every module that asked.
    """

    NO = "No"
    YES = "Yes"
    AUTOMATIC = "Automatic"


# The words each query state may print; the first is the default (nothing printed).
_ANSWERS: dict[State, tuple[str, ...]] = {
    State.PROVIDE_PAYLOAD_FILE_SIZES: ("No", "Yes"),
    State.NEEDS_ARTIFACT_REBOOT: ("No", "Yes", "Automatic"),
    State.SUPPORTS_ROLLBACK: ("No", "Yes"),
}


def parse_answer(state: State, stdout: bytes) -> str:
    """The word a query state printed, or its default; ValueError names what is wrong.

    Mender accepts exactly one line (a trailing newline is optional) holding one of the
    state's words, and treats empty output as the default.
    """
    words = _ANSWERS[state]
    text = stdout.decode("utf-8", "replace")
    lines = text.split("\n")
    if len(lines) > 2 or (len(lines) == 2 and lines[1]):
        raise ValueError(f"expected one line, found {len(text.splitlines())}: {text[:200]!r}")
    answer = lines[0]
    if answer == "":
        return words[0]
    if answer not in words:
        raise ValueError(f"expected one of {', '.join(words)}, found {answer[:200]!r}")
    return answer


def parse_yes_no(state: State, stdout: bytes) -> bool:
    """The answer of a Yes/No query state as a boolean."""
    return parse_answer(state, stdout) == "Yes"


def parse_reboot_action(state: State, stdout: bytes) -> RebootAction:
    """The answer of NeedsArtifactReboot (`state`)."""
    return RebootAction(parse_answer(state, stdout))
