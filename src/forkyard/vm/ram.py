"""Guest RAM as a file QEMU maps: a working file of one VM, or a frozen, shared image.

Every forkyard VM's RAM is ``-object memory-backend-file`` (id ``pc.ram``:
the RAM block name QEMU's legacy ``-m`` uses, so migration streams of older
checkpoints load into it unchanged) over a **memfd** the worker created and
hands to QEMU as an inherited fd, opened by QEMU as ``/proc/self/fd/N``.

Why a memfd, not a file in the blob cache?  QEMU 7.2's memory-backend-file
opens ``mem-path`` ``O_RDWR`` even for ``share=off`` (``readonly=on`` maps the
guest's RAM read-only, which no guest survives; QEMU 8.2 added ``rom=`` for
that).  A file the VM's uid can open for writing is a file a hostile QEMU can
``write(2)`` or punch holes into (QEMU 7.2 itself punches holes into the file
on RAM discard even for private mappings).  A memfd sealed with
``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`` can be opened read-write and
mapped ``MAP_PRIVATE`` writable, yet the kernel refuses every write, shared
writable mapping, truncate and hole punch on it.  So a frozen image is
immutable by the kernel's word, not by a file mode.

- :class:`RamFile` ``working``: the RAM of a VM that was booted (or loaded a
  v1/v2 stream), mapped ``share=on``; its pages are the guest's memory and
  are charged to the VM's memory cgroup as shmem (the cgroup limit holds as it
  did for anonymous RAM).  A checkpoint copies it into a new frozen image.
- :class:`RamFile` ``frozen``: a checkpoint's RAM image, sealed, mapped
  ``share=off`` by every fork of that checkpoint on this worker: they share its
  pages (page cache, counted once in Pss), and what a fork writes goes to its
  own private copy-on-write pages (charged to its cgroup).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from dataclasses import dataclass, field

__all__ = ["BACKEND_ID", "IMAGE_NAME", "SEALS", "RamFile", "written_kb"]

BACKEND_ID = "pc.ram"  # the legacy -m RAM block name: older streams load into it
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_COPY = 2 * 1024 * 1024
IMAGE_NAME = "forkyard-ram-image"  # every frozen image's memfd name (smaps shows it)


@dataclass(eq=False)
class RamFile:
    """One memfd of guest RAM; closed once every holder released it."""

    fd: int
    size: int
    share: bool  # True: a VM's own working RAM; False: a frozen image, mapped privately
    _holders: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def working(cls, size: int, name: str = "forkyard-ram") -> RamFile:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, share=True)

    @classmethod
    def blank_image(cls, size: int) -> RamFile:
        """An unsealed image being filled; :meth:`seal` it before any VM loads from it.

        A VM may map it earlier (QEMU touches no page before it loads its
        state): :func:`written_kb` tells whether one wrote to it meanwhile.
        """
        out = cls.working(size, IMAGE_NAME)
        out.share = False
        return out

    def seal(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)

    @property
    def sealed(self) -> bool:
        return fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) & SEALS == SEALS

    @property
    def mem_path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def hold(self) -> RamFile:
        with self._lock:
            if self._holders <= 0:
                raise ValueError("RAM file already closed")
            self._holders += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            os.close(self.fd)

    def copy_into(self, dest: RamFile, spans: list[tuple[int, int]] | None = None) -> None:
        """Copy ``spans`` (offset, length; default: every span holding data) into ``dest``.

        Holes stay holes (a guest's untouched RAM costs nothing in the copy).
        """
        for offset, length in spans if spans is not None else self.data_spans():
            end = offset + length
            while offset < end:
                n = os.copy_file_range(self.fd, dest.fd, min(_COPY * 16, end - offset),
                                       offset, offset)
                if n <= 0:
                    raise OSError(f"short copy of guest RAM at {offset}")
                offset += n

    def data_spans(self) -> list[tuple[int, int]]:
        """(offset, length) of every region holding data (``SEEK_DATA``/``SEEK_HOLE``)."""
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            out.append((start, end - start))
            pos = end
        return out

    def punch(self, offset: int, length: int) -> None:
        """Drop a span of an unsealed image (an all-zero chunk costs no memory)."""
        fallocate(self.fd, offset, length)


_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


_libc = ctypes.CDLL(None, use_errno=True)


def fallocate(fd: int, offset: int, length: int) -> None:
    """Punch a hole (``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``)."""
    ret = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                         ctypes.c_long(offset), ctypes.c_long(length))
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def written_kb(pid: int) -> int:
    """kB of frozen-image pages that process ``pid`` has written (private copies).

    A private mapping's page turns anonymous when the process writes it, and
    ``/proc/PID/smaps`` counts those per mapping; reading it costs a walk of
    present pages only.
    """
    total = 0
    inside = False
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line
                inside = f"/memfd:{IMAGE_NAME}" in line
            elif inside and head == "Anonymous:":
                total += int(line.split()[1])
    return total
