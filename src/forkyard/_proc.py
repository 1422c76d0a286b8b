"""The one way forkyard runs external programs.

Every tool wrapper (``forkyard.tools.*``) goes through :func:`run`, so argv is
always a list (never a shell string), every call has a timeout, and a failure
always surfaces as :class:`~forkyard.errors.ToolError` with the argv, exit code
and stderr tail attached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from forkyard.errors import SetupError, ToolError, ToolTimeout

__all__ = ["Completed", "require_tool", "run"]

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def require_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH (also sbin dirs, which root shells have)."""
    path = os.environ.get("PATH", "")
    extra = ":/usr/local/sbin:/usr/sbin:/sbin"
    found = shutil.which(name, path=path + extra)
    if found is None:
        raise SetupError(f"required program {name!r} is not installed (run `forkyard setup`)")
    return found


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    what: str | None = None,
) -> Completed:
    """Run ``argv`` to completion and capture its output.

    ``env`` entries are *added* to the current environment. ``what`` names the
    step in error messages (defaults to the program name).
    """
    args = [os.fspath(a) for a in argv]
    label = what or Path(args[0]).name
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolTimeout(label, argv=args, timeout=timeout) from exc
    except FileNotFoundError as exc:
        raise SetupError(f"required program {args[0]!r} is not installed") from exc
    except OSError as exc:
        raise ToolError(f"{label}: could not start: {exc}", argv=args) from exc
    if check and proc.returncode != 0:
        raise ToolError(
            label,
            argv=args,
            returncode=proc.returncode,
            stderr=proc.stderr.decode("utf-8", "replace"),
        )
    return Completed(args, proc.returncode, proc.stdout, proc.stderr)
