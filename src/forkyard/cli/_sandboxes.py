"""Sandbox commands: create, ls, exec, files, checkpoint(s), fork, hibernate, wake, rm.

``ls`` and ``exec`` run their bodies from :mod:`forkyard.cli._hot`, which the
fast path of ``forkyard.cli.main`` runs too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from forkyard.cli._hot import EXEC_TIMEOUT, parse_env, parse_labels, run_exec, run_ls
from forkyard.cli._network import AllowOpt, DenyOpt, NetworkOpt
from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, connect, interactive
from forkyard.cli._output import (
    console,
    human_bytes,
    print_json,
    short,
    table,
    transfer_progress,
    when,
)
from forkyard.sdk import _ops
from forkyard.sdk._common import (
    CHECKPOINT_TIMEOUT,
    HIBERNATE_TIMEOUT,
    WAKE_TIMEOUT,
    fork_timeout,
)
from forkyard.sdk.models import CheckpointInfo, SandboxInfo

__all__ = ["files_app", "register"]

files_app = typer.Typer(help="Copy files into and out of a sandbox.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)]
LabelOpt = Annotated[list[str] | None, typer.Option(
    "--label", "-l", help="KEY=VALUE (repeatable).", show_default=False)]


def _labels(items: list[str] | None) -> dict[str, str]:
    try:
        return parse_labels(items)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--label") from None


def _print_sandbox(info: SandboxInfo, json_: bool) -> None:
    if json_:
        print_json(info.to_json())
    else:
        console().print(f"{info.id} {info.state} on {info.worker}")


def _checkpoint_table(infos: list[CheckpointInfo]) -> None:
    t = table("id", "state", "name", "sandbox", "worker", "changed", "stored", "created")
    for c in infos:
        t.add_row(short(c.id, 16), c.state, c.name or "-", c.sandbox or "-", c.worker or "-",
                  human_bytes(c.changed_bytes), human_bytes(c.stored_bytes), when(c.created))
    console().print(t)


def create(
    image: Annotated[str, typer.Option("--image", "-i", help="Base image name or digest.")]
    = "minimal",
    worker: Annotated[str | None, typer.Option("--worker", "-w", help="Pin to a worker.")]
    = None,
    memory: Annotated[int | None, typer.Option("--memory", "-m", min=64, help="MiB.")] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", min=1)] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="Disk size, e.g. 4G (thin).")]
    = None,
    cold: Annotated[bool, typer.Option("--cold", help="Boot, even if a template exists.")]
    = False,
    label: LabelOpt = None,
    timeout: Annotated[int | None, typer.Option(
        "--timeout", min=1, help="Seconds until --on-timeout happens.")] = None,
    on_timeout: Annotated[str, typer.Option(
        "--on-timeout", help="kill or hibernate.")] = "kill",
    idle_hibernate: Annotated[int | None, typer.Option(
        "--idle-hibernate", min=1, help="Hibernate after this many seconds without "
                                        "exec or file traffic.")] = None,
    auto_wake: Annotated[bool, typer.Option(
        "--auto-wake", help="An exec or file request wakes it when hibernated.")] = False,
    network: NetworkOpt = None, allow_out: AllowOpt = None, deny_out: DenyOpt = None,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Start a new sandbox (from the image's template, or booting it); prints its id."""
    if on_timeout not in ("kill", "hibernate"):
        raise typer.BadParameter(f"{on_timeout!r} is not kill or hibernate",
                                 param_hint="--on-timeout")
    labels = _labels(label)
    try:
        size = None if disk is None else _ops.disk_bytes(disk)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--disk") from None
    http = connect(home, url, token)
    info = http.call(_ops.create(image, worker, memory, cpus, _ops.BOOT_TIMEOUT,
                                 labels=labels, lifetime=timeout,
                                 on_timeout=on_timeout if timeout else None,
                                 idle_hibernate=idle_hibernate, auto_wake=auto_wake,
                                 disk=size, cold=cold, network=network,
                                 allow_out=allow_out, deny_out=deny_out))
    if json_:
        print_json(info.to_json())
    else:
        console().print(info.id)


def ls(label: LabelOpt = None,
       state: Annotated[str | None, typer.Option(
           "--state", help="Only this state (default: all but destroyed).")] = None,
       home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
       json_: JsonOpt = False) -> None:
    """List sandboxes (all but destroyed), optionally by label and state."""
    run_ls(connect(home, url, token), json_, _labels(label), state)


