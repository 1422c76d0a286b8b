"""Printing for the CLI: JSON for scripts, rich tables for people, errors on stderr.

rich is imported inside the functions that render with it, never at module
level: ``ls --json`` and a plain ``exec`` never import it, and ``ls`` only
once its answer is there to print.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "console",
    "err_console",
    "error_line",
    "human_bytes",
    "print_json",
    "report_error",
    "say",
    "short",
    "steps",
    "table",
    "transfer_progress",
    "when",
]


def console() -> Console:
    # Built per call, not at import: sys.stdout is replaced by test runners.
    # Piped tables are read in pagers and logs, not an 80-column terminal.
    from rich.console import Console

    width = None if sys.stdout.isatty() else 160
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)


def err_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def say(message: str, *, style: str | None = None) -> None:
    """A progress/status line on stderr, so stdout stays the command's answer."""
    from rich.text import Text

    err_console().print(Text(message, style=style or ""))


def error_line(exc: BaseException) -> str:
    """One line for an error: its first line, with a hint when the rest is cut."""
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    return first + (" (more with --debug)" if rest.strip() else "")


def report_error(exc: BaseException, *, debug: bool) -> None:
    """How every command reports a forkyard (or local OS) error: one red line on
    stderr, the traceback first with ``--debug``; the caller exits 1."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    from rich.markup import escape

    err_console().print(f"[red]error:[/red] {escape(error_line(exc))}")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - loop always returns


def short(digest: str | None, n: int = 12) -> str:
    return "-" if not digest else digest[:n]


# Ids must survive narrow terminals intact: they are what users copy into the
# next command.  Other columns fold (wrap) rather than lose their end.
_WHOLE = {"id", "sandbox"}


def table(*columns: str, title: str | None = None) -> Table:
    from rich.table import Table

    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, no_wrap=c in _WHOLE, overflow="fold")
    return t


def when(stamp: str | None) -> str:
    """``2026-11-28T23:54:03.259Z`` → ``2026-11-28 23:54:03`` for tables."""
    if not stamp:
        return "-"
    return stamp.replace("T", " ").removesuffix("Z").split(".")[0]


@contextlib.contextmanager
def transfer_progress(label: str, *, enabled: bool) -> Iterator[Callable[[int, int | None], None]]:
    """A byte progress bar on stderr; the yielded callback is the SDK's ``progress``."""
    if not enabled:
        yield lambda _done, _total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())
    with Progress(*columns, console=err_console(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def steps(*, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner with the current step on stderr; each step is also kept as a line."""
    if not enabled:
        yield lambda _msg: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console(), transient=True) as bar:
        task = bar.add_task("", total=None)

        def step(message: str) -> None:
            bar.console.print(Text(f"  {message}", style="dim"))
            bar.update(task, description=message)

        yield step
