"""The ``forkyard`` entry point: ``--version``, ``ls`` and ``exec`` without typer.

Importing typer (with its vendored click) and rich, and building the app with
every command, takes longer than the ``ls`` or ``exec`` an agent runs dozens
of times.  So :func:`main` first tries to read the arguments itself, for the
plain forms of those commands only, parsed as click would parse them.  Anything
else (``--help``, any other command, an unknown, combined-short or malformed
option, a missing argument, a value that needs checking) goes to the full
typer app, which then prints exactly the usage, help or error it always did:
the fast path never prints a usage error of its own.

Errors of the fast path are reported as the app reports them (one red line,
exit 1; ``--debug`` adds the traceback; Ctrl-C exits 130, as typer does).
"""

from __future__ import annotations

# Only what the interpreter has loaded anyway: typing, dataclasses, pathlib,
# even collections, cost ~1-10 ms each here, all part of `--version`'s budget.
import os
import sys

__all__ = ["Plan", "main", "plan"]

# option -> parameter name.  Only exact spellings: ``-e`` but not ``-eK=V``.
_CONNECTION = {"--home": "home", "--url": "url", "--token": "token"}
_LS_VALUES = {**_CONNECTION, "--label": "label", "-l": "label", "--state": "state"}
_LS_FLAGS = {"--json": "json_"}
_EXEC_VALUES = {**_CONNECTION, "--env": "env", "-e": "env", "--cwd": "cwd",
                "--timeout": "timeout"}
_EXEC_FLAGS = {"--json": "json_", "--stdin": "stdin", "--background": "background",
               "-d": "background"}
_MULTIPLE = {"env", "label"}


class _Fallback(Exception):
    """These arguments need the full typer app."""


class Plan:
    """A command the fast path runs: its name and the parsed parameters."""

    __slots__ = ("args", "command", "debug", "options")

    def __init__(self, command: str, debug: bool = False,
                 options: dict[str, object] | None = None, args: list[str] | None = None
                 ) -> None:
        self.command = command  # "version", "ls" or "exec"
        self.debug = debug
        self.options = options or {}
        self.args = args or []

    def __repr__(self) -> str:
        return f"Plan({self.command!r}, debug={self.debug}, {self.options}, {self.args})"


def _parse(args: list[str], values: dict[str, str], flags: dict[str, str]
           ) -> tuple[dict[str, object], list[str]]:
    """Options and positionals, interspersed as click allows, ``--`` ending options."""
    opts: dict[str, object] = {}
    pos: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            pos.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            pos.append(arg)
            continue
        if arg in flags:
            opts[flags[arg]] = True
            continue
        name, eq, value = arg.partition("=")
        if not (eq and name.startswith("--")):
            if arg not in values or i == len(args):
                raise _Fallback
            name, value = arg, args[i]
            i += 1
        if name not in values or not value or value.startswith("-"):
            # a value click might read differently (or reject): let it decide
            raise _Fallback
        key = values[name]
        if key in _MULTIPLE:
            listed = opts.setdefault(key, [])
            assert isinstance(listed, list)
            listed.append(value)
        else:
            opts[key] = value  # click keeps the last of a repeated option
    return opts, pos


def _env_default(opts: dict[str, object], key: str, var: str) -> None:
    # click's envvar rule: used when the option is absent, and only if non-empty
    if key not in opts and os.environ.get(var):
        opts[key] = os.environ[var]


def plan(argv: list[str]) -> Plan | None:
    """What the fast path would run for ``forkyard ARGV``; None = the typer app."""
    n = 0
    while n < len(argv) and argv[n].startswith("-"):
        if argv[n] not in ("--debug", "--version"):
            return None  # click rejects an unknown root option before --version acts
        n += 1
    root, rest = argv[:n], argv[n:]
    if "--version" in root:  # eager, as in the app: the command is never looked at
        return Plan("version")
    debug = "--debug" in root
    if not rest or rest[0] not in ("ls", "exec"):
        return None
    command, args = rest[0], rest[1:]
    try:
        if command == "ls":
            opts, pos = _parse(args, _LS_VALUES, _LS_FLAGS)
            if pos:
                return None
            from forkyard.cli._hot import parse_labels

            labels = opts.get("label")
            parse_labels(labels if isinstance(labels, list) else None)  # bad: typer says so
        else:
            opts, pos = _parse(args, _EXEC_VALUES, _EXEC_FLAGS)
            if len(pos) < 2:
                return None
            if "timeout" in opts:
                opts["timeout"] = float(str(opts["timeout"]))
            from forkyard.cli._hot import parse_env

            env = opts.get("env")
            parse_env(env if isinstance(env, list) else None)
    except (_Fallback, ValueError):
        return None
    _env_default(opts, "home", "FORKYARD_HOME")
    return Plan(command, debug, opts, pos)


def _str(opts: dict[str, object], key: str) -> str | None:
    value = opts.get(key)
    return value if isinstance(value, str) else None


def _execute(p: Plan) -> int:
    from pathlib import Path

    from forkyard.cli import _hot
    from forkyard.sdk.config import ENV_TOKEN, ENV_URL

    opts = dict(p.options)
    _env_default(opts, "url", ENV_URL)
    _env_default(opts, "token", ENV_TOKEN)
    home = _str(opts, "home")
    home_path = Path(home) if home is not None else None
    url, token = _str(opts, "url"), _str(opts, "token")
    json_ = bool(opts.get("json_"))
    if p.command == "ls":
        labels = opts.get("label")
        _hot.run_ls(_hot.connect(home_path, url, token), json_,
                    _hot.parse_labels(labels if isinstance(labels, list) else None),
                    _str(opts, "state"))
        return 0
    env = opts.get("env")
    timeout = opts.get("timeout", _hot.EXEC_TIMEOUT)
    assert isinstance(timeout, float)
    return _hot.run_exec(
        lambda: _hot.connect(home_path, url, token), p.args[0], p.args[1:],
        env=_hot.parse_env(env if isinstance(env, list) else None), cwd=_str(opts, "cwd"),
        timeout=timeout, stdin=bool(opts.get("stdin")),
        background=bool(opts.get("background")), json_=json_)


def _quiet_stdout() -> None:
    # The reader went away (`forkyard ls | head`): exit without the interpreter
    # complaining when it flushes stdout at exit, as click does.
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _run(p: Plan) -> int:
    from forkyard.errors import ForkyardError

    debug = p.debug or os.environ.get("FORKYARD_DEBUG") == "1"
    try:
        return _execute(p)
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except (ForkyardError, OSError) as exc:
        from forkyard.cli._output import report_error

        report_error(exc, debug=debug)
        return 1
    except KeyboardInterrupt:
        return 130  # typer's answer to Ctrl-C: no message
    except EOFError:
        from forkyard.cli._output import err_console

        sys.stderr.write("\n")
        err_console().print("Aborted.", style="red")  # as typer's rich_abort_error
        return 1


def _block_httpx_cli() -> None:
    # httpx's __init__ imports its own command line (httpx._main), and with it
    # click, rich and pygments, whenever those are installed; its fallback for
    # an ImportError is a stub.  This process never runs the httpx CLI.
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def main() -> None:
    """Console-script entry point (``forkyard = "forkyard.cli:main"``)."""
    _block_httpx_cli()
    p = plan(sys.argv[1:])
    if p is None:
        from forkyard.cli._app import app

        app(prog_name="forkyard")
        return
    if p.command == "version":
        from forkyard import __version__

        sys.stdout.write(f"forkyard {__version__}\n")
        sys.stdout.flush()
        return
    code = _run(p)
    if code:
        sys.exit(code)
