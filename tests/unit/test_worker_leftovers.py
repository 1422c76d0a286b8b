"""What a worker finds in its home after a crash: kept, revived, or swept."""

from __future__ import annotations

import json
from pathlib import Path

from forkyard.config import Home
from forkyard.worker._home import hibernated_records, sweep_leftovers
from forkyard.worker._record import HIBERNATING_MARK, RECORD_NAME

CP = "ab" * 32


def _sandbox(home: Home, sid: str, state: str, *, mark: str | None = None) -> Path:
    d = home.sandboxes_dir / sid
    d.mkdir(parents=True)
    (d / RECORD_NAME).write_text(json.dumps({"id": sid, "state": state,
                                             "last_checkpoint": None}))
    if mark is not None:
        (d / HIBERNATING_MARK).write_text(mark)
    return d


def test_a_hibernate_cut_short_comes_back_only_on_a_catalogued_checkpoint(
        tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home").ensure()
    (home.checkpoints_dir / CP).mkdir()
    (home.checkpoints_dir / CP / "manifest.json").write_text("{}")
    _sandbox(home, "sb-kept", "running", mark=CP)
    _sandbox(home, "sb-nocp", "running", mark="cd" * 32)  # never catalogued
    _sandbox(home, "sb-junk", "running", mark="../../etc/passwd")
    _sandbox(home, "sb-plain", "running")
    found = {d.name: info for d, info in hibernated_records(home)}
    assert list(found) == ["sb-kept"]
    assert (found["sb-kept"]["state"], found["sb-kept"]["last_checkpoint"]) == \
        ("hibernated", CP)
    assert sorted(p.name for p in home.sandboxes_dir.iterdir()) == ["sb-kept"]


def test_sweep_removes_interrupted_writes_of_this_home_only(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home").ensure()
    blobs = home.cache_dir / "blobs"
    (blobs / "ab").mkdir(parents=True)
    (blobs / "ab" / f".{CP}.x1.part").write_text("half")
    (blobs / "ab" / CP).write_text("whole")
    (blobs / ".streams").mkdir()
    (blobs / ".streams" / "abcd.123.1").write_text("half a state")
    home.tmp_dir.mkdir(parents=True, exist_ok=True)
    (home.tmp_dir / "export-x").mkdir()
    (home.tmp_dir / "zero-4096.raw").write_text("")  # not a work dir: kept
    assert sweep_leftovers(home) == 3
    assert (blobs / "ab" / CP).read_text() == "whole"
    assert not list(blobs.rglob("*.part")) and not list((blobs / ".streams").iterdir())
    assert [p.name for p in home.tmp_dir.iterdir()] == ["zero-4096.raw"]
