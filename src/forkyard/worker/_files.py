"""``sandbox.files``: the guest filesystem through the agent (E2B-style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from forkyard.guest.client import AgentClient, EntryInfo

__all__ = ["Files"]

T = TypeVar("T")


class AgentCall(Protocol):
    """Runs one call on a sandbox's agent, with the sandbox's state checks."""

    def __call__(self, fn: Callable[[AgentClient], T], /) -> T: ...


class Files:
    """File operations in one sandbox's guest; each is one agent call."""

    def __init__(self, call: AgentCall) -> None:
        self._call = call

    def read(self, path: str) -> bytes:
        return self._call(lambda a: a.read_file(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
              append: bool = False) -> int:
        raw = data.encode() if isinstance(data, str) else data
        return self._call(lambda a: a.write_file(path, raw, mode=mode, append=append))

    def list(self, path: str) -> list[EntryInfo]:
        return self._call(lambda a: a.list(path))

    def stat(self, path: str) -> EntryInfo:
        return self._call(lambda a: a.stat(path))

    def exists(self, path: str) -> bool:
        return self._call(lambda a: a.exists(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._call(lambda a: a.remove(path, recursive=recursive))

    def make_dir(self, path: str, *, mode: int = 0o755) -> None:
        self._call(lambda a: a.mkdir(path, mode=mode))
