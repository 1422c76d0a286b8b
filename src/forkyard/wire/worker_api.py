"""The worker daemon's HTTP API as request descriptions: every call the control plane makes.

Each function returns a :class:`Call` -- method, path (from one template per
route, ids quoted so they cannot add segments), the request body as a wire
model, the reply's parser and the timeout chosen for what the call does --
and the control plane's client (``forkyard.control._workers``) only executes
them, as the SDK's ``_ops`` does for the public API.  :data:`ROUTES` lists the
templates; a unit test checks them against ``forkyard.worker.daemon``'s routes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel

from forkyard.wire.models import (
    EntryOut,
    ExecRequest,
    ExecResultOut,
    FileExists,
    FileWritten,
    TreeWritten,
)
from forkyard.wire.network import NetworkSpec
from forkyard.wire.procs import (
    ProcOut,
    ProcOutput,
    ProcStarted,
    ResizeRequest,
    SignalRequest,
    SpawnRequest,
    StdinWritten,
)
from forkyard.wire.worker_models import (
    WorkerCheckpoint,
    WorkerCheckpointRequest,
    WorkerCreateRequest,
    WorkerForkRequest,
    WorkerHibernated,
    WorkerPublishStatus,
    WorkerSandbox,
    WorkerWakeRequest,
)

__all__ = [
    "BOOT_TIMEOUT",
    "CHECKPOINT_TIMEOUT",
    "EXEC_MARGIN",
    "FILE_TIMEOUT",
    "HIBERNATE_TIMEOUT",
    "QUICK_TIMEOUT",
    "ROUTES",
    "WEBSOCKETS",
    "Call",
    "Params",
    "Route",
    "checkpoint",
    "checkpoint_info",
    "create",
    "destroy",
    "exec_",
    "file_exists",
    "fork",
    "get_sandbox",
    "hibernate",
    "list_files",
    "list_procs",
    "make_dir",
    "proc_output",
    "proc_resize",
    "proc_signal",
    "proc_stdin",
    "publish_status",
    "read_file",
    "read_tree",
    "remove_file",
    "rename_file",
    "set_network",
    "spawn",
    "stat_file",
    "tunnel_path",
    "wake",
    "write_file",
    "write_tree",
]

QUICK_TIMEOUT = 10.0
BOOT_TIMEOUT = 240.0  # the library waits up to 180 s for a guest under TCG
CHECKPOINT_TIMEOUT = 180.0
HIBERNATE_TIMEOUT = 1800.0  # checkpoint + publish of a whole sandbox to a remote store
FILE_TIMEOUT = 180.0
EXEC_MARGIN = 30.0  # on top of a command's own timeout: agent grace + reply transfer

R = TypeVar("R")
Params = Mapping[str, str | int | float | bool]


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the worker daemon: a method and a path template."""

    method: str
    template: str

    def path(self, **ids: str) -> str:
        return self.template.format(**{k: quote(v, safe="") for k, v in ids.items()})


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One request to a worker and how to read its reply."""

    route: Route
    path: str
    parse: Callable[[Any], R]
    timeout: float
    body: BaseModel | None = None
    params: Params | None = None

    @property
    def method(self) -> str:
        return self.route.method

    def json(self) -> Any:
        return None if self.body is None else self.body.model_dump(mode="json")

    def __str__(self) -> str:
        return f"{self.route.method} {self.path}"


CREATE = Route("POST", "/sandboxes")
SANDBOX = Route("GET", "/sandboxes/{sandbox_id}")
DESTROY = Route("DELETE", "/sandboxes/{sandbox_id}")
EXEC = Route("POST", "/sandboxes/{sandbox_id}/exec")
WRITE_FILE = Route("PUT", "/sandboxes/{sandbox_id}/files")
READ_FILE = Route("GET", "/sandboxes/{sandbox_id}/files")
LIST_FILES = Route("GET", "/sandboxes/{sandbox_id}/files/list")
STAT_FILE = Route("GET", "/sandboxes/{sandbox_id}/files/stat")
REMOVE_FILE = Route("DELETE", "/sandboxes/{sandbox_id}/files")
WRITE_TREE = Route("PUT", "/sandboxes/{sandbox_id}/files/tree")
READ_TREE = Route("GET", "/sandboxes/{sandbox_id}/files/tree")
FILE_EXISTS = Route("GET", "/sandboxes/{sandbox_id}/files/exists")
MAKE_DIR = Route("POST", "/sandboxes/{sandbox_id}/files/mkdir")
RENAME_FILE = Route("POST", "/sandboxes/{sandbox_id}/files/rename")
CHECKPOINT = Route("POST", "/sandboxes/{sandbox_id}/checkpoint")
CHECKPOINT_INFO = Route("GET", "/checkpoints/{checkpoint_id}")
FORK = Route("POST", "/checkpoints/{checkpoint_id}/fork")
HIBERNATE = Route("POST", "/sandboxes/{sandbox_id}/hibernate")
WAKE = Route("POST", "/sandboxes/{sandbox_id}/wake")
NETWORK = Route("PUT", "/sandboxes/{sandbox_id}/network")
# a WebSocket (GET + Upgrade) carrying one TCP connection's bytes (forkyard.wire.ports)
TUNNEL = Route("GET", "/sandboxes/{sandbox_id}/ports/{port}/tunnel")

SPAWN = Route("POST", "/sandboxes/{sandbox_id}/procs")
LIST_PROCS = Route("GET", "/sandboxes/{sandbox_id}/procs")
PROC_OUTPUT = Route("GET", "/sandboxes/{sandbox_id}/procs/{pid}/output")
PROC_STDIN = Route("POST", "/sandboxes/{sandbox_id}/procs/{pid}/stdin")
PROC_RESIZE = Route("POST", "/sandboxes/{sandbox_id}/procs/{pid}/resize")
PROC_SIGNAL = Route("POST", "/sandboxes/{sandbox_id}/procs/{pid}/signal")

ROUTES: tuple[Route, ...] = (CREATE, SANDBOX, DESTROY, EXEC, WRITE_FILE, READ_FILE,
                             LIST_FILES, STAT_FILE, REMOVE_FILE, CHECKPOINT, CHECKPOINT_INFO,
                             FORK, HIBERNATE, WAKE, NETWORK, SPAWN, LIST_PROCS, PROC_OUTPUT,
                             PROC_STDIN, PROC_RESIZE, PROC_SIGNAL, WRITE_TREE,
                             READ_TREE, FILE_EXISTS, MAKE_DIR, RENAME_FILE)
WEBSOCKETS: tuple[Route, ...] = (TUNNEL,)


def _none(_: Any) -> None:
    return None


def _raw(data: Any) -> bytes:
    assert isinstance(data, bytes)
    return data


def _entries(data: Any) -> list[EntryOut]:
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of entries")
    return [EntryOut.model_validate(e) for e in data]


# --- sandboxes -----------------------------------------------------------------
def create(sandbox_id: str, image: str, memory_mb: int | None,
           cpus: int | None, *, disk: int | None = None,
           cold: bool = False, network: NetworkSpec | None = None) -> Call[WorkerSandbox]:
    body = WorkerCreateRequest(image=image, memory_mb=memory_mb, cpus=cpus,
                               sandbox_id=sandbox_id, disk=disk, cold=cold, network=network)
    return Call(CREATE, CREATE.path(), WorkerSandbox.model_validate, BOOT_TIMEOUT, body)


def get_sandbox(sandbox_id: str) -> Call[WorkerSandbox]:
    return Call(SANDBOX, SANDBOX.path(sandbox_id=sandbox_id), WorkerSandbox.model_validate,
                QUICK_TIMEOUT)


def destroy(sandbox_id: str) -> Call[None]:
    return Call(DESTROY, DESTROY.path(sandbox_id=sandbox_id), _none, CHECKPOINT_TIMEOUT)


def exec_(sandbox_id: str, req: ExecRequest) -> Call[ExecResultOut]:
    return Call(EXEC, EXEC.path(sandbox_id=sandbox_id), ExecResultOut.model_validate,
                req.effective_timeout + EXEC_MARGIN, req)


# --- processes -----------------------------------------------------------------------
def spawn(sandbox_id: str, req: SpawnRequest) -> Call[ProcStarted]:
    return Call(SPAWN, SPAWN.path(sandbox_id=sandbox_id), ProcStarted.model_validate,
                QUICK_TIMEOUT * 3, req)


def list_procs(sandbox_id: str) -> Call[list[ProcOut]]:
    return Call(LIST_PROCS, LIST_PROCS.path(sandbox_id=sandbox_id), _procs, QUICK_TIMEOUT * 3)


def proc_output(sandbox_id: str, pid: int, out: int, err: int, wait: float,
                max_bytes: int) -> Call[ProcOutput]:
    """Long-polled: the worker answers once there is output (or the end), or after ``wait``."""
    return Call(PROC_OUTPUT, PROC_OUTPUT.path(sandbox_id=sandbox_id, pid=str(pid)),
                ProcOutput.model_validate, wait + QUICK_TIMEOUT * 3,
                params={"out": out, "err": err, "wait": wait, "max_bytes": max_bytes})


def proc_stdin(sandbox_id: str, pid: int, eof: bool) -> Call[StdinWritten]:
    """The body (raw bytes, at most ``wire.procs.STDIN_MAX``) is given by the caller."""
    return Call(PROC_STDIN, PROC_STDIN.path(sandbox_id=sandbox_id, pid=str(pid)),
                StdinWritten.model_validate, QUICK_TIMEOUT * 3, params={"eof": eof})


def proc_resize(sandbox_id: str, pid: int, req: ResizeRequest) -> Call[None]:
    return Call(PROC_RESIZE, PROC_RESIZE.path(sandbox_id=sandbox_id, pid=str(pid)), _none,
                QUICK_TIMEOUT, req)


def proc_signal(sandbox_id: str, pid: int, req: SignalRequest) -> Call[None]:
    return Call(PROC_SIGNAL, PROC_SIGNAL.path(sandbox_id=sandbox_id, pid=str(pid)), _none,
                QUICK_TIMEOUT, req)


def _procs(data: Any) -> list[ProcOut]:
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of processes")
    return [ProcOut.model_validate(e) for e in data]


# --- files -------------------------------------------------------------------------
def write_file(sandbox_id: str, path: str, *, mode: int, append: bool) -> Call[FileWritten]:
    """The body is streamed by the caller (raw bytes, not a model)."""
    return Call(WRITE_FILE, WRITE_FILE.path(sandbox_id=sandbox_id), FileWritten.model_validate,
                FILE_TIMEOUT, params={"path": path, "mode": mode, "append": append})


def read_file(sandbox_id: str, path: str) -> Call[bytes]:
    return Call(READ_FILE, READ_FILE.path(sandbox_id=sandbox_id), _raw, FILE_TIMEOUT,
                params={"path": path})


def write_tree(sandbox_id: str, path: str) -> Call[TreeWritten]:
    """The body (a tar stream) is streamed by the caller."""
    return Call(WRITE_TREE, WRITE_TREE.path(sandbox_id=sandbox_id), TreeWritten.model_validate,
                FILE_TIMEOUT, params={"path": path})


def read_tree(sandbox_id: str, path: str) -> Call[bytes]:
    return Call(READ_TREE, READ_TREE.path(sandbox_id=sandbox_id), _raw, FILE_TIMEOUT,
                params={"path": path})


def file_exists(sandbox_id: str, path: str) -> Call[FileExists]:
    return Call(FILE_EXISTS, FILE_EXISTS.path(sandbox_id=sandbox_id), FileExists.model_validate,
                QUICK_TIMEOUT * 3, params={"path": path})


def make_dir(sandbox_id: str, path: str, *, mode: int, parents: bool) -> Call[None]:
    return Call(MAKE_DIR, MAKE_DIR.path(sandbox_id=sandbox_id), _none, QUICK_TIMEOUT * 3,
                params={"path": path, "mode": mode, "parents": parents})


def rename_file(sandbox_id: str, path: str, to: str, *, overwrite: bool) -> Call[None]:
    return Call(RENAME_FILE, RENAME_FILE.path(sandbox_id=sandbox_id), _none, QUICK_TIMEOUT * 3,
                params={"path": path, "to": to, "overwrite": overwrite})


def list_files(sandbox_id: str, path: str) -> Call[list[EntryOut]]:
    return Call(LIST_FILES, LIST_FILES.path(sandbox_id=sandbox_id), _entries,
                QUICK_TIMEOUT * 3, params={"path": path})


def stat_file(sandbox_id: str, path: str) -> Call[EntryOut]:
    return Call(STAT_FILE, STAT_FILE.path(sandbox_id=sandbox_id), EntryOut.model_validate,
                QUICK_TIMEOUT * 3, params={"path": path})


def remove_file(sandbox_id: str, path: str, *, recursive: bool) -> Call[None]:
    return Call(REMOVE_FILE, REMOVE_FILE.path(sandbox_id=sandbox_id), _none, FILE_TIMEOUT,
                params={"path": path, "recursive": recursive})


# --- checkpoints, hibernate, wake ------------------------------------------------------
def checkpoint(sandbox_id: str, name: str | None, publish: bool) -> Call[WorkerCheckpoint]:
    return Call(CHECKPOINT, CHECKPOINT.path(sandbox_id=sandbox_id),
                WorkerCheckpoint.model_validate, CHECKPOINT_TIMEOUT,
                WorkerCheckpointRequest(name=name, publish=publish))


def checkpoint_info(checkpoint_id: str) -> Call[WorkerCheckpoint]:
    return Call(CHECKPOINT_INFO, CHECKPOINT_INFO.path(checkpoint_id=checkpoint_id),
                WorkerCheckpoint.model_validate, QUICK_TIMEOUT)


def publish_status(checkpoint_id: str, wait: float) -> Call[WorkerPublishStatus]:
    """The same route, long-polled: the worker answers once the state changes or after ``wait``."""
    return Call(CHECKPOINT_INFO, CHECKPOINT_INFO.path(checkpoint_id=checkpoint_id),
                WorkerPublishStatus.model_validate, wait + QUICK_TIMEOUT,
                params={"wait": wait})


def fork(checkpoint_id: str, sandbox_id: str,
         network: NetworkSpec | None = None) -> Call[WorkerSandbox]:
    return Call(FORK, FORK.path(checkpoint_id=checkpoint_id), WorkerSandbox.model_validate,
                BOOT_TIMEOUT, WorkerForkRequest(sandbox_id=sandbox_id, network=network))


def hibernate(sandbox_id: str) -> Call[WorkerHibernated]:
    return Call(HIBERNATE, HIBERNATE.path(sandbox_id=sandbox_id),
                WorkerHibernated.model_validate, HIBERNATE_TIMEOUT)


def wake(sandbox_id: str, checkpoint_id: str,
         network: NetworkSpec | None = None) -> Call[WorkerSandbox]:
    return Call(WAKE, WAKE.path(sandbox_id=sandbox_id), WorkerSandbox.model_validate,
                BOOT_TIMEOUT, WorkerWakeRequest(checkpoint_id=checkpoint_id, network=network))


def set_network(sandbox_id: str, spec: NetworkSpec) -> Call[WorkerSandbox]:
    """Apply new egress rules to a running sandbox (the worker replaces its rule set)."""
    return Call(NETWORK, NETWORK.path(sandbox_id=sandbox_id), WorkerSandbox.model_validate,
                QUICK_TIMEOUT, spec)


def tunnel_path(sandbox_id: str, port: int) -> str:
    """Where a worker opens a byte tunnel to ``port`` of ``sandbox_id``'s guest."""
    return TUNNEL.path(sandbox_id=sandbox_id, port=str(port))