def exec_(
    sandbox_id: IdArg,
    cmd: Annotated[list[str], typer.Argument(
        help="One argument runs under /bin/sh -c; several are an argv.", show_default=False)],
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    cwd: Annotated[str | None, typer.Option("--cwd")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds; 0 = none.")]
    = EXEC_TIMEOUT,
    stdin: Annotated[bool, typer.Option("--stdin", "-i", help="Forward this process's stdin.")]
    = False,
    background: Annotated[bool, typer.Option("--background", "-d",
                                             help="Start it and print its pid.")] = False,
    tty: Annotated[bool, typer.Option("--tty", "-t", help="Run it on a terminal.")] = False,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Guest account.")] = None,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Run a command in a sandbox: `forkyard exec ID -- CMD...`.

    Output is passed through live, byte for byte; the exit status is the
    command's (128+N if a signal N killed it, 124 if it timed out).  `-d`
    starts it in the background (see `ps`, `attach`, `kill`).
    """
    try:
        env_map = parse_env(env)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--env") from None
    code = run_exec(lambda: connect(home, url, token), sandbox_id, cmd, env=env_map, cwd=cwd,
                    timeout=timeout, stdin=stdin, background=background, json_=json_, tty=tty,
                    user=user)
    if code:
        raise typer.Exit(code)


RecursiveOpt = Annotated[bool, typer.Option(
    "--recursive", "-r", help="A directory tree (sent as a tar stream; '-' is a raw tar).")]


@files_app.command("put")
def files_put(
    sandbox_id: IdArg,
    src: Annotated[str, typer.Argument(help="Local file or directory, or - for stdin.")],
    dst: Annotated[str, typer.Argument(help="Absolute guest path.")],
    mode: Annotated[str, typer.Option("--mode", help="Octal file mode.")] = "644",
    recursive: RecursiveOpt = False,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Copy a local file (any size, streamed) or, with -r, a directory into the sandbox."""
    try:
        file_mode = int(mode, 8)
    except ValueError:
        raise typer.BadParameter(f"{mode!r} is not an octal mode", param_hint="--mode") from None
    http = connect(home, url, token)
    from forkyard.sdk._files import body

    with contextlib.ExitStack() as stack:
        if src == "-":
            chunks = body(sys.stdin.buffer)
        elif recursive:
            from forkyard import _tarstream

            chunks = _tarstream.pack_dir(Path(src))
        else:
            chunks = body(stack.enter_context(Path(src).open("rb")))
        progress = stack.enter_context(transfer_progress(f"put {dst}", enabled=interactive()))
        call = (_ops.write_tree(sandbox_id, dst) if recursive
                else _ops.write_file(sandbox_id, dst, None, file_mode, False))
        http.upload(call, chunks, progress)


@files_app.command("get")
def files_get(
    sandbox_id: IdArg,
    src: Annotated[str, typer.Argument(help="Absolute guest path.")],
    dst: Annotated[str, typer.Argument(help="Local file or directory, or - for stdout.")],
    recursive: RecursiveOpt = False,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Copy a file (streamed) or, with -r, a directory out of the sandbox."""
    http = connect(home, url, token)
    call = _ops.read_tree(sandbox_id, src) if recursive else _ops.read_file(sandbox_id, src)
    with transfer_progress(f"get {src}", enabled=interactive() and dst != "-") as progress:
        chunks = http.stream(call, progress)
        if dst == "-":
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        elif recursive:
            from forkyard import _tarstream

            _tarstream.extract_dir(_tarstream.IterReader(chunks), Path(dst))  # type: ignore[arg-type]
        else:
            _save(chunks, Path(dst), Path(src).name)


def _save(chunks: Iterator[bytes], target: Path, name: str) -> None:
    if target.is_dir():
        target = target / name
    tmp = target.with_name(f".{target.name}.part")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        tmp.replace(target)  # never a half-written file under the real name
    finally:
        tmp.unlink(missing_ok=True)


@files_app.command("mkdir")
def files_mkdir(
    sandbox_id: IdArg,
    path: Annotated[str, typer.Argument(help="Absolute guest path.")],
    mode: Annotated[str, typer.Option("--mode", help="Octal mode.")] = "755",
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Make a directory (and its parents) in the sandbox."""
    try:
        dir_mode = int(mode, 8)
    except ValueError:
        raise typer.BadParameter(f"{mode!r} is not an octal mode", param_hint="--mode") from None
    connect(home, url, token).call(_ops.mkdir(sandbox_id, path, dir_mode, True))


@files_app.command("mv")
def files_mv(
    sandbox_id: IdArg,
    src: Annotated[str, typer.Argument(help="Absolute guest path.")],
    dst: Annotated[str, typer.Argument(help="Absolute guest path.")],
    no_clobber: Annotated[bool, typer.Option("--no-clobber", "-n",
                                             help="Fail if DST exists.")] = False,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Rename a file or directory in the sandbox."""
    connect(home, url, token).call(_ops.rename(sandbox_id, src, dst, not no_clobber))


@files_app.command("exists")
def files_exists(
    sandbox_id: IdArg,
    path: Annotated[str, typer.Argument(help="Absolute guest path.")],
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Exit 0 if the path exists in the sandbox, 1 if not."""
    if not connect(home, url, token).call(_ops.exists(sandbox_id, path)):
        raise typer.Exit(1)


def checkpoint(
    sandbox_id: IdArg,
    name: Annotated[str | None, typer.Option("--name")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it is in the store.")]
    = False,
    label: LabelOpt = None,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Checkpoint a running sandbox (it keeps running); prints the checkpoint id.

    Its labels are the sandbox's plus ``--label``s; forks of it inherit them.
    """
    from forkyard.sdk._sync import Checkpoint

    labels = _labels(label)
    http = connect(home, url, token)
    cp = Checkpoint(http.call(_ops.checkpoint(sandbox_id, name, True, CHECKPOINT_TIMEOUT,
                                              labels)), http)
    if wait:
        cp.wait_published()
    if json_:
        print_json(cp.info.to_json())
    else:
        console().print(cp.id)


def checkpoints(home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
                json_: JsonOpt = False) -> None:
    """List checkpoints."""
    infos = connect(home, url, token).call(_ops.list_checkpoints())
    if json_:
        print_json([c.to_json() for c in infos])
    else:
        _checkpoint_table(infos)


def fork(
    checkpoint_id: Annotated[str, typer.Argument(help="Checkpoint id (or unique prefix).")],
    worker: Annotated[str | None, typer.Option("--worker", "-w")] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=256)] = 1,
    label: LabelOpt = None,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """New sandboxes that continue from a checkpoint; prints their ids.

    They inherit the checkpoint's labels, plus ``--label``s.
    """
    labels = _labels(label)
    http = connect(home, url, token)
    infos = http.call(_ops.fork(checkpoint_id, count, worker, fork_timeout(count, None),
                                labels))
    if json_:
        print_json([s.to_json() for s in infos])
    else:
        # bare ids, one a line, like `create`: `for sb in $(forkyard fork ...)` works
        for s in infos:
            console().print(s.id)


def hibernate(
    sandbox_id: IdArg,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return while publishing.")]
    = False,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Checkpoint, publish and stop a sandbox; `wake` continues it on any worker."""
    http = connect(home, url, token)
    _print_sandbox(http.call(_ops.hibernate(sandbox_id, not no_wait, HIBERNATE_TIMEOUT)), json_)


def wake(
    sandbox_id: IdArg,
    worker: Annotated[str | None, typer.Option("--worker", "-w")] = None,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Resume a hibernated sandbox (same id), optionally on another worker."""
    http = connect(home, url, token)
    _print_sandbox(http.call(_ops.wake(sandbox_id, worker, WAKE_TIMEOUT)), json_)


def rm(
    sandbox_ids: Annotated[list[str], typer.Argument(help="Sandbox ids.", show_default=False)],
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Destroy sandboxes."""
    http = connect(home, url, token)
    for sid in sandbox_ids:
        http.call(_ops.kill(sid))


def register(app: typer.Typer) -> None:
    panel = "Sandboxes"
    app.command(rich_help_panel=panel)(create)
    app.command(rich_help_panel=panel)(ls)
    app.command("exec", rich_help_panel=panel)(exec_)
    app.add_typer(files_app, name="files", rich_help_panel=panel)
    app.command(rich_help_panel=panel)(fork)
    app.command(rich_help_panel=panel)(hibernate)
    app.command(rich_help_panel=panel)(wake)
    app.command(rich_help_panel=panel)(rm)
