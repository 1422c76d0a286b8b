"""Keep large buffers out of glibc's heaps, so a service's RSS follows what it holds.

glibc serves allocations above ``M_MMAP_THRESHOLD`` with their own mmap and
returns them to the kernel on free, but by default it *raises* that threshold
to the size of any mmapped block freed (up to 32 MiB). After one 16 MiB exec
reply, later ones then come from per-thread heaps that keep their pages:
a service's RSS wanders by several replies' worth depending on which thread
served what. Pinning the threshold (which also turns the adjustment off)
keeps every large reply's memory returned when it is dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["pin_mmap_threshold"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>


def pin_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Serve blocks over ``threshold`` bytes by mmap, always; False where not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) unavailable: large buffers may stay in heaps")
    return ok
