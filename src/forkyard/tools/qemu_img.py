"""qemu-img: create overlays, inspect images, convert."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forkyard._proc import run
from forkyard.errors import ToolError

__all__ = ["check", "convert", "create", "info", "rebase_unsafe", "snapshot_list"]


def create(path: Path, size: int, *, backing: Path | str | None = None,
           backing_fmt: str = "raw") -> None:
    """A new empty qcow2 of ``size`` bytes.

    ``backing`` is only *recorded* in the header (``-u``: never opened), which
    is how forkyard notes the digest of the layer below; the real chain is
    given to QEMU at run time.
    """
    argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-u", "-b", backing, "-F", backing_fmt]
    argv += [path, str(size)]
    run(argv, timeout=60)


def info(path: Path, *, backing_chain: bool = False) -> dict[str, Any]:
    argv: list[str | Path] = ["qemu-img", "info", "--output=json", "-U"]
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(path)
    done = run(argv, timeout=60)
    try:
        data = json.loads(done.text)
    except ValueError as exc:
        raise ToolError("qemu-img info printed no JSON", argv=[str(a) for a in argv]) from exc
    if backing_chain:
        return {"chain": data}
    if not isinstance(data, dict):
        raise ToolError("qemu-img info: unexpected output", argv=[str(a) for a in argv])
    return data


def check(path: Path) -> dict[str, Any]:
    """``qemu-img check``; raises ToolError when the image is corrupt."""
    done = run(["qemu-img", "check", "--output=json", "-U", path], timeout=300, check=False)
    if done.returncode not in (0,):
        raise ToolError(f"qemu-img check {path.name}", argv=done.argv,
                        returncode=done.returncode, stderr=done.stderr.decode(errors="replace"))
    data = json.loads(done.text)
    return data if isinstance(data, dict) else {}


def convert(src: Path | str, dst: Path, *, src_fmt: str | None = None, dst_fmt: str = "qcow2",
            backing: Path | None = None, backing_fmt: str = "raw",
            timeout: float = 1800) -> None:
    """``src`` may be a ``json:{...}`` chain description (forkyard layers name no backing)."""
    argv: list[str | Path] = ["qemu-img", "convert", "-q"]
    if src_fmt:
        argv += ["-f", src_fmt]
    argv += ["-O", dst_fmt]
    if backing is not None:
        argv += ["-B", backing, "-F", backing_fmt]
    argv += [src, dst]
    run(argv, timeout=timeout)


def rebase_unsafe(path: Path, backing: Path | str | None, backing_fmt: str = "raw") -> None:
    """Metadata-only: point ``path``'s header at ``backing`` (None: no backing file)."""
    if backing is None:
        run(["qemu-img", "rebase", "-u", "-b", "", path], timeout=60)
    else:
        run(["qemu-img", "rebase", "-u", "-b", backing, "-F", backing_fmt, path], timeout=60)


def snapshot_list(path: Path) -> list[dict[str, Any]]:
    snaps = info(path).get("snapshots", [])
    return list(snaps) if isinstance(snaps, list) else []
