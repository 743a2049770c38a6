"""The deployment lifecycle: every allowed transition, and refusals that say what is allowed."""

from __future__ import annotations

import itertools

import pytest

from deployments.states import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    State,
    TransitionError,
    check_transition,
)

HAPPY_PATH = [
    State.PENDING,
    State.QUEUED,
    State.LAUNCHING,
    State.LOADING,
    State.READY,
    State.STOPPING,
    State.STOPPED,
]


def test_the_happy_path_is_allowed_step_by_step() -> None:
    for old, new in itertools.pairwise(HAPPY_PATH):
        check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.PENDING, State.READY),
        (State.STOPPED, State.READY),
        (State.FAILED, State.LOADING),
        (State.READY, State.LOADING),
    ],
)
def test_skipping_or_reviving_is_refused_with_the_allowed_moves(old: State, new: State) -> None:
    with pytest.raises(TransitionError, match=f"cannot go from {old} to {new}"):
        check_transition(old, new)


def test_every_running_state_can_fail_and_terminal_states_only_restart() -> None:
    for state in ACTIVE - {State.STOPPING}:
        check_transition(state, State.FAILED)
    for state in TERMINAL:
        assert TRANSITIONS[state] == {State.QUEUED}


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="exploded"):
        check_transition("ready", "exploded")
