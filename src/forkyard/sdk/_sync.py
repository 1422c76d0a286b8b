"""The blocking SDK: :class:`Sandbox`, its :class:`Files`, and :class:`Checkpoint`."""

from __future__ import annotations

import builtins
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import overload

from forkyard.sdk import _ops
from forkyard.sdk._commands import Commands, Pty, TextSink
from forkyard.sdk._common import (
    CHECKPOINT_TIMEOUT,
    HIBERNATE_TIMEOUT,
    PUBLISH_TIMEOUT,
    WAKE_TIMEOUT,
    check_result,
    fork_timeout,
    poll_delays,
    publish_outcome,
    publish_timed_out,
)
from forkyard.sdk._files import Files
from forkyard.sdk._http import SyncHTTP
from forkyard.sdk._network import Network, preview_url
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import NotFoundError
from forkyard.sdk.models import CheckpointInfo, CommandResult, SandboxInfo, WorkerInfo

__all__ = ["Checkpoint", "Files", "Sandbox", "list_workers"]

PathLike = str | os.PathLike[str]


def _http(url: str | None, token: str | None, home: PathLike | None,
          request_timeout: float | None = None) -> SyncHTTP:
    return SyncHTTP(ConnectionConfig.resolve(url=url, token=token, home=home,
                                             request_timeout=request_timeout))


def list_workers(*, url: str | None = None, token: str | None = None,
                 home: PathLike | None = None) -> list[WorkerInfo]:
    """The workers the control plane knows, alive or dead."""
    return _http(url, token, home).call(_ops.list_workers())


