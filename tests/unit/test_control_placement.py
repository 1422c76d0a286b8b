"""Placement rules (docs/api.md, "Placement") on worker snapshots."""

from __future__ import annotations

import pytest

from forkyard.control._placement import Candidate, Placement, choose
from forkyard.errors import FleetError
from forkyard.wire.errors import error_body

CP = "c" * 64
BASE = "b" * 64


def worker(name: str, *, alive: bool = True, running: int = 0, free: int = 8000,
           max_sandboxes: int = 32, checkpoints: frozenset[str] = frozenset(),
           bases: frozenset[str] = frozenset(), images: dict[str, str] | None = None
           ) -> Candidate:
    return Candidate(name, alive, running, free, max_sandboxes, checkpoints, bases,
                     images or {})


def status(exc: pytest.ExceptionInfo[FleetError]) -> int:
    """The status the refusal becomes at the HTTP boundary."""
    return error_body(exc.value)[0]


def test_explicit_worker_wins_over_every_preference():
    ws = [worker("a", checkpoints=frozenset({CP})), worker("b", running=5)]
    assert choose(ws, Placement(checkpoint=CP), explicit="b") == "b"


def test_explicit_worker_errors():
    ws = [worker("a"), worker("dead", alive=False), worker("full", running=2, max_sandboxes=2)]
    with pytest.raises(FleetError) as e:
        choose(ws, Placement(), explicit="nope")
    assert status(e) == 404 and "nope" in str(e.value)
    with pytest.raises(FleetError) as e:
        choose(ws, Placement(), explicit="dead")
    assert status(e) == 503 and "dead" in str(e.value)
    with pytest.raises(FleetError) as e:
        choose(ws, Placement(), explicit="full")
    assert status(e) == 503 and "full" in str(e.value)


def test_unpublished_checkpoint_only_on_its_worker():
    ws = [worker("a"), worker("b")]
    p = Placement(checkpoint=CP, only_on="a")
    assert choose(ws, p) == "a"
    with pytest.raises(FleetError) as e:
        choose(ws, p, explicit="b")
    assert status(e) == 409 and "not published" in str(e.value)
    with pytest.raises(FleetError) as e:
        choose([worker("a", alive=False), worker("b")], p)
    assert status(e) == 503


def test_preference_order_local_then_base_then_load():
    local = worker("local", running=9, checkpoints=frozenset({CP}))
    based = worker("based", running=3, bases=frozenset({BASE}))
    idle = worker("idle", running=0)
    p = Placement(checkpoint=CP, base=BASE)
    assert choose([idle, based, local], p) == "local"
    assert choose([idle, based], p) == "based"
    assert choose([idle, worker("busy", running=1)], p) == "idle"
    # equal load: more free memory wins
    assert choose([worker("x", free=100), worker("y", free=900)], Placement()) == "y"


def test_create_prefers_a_worker_with_the_image():
    ws = [worker("a"), worker("b", running=4, images={"debian": BASE})]
    assert choose(ws, Placement(image_ref="debian")) == "b"
    assert choose(ws, Placement(image_ref=f"sha256:{BASE}")) == "a"  # digest not cached on b
    ws2 = [worker("a"), worker("b", running=4, bases=frozenset({BASE}))]
    assert choose(ws2, Placement(image_ref=f"sha256:{BASE}")) == "b"


def test_many_forks_spread_round_robin_among_equals():
    ws = [worker("a"), worker("b"), worker("c")]
    extra: dict[str, int] = {}
    picks = []
    for _ in range(6):
        name = choose(ws, Placement(checkpoint=CP), extra=extra)
        extra[name] = extra.get(name, 0) + 1
        picks.append(name)
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_dead_and_full_workers_are_skipped():
    ws = [worker("dead", alive=False), worker("full", running=1, max_sandboxes=1),
          worker("ok", running=7)]
    assert choose(ws, Placement()) == "ok"
    with pytest.raises(FleetError) as e:
        choose(ws[:2], Placement())
    assert status(e) == 503 and "full" in str(e.value)
    with pytest.raises(FleetError) as e:
        choose([worker("d", alive=False)], Placement())
    assert status(e) == 503 and "no live worker" in str(e.value)
    with pytest.raises(FleetError) as e:
        choose([], Placement())
    assert status(e) == 503


def test_equal_workers_take_turns_across_requests():
    ws = [worker("a", free=8000), worker("b", free=8003)]  # same host: a few MB apart
    last_used: dict[str, float] = {}
    picks = []
    for t in range(4):
        name = choose(ws, Placement(), last_used=last_used)
        last_used[name] = float(t + 1)
        picks.append(name)
    assert picks == ["a", "b", "a", "b"]
    # but a real difference in free memory still decides
    assert choose([worker("a", free=1000), worker("b", free=8000)], Placement(),
                  last_used={"b": 5.0}) == "b"
