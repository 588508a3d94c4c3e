"""The answers of the query states, parsed as strictly as Mender parses them."""

from __future__ import annotations

import pytest

from otad.modules.protocol import (
    RebootAction,
    State,
    parse_answer,
    parse_reboot_action,
    parse_yes_no,
)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (b"", RebootAction.NO),
        (b"No", RebootAction.NO),
        (b"No\n", RebootAction.NO),
        (b"Yes\n", RebootAction.YES),
        (b"Automatic\n", RebootAction.AUTOMATIC),
    ],
)
def test_reboot_answers(output: bytes, expected: RebootAction) -> None:
    assert parse_reboot_action(State.NEEDS_ARTIFACT_REBOOT, output) is expected


@pytest.mark.parametrize("state", [State.SUPPORTS_ROLLBACK, State.PROVIDE_PAYLOAD_FILE_SIZES])
@pytest.mark.parametrize(("output", "expected"), [(b"", False), (b"No\n", False), (b"Yes", True)])
def test_yes_no_answers(state: State, output: bytes, expected: bool) -> None:
    assert parse_yes_no(state, output) is expected


@pytest.mark.parametrize(
    ("state", "output", "problem"),
    [
        (State.NEEDS_ARTIFACT_REBOOT, b"Maybe\n", "expected one of No, Yes, Automatic"),
        (State.NEEDS_ARTIFACT_REBOOT, b"yes\n", "found 'yes'"),
        (State.SUPPORTS_ROLLBACK, b"Automatic\n", "expected one of No, Yes"),
        (State.SUPPORTS_ROLLBACK, b"Yes\nNo\n", "expected one line"),
        (State.PROVIDE_PAYLOAD_FILE_SIZES, b" Yes\n", "found ' Yes'"),
        (State.PROVIDE_PAYLOAD_FILE_SIZES, b"\n\n", "expected one line"),
    ],
)
def test_invalid_answers(state: State, output: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_answer(state, output)


def test_only_queries_have_answers() -> None:
    queries = {state for state in State if state.is_query}
    assert queries == {
        State.PROVIDE_PAYLOAD_FILE_SIZES,
        State.NEEDS_ARTIFACT_REBOOT,
        State.SUPPORTS_ROLLBACK,
    }
