"""``<home>/cluster.json``: how `forkyard up` tells everyone else where its cluster is.

Written by ``forkyard up`` (mode 0600: it holds both tokens), read by the SDK
to find the API, and by ``forkyard down``/``status`` to find the processes::

    {
      "format": 1,
      "state": "starting" | "running",
      "home": "/abs/cluster/home",
      "url": "http://127.0.0.1:41231",          # null until the server listens
      "api_token": "...", "worker_token": "...",
      "store": "file:///abs/cluster/home/store",
      "db": null,                                # null: the server's embedded SQLite
      "created": "2026-11-28T23:59:00Z",
      "pids": {"server": 4242, "w1": 4250, "w2": 4251},
      "proc_start": {"server": 991823, ...},     # /proc/<pid>/stat starttime: a pid
                                                 # is only ours if this still matches
      "server": {"home": ".../control", "log": ".../logs/server.log"},
      "workers": [{"name": "w1", "home": ".../workers/w1", "log": ".../logs/w1.log",
                   "stock_bases": true}, ...]
    }

The file is rewritten after every process ``up`` starts, so an interrupted
``up`` still leaves enough behind for ``down`` to clean up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forkyard._fs import atomic_write_bytes
from forkyard.sdk.errors import ConfigurationError

__all__ = [
    "CLUSTER_FILE",
    "ClusterFile",
    "WorkerRecord",
    "cluster_path",
    "load_cluster",
    "proc_start_time",
]

CLUSTER_FILE = "cluster.json"
_FORMAT = 1


def cluster_path(home: Path) -> Path:
    return home / CLUSTER_FILE


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    name: str
    home: str
    log: str
    stock_bases: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "home": self.home, "log": self.log,
                "stock_bases": self.stock_bases}


@dataclass(slots=True)
class ClusterFile:
    home: Path
    api_token: str
    worker_token: str
    store: str
    url: str | None = None
    db: str | None = None
    state: str = "starting"
    created: str = field(
        default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    pids: dict[str, int] = field(default_factory=dict)
    proc_start: dict[str, int] = field(default_factory=dict)
    server_home: str = ""
    server_log: str = ""
    workers: list[WorkerRecord] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return cluster_path(self.home)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "state": self.state,
            "home": str(self.home),
            "url": self.url,
            "api_token": self.api_token,
            "worker_token": self.worker_token,
            "store": self.store,
            "db": self.db,
            "created": self.created,
            "pids": dict(self.pids),
            "proc_start": dict(self.proc_start),
            "server": {"home": self.server_home, "log": self.server_log},
            "workers": [w.to_json() for w in self.workers],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], home: Path) -> ClusterFile:
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        server = data.get("server") or {}
        return cls(
            home=home,
            api_token=str(data["api_token"]),
            worker_token=str(data["worker_token"]),
            store=str(data["store"]),
            url=None if data.get("url") is None else str(data["url"]),
            db=None if data.get("db") is None else str(data["db"]),
            state=str(data.get("state", "starting")),
            created=str(data.get("created", "")),
            pids={str(k): int(v) for k, v in dict(data.get("pids") or {}).items()},
            proc_start={str(k): int(v) for k, v in dict(data.get("proc_start") or {}).items()},
            server_home=str(server.get("home", "")),
            server_log=str(server.get("log", "")),
            workers=[
                WorkerRecord(str(w["name"]), str(w["home"]), str(w.get("log", "")),
                             bool(w.get("stock_bases", False)))
                for w in data.get("workers") or []
            ],
        )

    def save(self) -> None:
        """Atomically (re)write the file, readable by its owner only."""
        self.home.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        # The temp file is 0600 from creation on: the tokens are never readable
        # by others, not even for the instant before the final chmod.
        atomic_write_bytes(self.path, text, mode=0o600)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def owns(self, name: str) -> int | None:
        """The pid recorded for ``name`` if that process is still the one we started."""
        pid = self.pids.get(name)
        if pid is None:
            return None
        start = proc_start_time(pid)
        if start is None or start != self.proc_start.get(name):
            return None  # gone, or the pid now belongs to another process
        return pid


def load_cluster(home: Path) -> ClusterFile | None:
    """The cluster recorded in ``home``, or None if there is no cluster.json."""
    path = cluster_path(home)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return ClusterFile.from_json(data, home)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path} is not a forkyard cluster file: {exc}") from exc


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist.

    Together with the pid it names one process for the life of the machine,
    which is what makes it safe to signal a pid read from a file.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":
        return None  # a zombie is dead; only its parent can still reap it
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None
