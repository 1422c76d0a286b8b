"""Debian packages: find what is missing, install it, download a .deb."""

from __future__ import annotations

import os
from pathlib import Path

from forkyard._proc import run
from forkyard.errors import SetupError, ToolError

__all__ = ["download", "ensure_installed", "missing", "resolve_depends"]

_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# apt-get download as root otherwise warns that the _apt sandbox user cannot
# write to our directory; downloading as root into our own dir is what we want.
_NO_SANDBOX = ["-o", "APT::Sandbox::User=root"]


def missing(packages: list[str]) -> list[str]:
    """The packages from ``packages`` that dpkg does not report as installed."""
    out: list[str] = []
    for name in packages:
        done = run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", name], check=False, timeout=30
        )
        if done.returncode != 0 or done.text.strip() != "installed":
            out.append(name)
    return out


def ensure_installed(packages: list[str], *, log: object = None) -> list[str]:
    """Install whatever of ``packages`` is missing; returns what was installed."""
    todo = missing(packages)
    if not todo:
        return []
    if os.geteuid() != 0:
        raise SetupError(
            "forkyard needs these Debian packages: " + " ".join(todo) + " (run setup as root)"
        )
    if callable(log):
        log("installing " + " ".join(todo))
    try:
        _install(todo)
    except ToolError:
        # A fresh machine often has empty or stale package lists.
        run(["apt-get", "update", "-q"], timeout=600, env=_APT_ENV, what="apt-get update")
        _install(todo)
    still = missing(todo)
    if still:
        raise SetupError("could not install: " + " ".join(still))
    return todo


def _install(packages: list[str]) -> None:
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        timeout=1800,
        env=_APT_ENV,
        what="apt-get install",
    )


def resolve_depends(package: str) -> str:
    """The first hard dependency of a metapackage (e.g. the concrete kernel package)."""
    done = run(["apt-cache", "depends", package], timeout=60)
    for line in done.text.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            dep = line.split(":", 1)[1].strip()
            if dep and not dep.startswith("<"):
                return dep
    raise SetupError(f"apt-cache knows no dependency of {package!r} (run apt-get update?)")


def download(package: str, dest_dir: Path) -> Path:
    """``apt-get download`` one package into ``dest_dir``; returns the .deb path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        run(["apt-get", *_NO_SANDBOX, "download", package], cwd=dest_dir, timeout=900)
    except ToolError:
        run(["apt-get", "update", "-q"], timeout=600, env=_APT_ENV, what="apt-get update")
        run(["apt-get", *_NO_SANDBOX, "download", package], cwd=dest_dir, timeout=900)
    debs = sorted(dest_dir.glob(f"{package}_*.deb"))
    if not debs:
        raise SetupError(f"apt-get download {package} produced no .deb")
    return debs[-1]
