"""The asyncio twin of :mod:`forkyard.sdk._sync`: same requests, same models, same errors.

Only the control flow differs (``await``); the request shapes come from
:mod:`forkyard.sdk._ops` and the shared checks from :mod:`forkyard.sdk._common`.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import overload

from forkyard.sdk import _ops
from forkyard.sdk._acommands import AsyncCommands, AsyncPty
from forkyard.sdk._commands import TextSink
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
from forkyard.sdk._files import AsyncFiles
from forkyard.sdk._http import AsyncHTTP
from forkyard.sdk._network import AsyncNetwork, preview_url
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import NotFoundError
from forkyard.sdk.models import CheckpointInfo, CommandResult, SandboxInfo, WorkerInfo

__all__ = ["AsyncCheckpoint", "AsyncFiles", "AsyncSandbox", "async_list_workers"]

PathLike = str | os.PathLike[str]


def _http(url: str | None, token: str | None, home: PathLike | None) -> AsyncHTTP:
    return AsyncHTTP(ConnectionConfig.resolve(url=url, token=token, home=home))


async def async_list_workers(*, url: str | None = None, token: str | None = None,
                             home: PathLike | None = None) -> list[WorkerInfo]:
    return await _http(url, token, home).call(_ops.list_workers())


class AsyncCheckpoint:
    def __init__(self, info: CheckpointInfo, http: AsyncHTTP) -> None:
        self._info = info
        self._http = http

    @property
    def info(self) -> CheckpointInfo:
        return self._info

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def state(self) -> str:
        return self._info.state

    def __repr__(self) -> str:
        return f"<AsyncCheckpoint {self.id[:12]} {self.state}>"

    @classmethod
    async def get(cls, checkpoint_id: str, *, url: str | None = None,
                  token: str | None = None, home: PathLike | None = None) -> AsyncCheckpoint:
        http = _http(url, token, home)
        return cls(await http.call(_ops.get_checkpoint(checkpoint_id)), http)

    @classmethod
    async def list(cls, *, url: str | None = None, token: str | None = None,
                   home: PathLike | None = None) -> builtins.list[CheckpointInfo]:
        return await _http(url, token, home).call(_ops.list_checkpoints())

    async def refresh(self) -> CheckpointInfo:
        self._info = await self._http.call(_ops.get_checkpoint(self.id))
        return self._info

    async def wait_published(self, timeout: float = PUBLISH_TIMEOUT) -> CheckpointInfo:
        deadline = time.monotonic() + timeout
        delays = iter(poll_delays())
        while not publish_outcome(self._info):
            if time.monotonic() >= deadline:
                raise publish_timed_out(self._info, timeout)
            await asyncio.sleep(min(next(delays, 1.0), max(0.0, deadline - time.monotonic())))
            await self.refresh()
        return self._info

    async def delete(self) -> None:
        await self._http.call(_ops.delete_checkpoint(self.id))


class AsyncSandbox:
    """``sb = await AsyncSandbox.create()``; ``async with sb:`` kills it at the end."""

    def __init__(self, info: SandboxInfo, http: AsyncHTTP) -> None:
        self._info = info
        self._http = http
        self.files = AsyncFiles(self)

    @classmethod
    async def create(
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
    ) -> AsyncSandbox:
        http = _http(url, token, home)
        call = _ops.create(image, worker, memory_mb, cpus, boot_timeout, labels=labels,
                           lifetime=timeout, on_timeout=on_timeout if timeout else None,
                           idle_hibernate=idle_hibernate, auto_wake=auto_wake,
                           disk=disk, cold=cold, network=network, allow_out=allow_out,
                           deny_out=deny_out)
        return cls(await http.call(call), http)

    @classmethod
    async def connect(cls, sandbox_id: str, *, url: str | None = None,
                      token: str | None = None, home: PathLike | None = None) -> AsyncSandbox:
        http = _http(url, token, home)
        return cls(await http.call(_ops.get_sandbox(sandbox_id)), http)

    @classmethod
    async def list(cls, *, labels: Mapping[str, str] | None = None, state: str | None = None,
             url: str | None = None, token: str | None = None,
             home: PathLike | None = None) -> builtins.list[SandboxInfo]:
        """Sandboxes with all of ``labels``, in ``state`` (default: all but destroyed)."""
        return await _http(url, token, home).call(_ops.list_sandboxes(labels, state))

    @overload
    @classmethod
    async def fork(cls, checkpoint: AsyncCheckpoint | str, *, worker: str | None = ...,
                   url: str | None = ..., token: str | None = ...,
                   home: PathLike | None = ..., timeout: float | None = ...) -> AsyncSandbox: ...

    @overload
    @classmethod
    async def fork(cls, checkpoint: AsyncCheckpoint | str, *, count: int,
                   worker: str | None = ..., url: str | None = ..., token: str | None = ...,
                   home: PathLike | None = ...,
                   timeout: float | None = ...) -> builtins.list[AsyncSandbox]: ...

    @classmethod
    async def fork(
        cls,
        checkpoint: AsyncCheckpoint | str,
        *,
        count: int | None = None,
        worker: str | None = None,
        url: str | None = None,
        token: str | None = None,
        home: PathLike | None = None,
        timeout: float | None = None,
    ) -> AsyncSandbox | builtins.list[AsyncSandbox]:
        """Same rule as :meth:`Sandbox.fork`: no ``count`` → one sandbox, ``count`` → a list."""
        if isinstance(checkpoint, AsyncCheckpoint) and url is None and token is None \
                and home is None:
            http, cid = checkpoint._http, checkpoint.id
        else:
            http = _http(url, token, home)
            cid = checkpoint.id if isinstance(checkpoint, AsyncCheckpoint) else checkpoint
        n = 1 if count is None else count
        infos = await http.call(_ops.fork(cid, n, worker, fork_timeout(n, timeout)))
        sandboxes = [cls(info, http) for info in infos]
        return sandboxes[0] if count is None else sandboxes

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
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

    async def refresh(self) -> SandboxInfo:
        self._info = await self._http.call(_ops.get_sandbox(self.id))
        return self._info

    @property
    def network(self) -> AsyncNetwork:
        """Its network mode and egress rules; ``await .update(allow_out=..., ...)``."""
        return AsyncNetwork(self)

    async def get_url(self, port: int, *, public: bool = False) -> str:
        data = await self._http.call(_ops.preview(self.id, port, public))
        return preview_url(self._http.config.url, data)

    async def set_timeout(self, timeout: int | None) -> SandboxInfo:
        """End it ``timeout`` seconds from now (by its ``on_timeout``); None: never."""
        self._info = await self._http.call(_ops.set_timeout(self.id, timeout))
        return self._info

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.state} on {self.worker}>"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.kill()

    async def exec(
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
        if (on_stdout or on_stderr) and not background:
            r = await self.commands.run(cmd, on_stdout=on_stdout, on_stderr=on_stderr, env=env,
                                        cwd=cwd, timeout=timeout, stdin=stdin, user=user)
            return check_result(cmd, r, check)
        call = _ops.exec_(self.id, cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                          background=background, user=user)
        return check_result(cmd, await self._http.call(call), check)

    @property
    def commands(self) -> AsyncCommands:
        return AsyncCommands(self._http, self.id)

    @property
    def pty(self) -> AsyncPty:
        return AsyncPty(self._http, self.id)

    async def checkpoint(self, name: str | None = None, *, publish: bool = True,
                         labels: Mapping[str, str] | None = None,
                         timeout: float | None = CHECKPOINT_TIMEOUT) -> AsyncCheckpoint:
        info = await self._http.call(_ops.checkpoint(self.id, name, publish, timeout, labels))
        self._info = dataclasses.replace(self._info, last_checkpoint=info.id)
        return AsyncCheckpoint(info, self._http)

    async def hibernate(self, wait: bool = True, *,
                        timeout: float | None = HIBERNATE_TIMEOUT) -> SandboxInfo:
        self._info = await self._http.call(_ops.hibernate(self.id, wait, timeout))
        return self._info

    async def wake(self, worker: str | None = None, *,
                   timeout: float | None = WAKE_TIMEOUT) -> SandboxInfo:
        self._info = await self._http.call(_ops.wake(self.id, worker, timeout))
        return self._info

    async def kill(self) -> bool:
        try:
            await self._http.call(_ops.kill(self.id))
        except NotFoundError:
            return False
        return True
