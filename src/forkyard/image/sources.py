"""Build inputs for base images. Each source fills an empty staging directory.

:class:`MinimalSource` lives in :mod:`forkyard.image._minimal`, the protocol in
:mod:`forkyard.image._stage`. Sources describe themselves with a short string
recorded in the image meta:
``minimal``, ``dir:/abs/path``, ``tar:sha256:<hex of the tarball>``,
``debian:bookworm+python3,git``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from forkyard._proc import require_tool, run
from forkyard.errors import ImageBuildError, UnsafeInput
from forkyard.image._minimal import BUSYBOX, TEST_TREE, MinimalSource, iter_test_tree
from forkyard.image._stage import Progress, Source, StageContext, Staged
from forkyard.image._tarsafe import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, extract_tar
from forkyard.image._tree import clamp_mtime

__all__ = [
    "BUSYBOX",
    "TEST_TREE",
    "DebianSource",
    "DirSource",
    "MinimalSource",
    "Progress",
    "Source",
    "StageContext",
    "Staged",
    "TarSource",
    "iter_test_tree",
]

# --- host directory -------------------------------------------------------------


@dataclass(slots=True)
class _Copier:
    notes: list[str]
    is_root: bool
    links: dict[tuple[int, int], Path]

    def copy_dir(self, src: Path, dst: Path) -> None:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            self.copy_entry(Path(entry.path), dst / entry.name)

    def copy_entry(self, src: Path, dst: Path) -> None:
        st = src.lstat()
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            dst.mkdir(mode=0o700)
            self.copy_dir(src, dst)
        elif stat.S_ISREG(mode):
            if self._link_existing(st, dst):
                return
            self._copy_file(src, dst)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            if not self.is_root:
                self.notes.append(f"skipped device node {src} (not running as root)")
                return
            os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            self.notes.append(f"skipped socket {src}")
            return
        _apply_attrs(dst, st)

    def _link_existing(self, st: os.stat_result, dst: Path) -> bool:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            first = self.links.get(key)
            if first is not None:
                os.link(first, dst, follow_symlinks=False)
                return True
            self.links[key] = dst
        return False

    @staticmethod
    def _copy_file(src: Path, dst: Path) -> None:
        fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with (
                    open(fd_in, "rb", closefd=False) as fin,
                    open(fd_out, "wb", closefd=False) as fout,
                ):
                    shutil.copyfileobj(fin, fout, 1 << 20)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)


def _apply_attrs(dst: Path, st: os.stat_result) -> None:
    mtime = clamp_mtime(st.st_mtime)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        # After chown, which clears setuid/setgid.
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, (mtime, mtime), follow_symlinks=False)


@dataclass(frozen=True, slots=True)
class DirSource:
    """A host directory tree, copied as is: modes, uid/gid, mtimes (whole
    seconds, clamped to 1970..2038), symlinks as symlinks, hardlinks within
    the tree. The source root's own metadata is not used (the image root is
    always 0755 root:root). Sockets are skipped."""

    path: Path | str

    def describe(self) -> str:
        return f"dir:{Path(self.path).resolve()}"

    def stage(self, root: Path, ctx: StageContext) -> Staged:
        src = Path(self.path).resolve()
        if not src.is_dir():
            raise ImageBuildError(f"{src} is not a directory")
        if root.resolve().is_relative_to(src):
            # Copying would chase its own output forever.
            raise ImageBuildError(f"{src} contains the build's staging directory {root}")
        copier = _Copier(notes=[], is_root=os.geteuid() == 0, links={})
        ctx.progress(f"copying {src}")
        try:
            copier.copy_dir(src, root)
        except OSError as exc:
            raise ImageBuildError(f"copying {src}: {exc}") from exc
        for note in copier.notes:
            ctx.progress(note)
        return Staged(source=f"dir:{src}", fixed_times=False, notes=tuple(copier.notes))


# --- tarball ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TarSource:
    """A root-filesystem tarball (``docker export``; plain/gz/bz2/xz/zstd), ``-`` = stdin.

    Untrusted: extracted by :mod:`forkyard.image._tarsafe`, which refuses
    anything that could write outside the staging directory. Member mtimes
    are kept (whole seconds, clamped to 1970..2038).
    """

    path: Path | str
    max_bytes: int = DEFAULT_MAX_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES

    def stage(self, root: Path, ctx: StageContext) -> Staged:
        ctx.progress("extracting tarball" + (" from stdin" if str(self.path) == "-" else ""))
        with self._open() as stream:
            result = extract_tar(
                stream,
                root,
                epoch=ctx.epoch,
                max_bytes=self.max_bytes,
                max_entries=self.max_entries,
                progress=ctx.progress,
            )
        for note in result.notes:
            ctx.progress(note)
        ctx.progress(f"extracted {result.entries} entries, {result.content_bytes} bytes")
        return Staged(
            source=f"tar:sha256:{result.sha256}", fixed_times=False, notes=tuple(result.notes)
        )

    def _open(self) -> IO[bytes]:
        if str(self.path) == "-":
            # Do not close the process's stdin when done.
            return open(sys.stdin.buffer.fileno(), "rb", buffering=0, closefd=False)
        try:
            return open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise ImageBuildError(f"cannot open tarball {self.path}: {exc}") from exc


# --- debian -----------------------------------------------------------------------

_PKG_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_SUITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class DebianSource:
    """``mmdebstrap --variant=minbase`` of ``suite`` plus ``packages``.

    Needs network access to the mirror and minutes of time. Runs with
    ``SOURCE_DATE_EPOCH`` = build epoch so mmdebstrap's own outputs (logs,
    caches it keeps) are deterministic; the builder then sets every mtime to
    the epoch. Identical results need identical package versions, i.e. the
    same mirror state (use a snapshot.debian.org mirror to pin them).
    """

    suite: str = "bookworm"
    packages: tuple[str, ...] = ("python3", "git")
    mirror: str | None = None

    def describe(self) -> str:
        text = f"debian:{self.suite}+{','.join(self.packages)}"
        return text + (f"@{self.mirror}" if self.mirror else "")

    def _validate(self) -> None:
        if not _SUITE_RE.fullmatch(self.suite):
            raise ImageBuildError(f"invalid Debian suite {self.suite!r}")
        for pkg in self.packages:
            if not _PKG_RE.fullmatch(pkg):
                raise UnsafeInput("invalid Debian package name", entry=pkg)
        if self.mirror is not None and (self.mirror.startswith("-") or not self.mirror.strip()):
            raise ImageBuildError(f"invalid mirror {self.mirror!r}")

    def stage(self, root: Path, ctx: StageContext) -> Staged:
        self._validate()
        tool = require_tool("mmdebstrap")
        argv: list[str | os.PathLike[str]] = [tool, "--variant=minbase", "--quiet"]
        if self.packages:
            argv.append("--include=" + ",".join(self.packages))
        argv += [self.suite, root]
        if self.mirror:
            argv.append(self.mirror)
        ctx.progress(f"mmdebstrap {self.describe()} (downloads packages; takes minutes)")
        run(
            argv,
            env={"SOURCE_DATE_EPOCH": str(ctx.epoch), "TMPDIR": str(ctx.scratch)},
            timeout=1800,
            what="mmdebstrap",
        )
        return Staged(source=self.describe(), fixed_times=True)