class Checkpoint:
    """A checkpoint of a sandbox; :meth:`Sandbox.fork` makes sandboxes from it."""

    def __init__(self, info: CheckpointInfo, http: SyncHTTP) -> None:
        self._info = info
        self._http = http

    @property
    def info(self) -> CheckpointInfo:
        """The last known state (see :meth:`refresh`)."""
        return self._info

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def state(self) -> str:
        return self._info.state

    @property
    def name(self) -> str | None:
        return self._info.name

    @property
    def worker(self) -> str | None:
        return self._info.worker

    @property
    def stored_bytes(self) -> int | None:
        return self._info.stored_bytes

    @property
    def changed_bytes(self) -> int | None:
        return self._info.changed_bytes

    @property
    def ram_new_bytes(self) -> int | None:
        """Bytes of RAM chunks this checkpoint stored first (None: unknown or v1/v2)."""
        return self._info.ram_new_bytes

    @property
    def ram_shared_bytes(self) -> int | None:
        """Bytes of its RAM chunks earlier checkpoints (any sandbox's) had stored."""
        return self._info.ram_shared_bytes

    def __repr__(self) -> str:
        return f"<Checkpoint {self.id[:12]} {self.state}>"

    @classmethod
    def get(cls, checkpoint_id: str, *, url: str | None = None, token: str | None = None,
            home: PathLike | None = None) -> Checkpoint:
        """Look a checkpoint up by id (or unique prefix of at least 6 characters)."""
        http = _http(url, token, home)
        return cls(http.call(_ops.get_checkpoint(checkpoint_id)), http)

    @classmethod
    def list(cls, *, url: str | None = None, token: str | None = None,
             home: PathLike | None = None) -> builtins.list[CheckpointInfo]:
        return _http(url, token, home).call(_ops.list_checkpoints())

    def refresh(self) -> CheckpointInfo:
        self._info = self._http.call(_ops.get_checkpoint(self.id))
        return self._info

    def wait_published(self, timeout: float = PUBLISH_TIMEOUT) -> CheckpointInfo:
        """Block until the checkpoint is in the store (forkable on any worker).

        Raises :class:`PublishFailed` if publishing failed, ``SandboxTimeout``
        after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        delays = iter(poll_delays())
        while not publish_outcome(self._info):
            if time.monotonic() >= deadline:
                raise publish_timed_out(self._info, timeout)
            time.sleep(min(next(delays, 1.0), max(0.0, deadline - time.monotonic())))
            self.refresh()
        return self._info

    def delete(self) -> None:
        """Forget the checkpoint in the control plane (stored objects are immutable)."""
        self._http.call(_ops.delete_checkpoint(self.id))


class Sandbox:
    """A remote sandbox.  Make one with :meth:`create`, :meth:`fork` or :meth:`connect`.

    ``with Sandbox.create() as sb:`` kills the sandbox when the block ends.
    """

    def __init__(self, info: SandboxInfo, http: SyncHTTP) -> None:
        self._info = info
        self._http = http
        self.files = Files(self)

    # --- making handles ------------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str = "minimal",
        *,
        worker: str | None = None,
        memory_mb: int | None = None,
        cpus: int | None = None,
        url: str | None = None,
        token: str | None = None,
        home: PathLike | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: int | None = None,
        on_timeout: str = "kill",
        idle_hibernate: int | None = None,
        auto_wake: bool = False,
        disk: int | str | None = None,
        cold: bool = False,
        network: str | None = None,
        allow_out: Sequence[str] | None = None,
        deny_out: Sequence[str] | None = None,
        boot_timeout: float | None = _ops.BOOT_TIMEOUT,
    ) -> Sandbox:
        """Boot a new sandbox and return once its guest answers.

        ``labels`` tag it (``list(labels=...)`` finds it; forks inherit them).
        ``timeout`` (seconds) ends it by ``on_timeout`` ("kill" or "hibernate"),
        ``idle_hibernate`` hibernates it after that many seconds without exec or
        file requests, ``auto_wake`` lets such a request wake it again.
        ``disk`` is the guest's disk (bytes or e.g. ``"4G"``; thin); ``cold``
        boots even when the image has a template to fork.
        ``boot_timeout`` bounds the wait for the boot (seconds, None = no limit).
        """
        http = _http(url, token, home)
        call = _ops.create(image, worker, memory_mb, cpus, boot_timeout, labels=labels,
                           lifetime=timeout, on_timeout=on_timeout if timeout else None,
                           idle_hibernate=idle_hibernate, auto_wake=auto_wake,
                           disk=disk, cold=cold, network=network, allow_out=allow_out,
                           deny_out=deny_out)
        return cls(http.call(call), http)

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, token: str | None = None,
                home: PathLike | None = None) -> Sandbox:
        """A handle to an existing sandbox; ``NotFoundError`` if the id was never known.

        The control plane remembers destroyed sandboxes: their handle has
        ``state == "destroyed"``.
        """
        http = _http(url, token, home)
        return cls(http.call(_ops.get_sandbox(sandbox_id)), http)

    @classmethod
    def list(cls, *, labels: Mapping[str, str] | None = None, state: str | None = None,
             url: str | None = None, token: str | None = None,
             home: PathLike | None = None) -> builtins.list[SandboxInfo]:
        """Sandboxes with all of ``labels``, in ``state`` (default: all but destroyed)."""
        return _http(url, token, home).call(_ops.list_sandboxes(labels, state))

    @overload
    @classmethod
    def fork(cls, checkpoint: Checkpoint | str, *, worker: str | None = ...,
             url: str | None = ..., token: str | None = ..., home: PathLike | None = ...,
             timeout: float | None = ...) -> Sandbox: ...

    @overload
    @classmethod
    def fork(cls, checkpoint: Checkpoint | str, *, count: int, worker: str | None = ...,
             url: str | None = ..., token: str | None = ..., home: PathLike | None = ...,
             timeout: float | None = ...) -> builtins.list[Sandbox]: ...

    @classmethod
    def fork(
        cls,
        checkpoint: Checkpoint | str,
        *,
        count: int | None = None,
        worker: str | None = None,
        url: str | None = None,
        token: str | None = None,
        home: PathLike | None = None,
        timeout: float | None = None,
    ) -> Sandbox | builtins.list[Sandbox]:
        """New sandboxes continuing from ``checkpoint`` (a :class:`Checkpoint` or an id).

        The rule: without ``count`` you get one :class:`Sandbox`; with ``count``
        (even ``count=1``) you get a list of that many.  ``worker`` pins every
        fork to one worker; otherwise each is placed independently.
        """
        if isinstance(checkpoint, Checkpoint) and url is None and token is None and home is None:
            http, cid = checkpoint._http, checkpoint.id
        else:
            http = _http(url, token, home)
            cid = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        n = 1 if count is None else count
        infos = http.call(_ops.fork(cid, n, worker, fork_timeout(n, timeout)))
        sandboxes = [cls(info, http) for info in infos]
        return sandboxes[0] if count is None else sandboxes

    # --- state ---------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        """The last known state; :meth:`refresh` asks the control plane again."""
        return self._info

    @property
    def state(self) -> str:
        return self._info.state

    @property
    def worker(self) -> str | None:
        return self._info.worker

    @property
    def config(self) -> ConnectionConfig:
        return self._http.config

    def refresh(self) -> SandboxInfo:
        self._info = self._http.call(_ops.get_sandbox(self.id))
        return self._info

    @property
    def network(self) -> Network:
        """Its network mode and egress rules; ``.update(allow_out=..., deny_out=...)``."""
        return Network(self)

    def get_url(self, port: int, *, public: bool = False) -> str:
        """A URL of the guest's ``port`` through the control plane's proxy, carrying a new
        preview token (or none, with ``public``, where the operator allows public ports)."""
        data = self._http.call(_ops.preview(self.id, port, public))
        return preview_url(self._http.config.url, data)

    def set_timeout(self, timeout: int | None) -> SandboxInfo:
        """End it ``timeout`` seconds from now (by its ``on_timeout``); None: never."""
        self._info = self._http.call(_ops.set_timeout(self.id, timeout))
        return self._info

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.state} on {self.worker}>"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    # --- guest ---------------------------------------------------------------------
    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60.0,
        stdin: bytes | str | None = None,
        background: bool = False,
        check: bool = False,
        on_stdout: TextSink | None = None,
        on_stderr: TextSink | None = None,
        user: str | None = None,
    ) -> CommandResult:
        """Run a command in the guest: a string runs under ``/bin/sh -c``, a list is argv.

        ``timeout`` (seconds, None = none) is enforced in the guest; past it the
        command is killed and ``SandboxTimeout`` carries its output so far.
        ``background=True`` returns at once with the ``pid``.  ``check=True``
        raises :class:`~forkyard.errors.CommandFailed` on a non-zero exit.
        ``on_stdout``/``on_stderr`` get the output live, as text, while the
        command runs (see :attr:`commands` for handles).  ``user`` runs it as
        that guest account.
        """
        if (on_stdout or on_stderr) and not background:
            r = self.commands.run(cmd, on_stdout=on_stdout, on_stderr=on_stderr, env=env,
                                  cwd=cwd, timeout=timeout, stdin=stdin, user=user)
            return check_result(cmd, r, check)
        call = _ops.exec_(self.id, cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                          background=background, user=user)
        return check_result(cmd, self._http.call(call), check)

    @property
    def commands(self) -> Commands:
        """Processes: ``start``/``run`` with live output, ``list``, ``kill``, ``connect``."""
        return Commands(self._http, self.id)

    @property
    def pty(self) -> Pty:
        """Terminal sessions: ``create``, ``resize``, ``send_stdin``, ``kill``."""
        return Pty(self._http, self.id)

    # --- lifecycle -----------------------------------------------------------------
    def checkpoint(self, name: str | None = None, *, publish: bool = True,
                   labels: Mapping[str, str] | None = None,
                   timeout: float | None = CHECKPOINT_TIMEOUT) -> Checkpoint:
        """Capture the running sandbox; it keeps running.

        The checkpoint is forkable on this sandbox's worker at once; with
        ``publish`` it is uploaded to the store in the background, and
        :meth:`Checkpoint.wait_published` waits until any worker can fork it.
        """
        info = self._http.call(_ops.checkpoint(self.id, name, publish, timeout, labels))
        self._info = _with_last_checkpoint(self._info, info.id)
        return Checkpoint(info, self._http)

    def hibernate(self, wait: bool = True, *,
                  timeout: float | None = HIBERNATE_TIMEOUT) -> SandboxInfo:
        """Checkpoint, publish and stop the VM; :meth:`wake` continues it anywhere."""
        self._info = self._http.call(_ops.hibernate(self.id, wait, timeout))
        return self._info

    def wake(self, worker: str | None = None, *,
             timeout: float | None = WAKE_TIMEOUT) -> SandboxInfo:
        """Resume a hibernated sandbox (same id), on ``worker`` or wherever placement picks."""
        self._info = self._http.call(_ops.wake(self.id, worker, timeout))
        return self._info

    def kill(self) -> bool:
        """Destroy the sandbox; False if it was already gone."""
        try:
            self._http.call(_ops.kill(self.id))
        except NotFoundError:
            return False
        return True


def _with_last_checkpoint(info: SandboxInfo, checkpoint_id: str) -> SandboxInfo:
    return dataclasses.replace(info, last_checkpoint=checkpoint_id)
