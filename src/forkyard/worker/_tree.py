"""Directory trees in and out of a guest as tar streams (``files put -r`` / ``get -r``).

Uploads are checked entry by entry (:mod:`forkyard._tarstream`) before
anything is written in the guest: a refused entry stops the upload with
``UnsafeArchive`` and nothing of it or after it is written (entries before
it stay).  Downloads come from a hostile guest: names are taken from its
listings only when they are plain names, and the receiving end checks the
stream again.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Iterable, Iterator

from forkyard import _tarstream as ts
from forkyard.errors import UnsafeArchive
from forkyard.guest.client import MAX_LIST_ENTRIES, EntryInfo
from forkyard.worker._files import Files

__all__ = ["read_tree", "write_tree"]


def _guest_path(root: str, parts: tuple[str, ...]) -> str:
    return posixpath.join(root, *parts) if parts else root


def write_tree(files: Files, dest: str, chunks: Iterable[bytes], *,
               max_entries: int = ts.MAX_ENTRIES) -> int:
    """Extract a tar stream under the guest directory ``dest``; the number of entries."""
    files.make_dir(dest, parents=True)
    count = 0
    with ts.open_stream(ts.IterReader(chunks)) as tf:  # type: ignore[arg-type]
        for entry, m in ts.members(tf, ts.EntryRules(max_entries)):
            path = _guest_path(dest, entry.parts)
            count += 1
            if entry.kind == "dir":
                files.make_dir(path, mode=entry.mode, parents=True, exact_mode=True)
            elif entry.kind == "symlink":
                files.symlink(path, entry.target)
            else:
                files.write_stream(path, ts.file_chunks(tf, m), mode=entry.mode)
    return count


def read_tree(files: Files, src: str, *, max_entries: int = ts.MAX_ENTRIES) -> Iterator[bytes]:
    """The guest directory ``src`` as a tar stream; its first listing is made at once."""
    top = files.stat(src)
    if not top.is_dir:
        raise NotADirectoryError(f"{src} is not a directory in the guest")
    first = files.list(src)
    return _walk(files, src, first, stat.S_IMODE(top.mode), top.mtime_ns, max_entries)


def _walk(files: Files, src: str, first: list[EntryInfo], root_mode: int, root_mtime: int,
          max_entries: int) -> Iterator[bytes]:
    yield ts.file_header(".", "dir", mode=root_mode, mtime=root_mtime / 1e9)
    count = 1
    stack: list[tuple[tuple[str, ...], list[EntryInfo]]] = [((), first)]
    while stack:
        parts, listing = stack.pop()
        if getattr(listing, "truncated", False) or len(listing) > MAX_LIST_ENTRIES:
            raise UnsafeArchive("guest directory too large to copy",
                                entry=_guest_path(src, parts))
        subdirs = []
        for e in listing:
            if "/" in e.name or e.name in ("", ".", "..") or "\0" in e.name:
                continue  # a lying guest's listing: not a name in this directory
            count += 1
            if count > max_entries:
                raise UnsafeArchive(f"guest tree has more than {max_entries} entries", entry=src)
            sub = (*parts, e.name)
            rel, path = "/".join(sub), _guest_path(src, sub)
            mode, mtime = stat.S_IMODE(e.mode), e.mtime_ns / 1e9
            if e.is_dir:
                yield ts.file_header(rel, "dir", mode=mode, mtime=mtime)
                subdirs.append(sub)
            elif e.is_symlink:
                yield ts.file_header(rel, "symlink", mode=0o777, mtime=mtime,
                                     target=files.readlink(path))
            elif e.is_file:
                yield ts.file_header(rel, "file", mode=mode, size=e.size, mtime=mtime)
                yield from ts.exactly(files.read_stream(path), e.size)
        for sub in reversed(subdirs):
            stack.append((sub, files.list(_guest_path(src, sub))))
    yield ts.tar_end()
