"""One digest-prefix resolver, and the checkpoint lookups built on it."""

from __future__ import annotations

import pytest

from forkyard._digest import resolve_prefix
from forkyard.checkpoint.local import LocalCheckpoints, checkpoint_prefix
from forkyard.errors import AmbiguousCheckpoint, CheckpointNotFound

A, B, C = "abc1230" + "0" * 57, "abc1231" + "1" * 57, "ffff00" + "2" * 58


def test_unique_prefix_and_exact_match() -> None:
    assert resolve_prefix("abc1230", [A, B, C]) == A
    assert resolve_prefix(C, [A, B, C]) == C


def test_none_and_ambiguous_are_typed() -> None:
    with pytest.raises(CheckpointNotFound) as none:
        resolve_prefix("deadbe", [A, B])
    assert not isinstance(none.value, AmbiguousCheckpoint)
    with pytest.raises(AmbiguousCheckpoint) as amb:
        resolve_prefix("abc123", iter([B, A, A]))
    assert amb.value.matches == 2
    assert "ambiguous" in str(amb.value)


def _catalog(tmp_path, *ids: str) -> LocalCheckpoints:
    cat = LocalCheckpoints(tmp_path)
    for i in ids:
        (tmp_path / i).mkdir()
        (tmp_path / i / "manifest.json").write_bytes(b"{}")
    return cat


def test_local_checkpoints_resolve(tmp_path) -> None:
    cat = _catalog(tmp_path, A, B, C)
    assert cat.resolve("cp-ABC1230") == A
    assert cat.resolve(C) == C
    with pytest.raises(CheckpointNotFound, match=r"ambiguous"):
        cat.resolve("abc123")
    with pytest.raises(CheckpointNotFound):
        cat.resolve("999999")


@pytest.mark.parametrize("ref", ["abc", "abc1*", "abc12[", "../abc123", "abc12?", "ABC12 ",
                                 "a" * 65, ""])
def test_hostile_refs_never_reach_the_filesystem(tmp_path, ref: str) -> None:
    # globbing a user's "abc1*" would match far more than a prefix
    cat = _catalog(tmp_path, A, B)
    with pytest.raises(CheckpointNotFound):
        cat.resolve(ref)
    with pytest.raises(CheckpointNotFound):
        checkpoint_prefix(ref)
