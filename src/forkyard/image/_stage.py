"""What a build source is: something that fills an empty staging directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Progress", "Source", "StageContext", "Staged"]

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StageContext:
    epoch: int
    scratch: Path
    progress: Progress


@dataclass(frozen=True, slots=True)
class Staged:
    """What a source reports after filling the staging directory."""

    source: str
    # Built-in sources have no meaningful mtimes of their own: the builder
    # sets every mtime to the build epoch.
    fixed_times: bool
    notes: tuple[str, ...] = ()


class Source(Protocol):
    def stage(self, root: Path, ctx: StageContext) -> Staged: ...
