"""Bodies of the process routes (spawn, output, stdin, list, resize, signal) of both services.

Output is pulled by offset (see :mod:`forkyard.guest.protocol`, "Processes"):
``GET .../procs/{pid}/output?out=&err=&wait=`` answers with what lies at those
offsets (at most :data:`READ_MAX` bytes a stream), waiting up to ``wait``
seconds for some, so every reply on every hop is bounded and a client reads
at its own pace.  ``out_offset`` beyond the asked ``out`` means the guest's
scrollback dropped that many bytes (background processes only).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import Field, StrictBool, WithJsonSchema, field_validator

from forkyard.wire.models import (
    _BASE64,
    _CMD_SCHEMA,
    _ENV_SCHEMA,
    GUEST_PATH_RE,
    MAX_EXEC_TIMEOUT,
    USER_RE,
    _Reply,
    _Request,
)
from forkyard.wire.output import OutputEncoding, encode_output

__all__ = ["MAX_WAIT", "READ_MAX", "STDIN_MAX", "ProcOut", "ProcOutput", "ProcStarted",
           "PtySize", "ResizeRequest", "SignalRequest", "SpawnRequest", "StdinWritten"]

READ_MAX = 1024 * 1024
STDIN_MAX = 1024 * 1024
MAX_WAIT = 30.0


class PtySize(_Request):
    rows: int = Field(24, ge=1, le=1000)
    cols: int = Field(80, ge=1, le=1000)


class SpawnRequest(_Request):
    cmd: Annotated[str | list[str], WithJsonSchema(_CMD_SCHEMA)] | None = Field(
        None, description="null on a terminal: the user's login shell")
    env: Annotated[dict[str, str], WithJsonSchema(_ENV_SCHEMA)] = Field(default_factory=dict)
    cwd: Annotated[str, Field(pattern=GUEST_PATH_RE)] | None = None
    timeout: float | None = Field(None, gt=0, le=MAX_EXEC_TIMEOUT,
                                  description="seconds; null: none")
    stdin_b64: Annotated[str, Field(pattern=_BASE64, max_length=STDIN_MAX * 4 // 3 + 4)] | None \
        = None
    keep_stdin: StrictBool = Field(False, description="stdin stays open for .../stdin")
    lossless: StrictBool = Field(
        False, description="the command waits for readers instead of dropping old output")
    user: Annotated[str, Field(pattern=USER_RE)] | None = None
    pty: PtySize | None = Field(None, description="run on a terminal of this size")

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if not items or not items[0]:
            raise ValueError("command must not be empty")
        if any("\0" in a for a in items):
            raise ValueError("command must not contain NUL bytes")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"bad environment variable {key!r}")
        return v

    @field_validator("stdin_b64")
    @classmethod
    def _stdin(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                if len(base64.b64decode(v, validate=True)) > STDIN_MAX:
                    raise ValueError(f"stdin over {STDIN_MAX} bytes")
            except binascii.Error as exc:
                raise ValueError("stdin_b64 is not valid base64") from exc
        return v

    def stdin_bytes(self) -> bytes | None:
        return None if self.stdin_b64 is None else base64.b64decode(self.stdin_b64)

    def spawn_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``forkyard.guest.procs.Processes.spawn``."""
        kw: dict[str, Any] = dict(env=self.env, cwd=self.cwd, timeout=self.timeout,
                                  stdin=self.stdin_bytes(), keep_stdin=self.keep_stdin,
                                  lossless=self.lossless, user=self.user)
        if self.pty is not None:
            kw.update(pty=True, rows=self.pty.rows, cols=self.pty.cols)
        return kw


class ResizeRequest(PtySize):
    pass


class SignalRequest(_Request):
    signal: int = Field(15, ge=1, le=64)


class ProcStarted(_Reply):
    pid: int


class StdinWritten(_Reply):
    pending: int = Field(description="bytes still queued for the process's stdin")


class ProcOut(_Reply):
    pid: int
    command: str
    running: bool
    pty: bool
    exit_code: int | None
    started_ns: int
    timed_out: bool = False


class ProcOutput(_Reply):
    pid: int
    stdout: str
    stdout_encoding: OutputEncoding = "utf-8"
    stderr: str
    stderr_encoding: OutputEncoding = "utf-8"
    out_offset: int = Field(description="where stdout starts (> the asked `out`: dropped)")
    err_offset: int
    exited: bool
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    @classmethod
    def of(cls, pid: int, stdout: bytes, stderr: bytes, out_offset: int, err_offset: int, *,
           exited: bool, exit_code: int | None, signal: int | None,
           timed_out: bool) -> ProcOutput:
        out, out_enc = encode_output(stdout)
        err, err_enc = encode_output(stderr)
        return cls(pid=pid, stdout=out, stdout_encoding=out_enc, stderr=err,
                   stderr_encoding=err_enc, out_offset=out_offset, err_offset=err_offset,
                   exited=exited, exit_code=exit_code, signal=signal, timed_out=timed_out)
