"""A VM's disk chain, given to QEMU entirely as ``-blockdev`` options.

``raw base (read-only) <- qcow2 layer ... (read-only) <- qcow2 active``.  The
qcow2 files carry no backing file name QEMU would open; the chain comes from
these options.  That is what lets the layers be content-addressed objects
used in place, never rewritten to point at a local path (a rewrite would
change their bytes and therefore their digest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiskChain", "Opener", "file_node", "qcow2_top_node"]

# How a confined QEMU names a file it was handed as an fd (``vm.jail.VMFiles``):
# (path, writable) -> the filename QEMU opens (``/dev/fdset/N``).  None: the path.
Opener = Callable[[Path, bool], str]


@dataclass(frozen=True, slots=True)
class DiskChain:
    base: Path | None  # raw ext4 image, read-only; None: `active` stands alone
    layers: tuple[Path, ...]  # qcow2, read-only, bottom first
    active: Path  # qcow2, writable

    def blockdev(self, top_name: str, opener: Opener | None = None) -> dict[str, Any]:
        node: dict[str, Any] | None = None
        if self.base is not None:
            node = {
                "driver": "raw",
                "node-name": "base",
                "read-only": True,
                "file": file_node(self.base, read_only=True, opener=opener),
            }
        for i, layer in enumerate(self.layers):
            node = {
                "driver": "qcow2",
                "node-name": f"layer{i}",
                "read-only": True,
                "file": file_node(layer, read_only=True, opener=opener),
                "backing": node,
            }
        top = qcow2_top_node(top_name, self.active, opener)
        top["backing"] = node  # None: no backing (yet), whatever the header says
        return top


def qcow2_top_node(name: str, path: Path, opener: Opener | None = None) -> dict[str, Any]:
    """A writable qcow2 node with nothing under it (QMP ``blockdev-add`` form)."""
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {**file_node(path, read_only=False, opener=opener), "node-name": f"{name}-file"},
        "backing": None,
    }


def file_node(path: Path, *, read_only: bool, opener: Opener | None = None) -> dict[str, Any]:
    name = str(path) if opener is None else opener(path, not read_only)
    node: dict[str, Any] = {"driver": "file", "filename": name}
    if name.startswith("/dev/fdset/"):
        # image locks are per open file description, and the fd set keeps every
        # description QEMU was given alive: locks of a layer that a checkpoint
        # reopened read-only would stay behind and refuse the next activation
        # (``cont``) or a fork.  The worker alone opens these files and never
        # hands a writable one to two VMs.
        node["locking"] = "off"
    if read_only:
        # Many VMs share read-only layers and bases; the write lock is taken by
        # whoever writes, readers need no exclusive lock.
        node["read-only"] = True
    return node
