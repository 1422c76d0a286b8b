"""The one sandbox lifecycle: every (from, to) pair of the table, the guard and @require."""

from __future__ import annotations

import itertools
import threading

import pytest

from forkyard.errors import SandboxStateError
from forkyard.wire.lifecycle import (
    TRANSITIONS,
    Lifecycle,
    SandboxState,
    check_move,
    require,
)

S = SandboxState

# Written out by hand, apart from the module's table: a change to the table
# must be a change here too.
LEGAL = {
    (S.STARTING, S.RUNNING), (S.STARTING, S.HIBERNATED), (S.STARTING, S.FAILED),
    (S.STARTING, S.LOST),
    (S.RUNNING, S.PAUSED), (S.RUNNING, S.STOPPED), (S.RUNNING, S.HIBERNATING),
    (S.RUNNING, S.HIBERNATED), (S.RUNNING, S.STARTING), (S.RUNNING, S.FAILED),
    (S.RUNNING, S.LOST),
    (S.PAUSED, S.RUNNING), (S.PAUSED, S.FAILED), (S.PAUSED, S.LOST),
    (S.STOPPED, S.STARTING), (S.STOPPED, S.FAILED),
    (S.HIBERNATING, S.HIBERNATED), (S.HIBERNATING, S.RUNNING), (S.HIBERNATING, S.FAILED),
    (S.HIBERNATING, S.LOST),
    (S.HIBERNATED, S.WAKING), (S.HIBERNATED, S.STARTING), (S.HIBERNATED, S.FAILED),
    (S.WAKING, S.RUNNING), (S.WAKING, S.HIBERNATED), (S.WAKING, S.FAILED),
    (S.WAKING, S.LOST),
    (S.FAILED, S.STARTING),
    (S.LOST, S.RUNNING), (S.LOST, S.HIBERNATED), (S.LOST, S.FAILED),
} | {(s, S.DESTROYED) for s in S if s is not S.DESTROYED}

PAIRS = list(itertools.product(S, S))


def test_the_table_covers_every_state_and_matches_the_written_out_moves():
    assert set(TRANSITIONS) == set(S)
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL
    # nothing leaves destroyed; every other state can be destroyed
    assert TRANSITIONS[S.DESTROYED] == frozenset()


@pytest.mark.parametrize(("frm", "to"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_pair(frm: SandboxState, to: SandboxState) -> None:
    if frm is to or (frm, to) in LEGAL:
        assert check_move("sb-x", frm, to) is to
        # the wire carries plain strings: they are accepted too
        assert check_move("sb-x", frm.value, to.value) is to
    else:
        with pytest.raises(SandboxStateError) as e:
            check_move("sb-x", frm, to)
        assert (e.value.sandbox_id, e.value.state) == ("sb-x", frm.value)
        assert e.value.operation == f"move to {to.value}"
        assert frm.value in str(e.value)


def test_the_guard_names_the_operation_it_refused():
    with pytest.raises(SandboxStateError) as e:
        check_move("sb-y", S.DESTROYED, S.RUNNING, "wake")
    assert e.value.operation == "wake"
    assert str(e.value) == "cannot wake sandbox 'sb-y': it is destroyed"


def test_unknown_states_are_refused_not_guessed():
    with pytest.raises(ValueError):
        check_move("sb-x", "sleeping", S.RUNNING)
    with pytest.raises(ValueError):
        check_move("sb-x", S.RUNNING, "zombie")


def test_lifecycle_moves_only_through_the_guard():
    life = Lifecycle("sb-z")
    assert life.state is S.STARTING
    assert life.move(S.RUNNING) is S.STARTING  # returns the state it left
    assert life.state is S.RUNNING
    with pytest.raises(SandboxStateError):
        life.move(S.WAKING)
    assert life.state is S.RUNNING  # a refused move changes nothing
    assert life.move_if({S.STARTING}, S.FAILED) is False
    assert life.state is S.RUNNING
    assert life.move_if({S.RUNNING}, S.PAUSED) is True
    assert life.state is S.PAUSED
    with pytest.raises(SandboxStateError):
        life.move_if({S.PAUSED}, S.HIBERNATING)  # allowed by the caller, not by the table
    assert life.require("exec", S.PAUSED, S.RUNNING) is S.PAUSED
    with pytest.raises(SandboxStateError) as e:
        life.require("exec in", S.RUNNING)
    assert (e.value.operation, e.value.state) == ("exec in", "paused")


def test_concurrent_moves_leave_one_winner():
    life = Lifecycle("sb-race", S.RUNNING)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def attempt(to: SandboxState) -> None:
        barrier.wait()
        try:
            life.move(to)
            results.append(to.value)
        except SandboxStateError:
            results.append("refused")

    # from running both are legal, but after either one the other is not
    targets = [S.HIBERNATING, S.PAUSED] * 4
    threads = [threading.Thread(target=attempt, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert life.state.value in results
    # moves to the state already held are idempotent, so every success is the winner's
    assert {r for r in results if r != "refused"} == {life.state.value}


class _Box:
    def __init__(self, state: SandboxState) -> None:
        self.lifecycle = Lifecycle("sb-box", state)
        self.calls = 0

    @require(S.RUNNING)
    def exec_(self, cmd: str) -> str:
        self.calls += 1
        return cmd

    @require(S.RUNNING, S.PAUSED, operation="talk to")
    def talk(self) -> int:
        self.calls += 1
        return self.calls


def test_require_refuses_other_states_before_the_method_runs():
    box = _Box(S.RUNNING)
    assert box.exec_("ls") == "ls" and box.talk() == 2
    box.lifecycle.move(S.PAUSED)
    assert box.talk() == 3
    with pytest.raises(SandboxStateError) as e:
        box.exec_("ls")
    assert (e.value.operation, e.value.state, e.value.sandbox_id) == ("exec", "paused", "sb-box")
    assert box.calls == 3  # the body never ran
    box.lifecycle.move(S.RUNNING)
    box.lifecycle.move(S.STOPPED)
    with pytest.raises(SandboxStateError) as e:
        box.talk()
    assert e.value.operation == "talk to"
    assert _Box.exec_.__name__ == "exec_"  # functools.wraps kept the name
