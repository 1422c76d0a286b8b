"""A VM's disk chain, given to QEMU entirely as ``-blockdev`` options.

``raw base (read-only) <- qcow2 layer ... (read-only) <- qcow2 active``.  The
qcow2 files carry no backing file name QEMU would open; the chain comes from
these options.  That is what lets the layers be content-addressed objects
used in place, never rewritten to point at a local path (a rewrite would
change their bytes and therefore their digest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiskChain", "file_node", "qcow2_top_node"]


@dataclass(frozen=True, slots=True)
class DiskChain:
    base: Path | None  # raw ext4 image, read-only; None: `active` stands alone
    layers: tuple[Path, ...]  # qcow2, read-only, bottom first
    active: Path  # qcow2, writable

    def blockdev(self, top_name: str) -> dict[str, Any]:
        node: dict[str, Any] | None = None
        if self.base is not None:
            node = {
                "driver": "raw",
                "node-name": "base",
                "read-only": True,
                "file": file_node(self.base, read_only=True),
            }
        for i, layer in enumerate(self.layers):
            node = {
                "driver": "qcow2",
                "node-name": f"layer{i}",
                "read-only": True,
                "file": file_node(layer, read_only=True),
                "backing": node,
            }
        top = qcow2_top_node(top_name, self.active)
        top["backing"] = node  # None: no backing (yet), whatever the header says
        return top


def qcow2_top_node(name: str, path: Path) -> dict[str, Any]:
    """A writable qcow2 node with nothing under it (QMP ``blockdev-add`` form)."""
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {**file_node(path, read_only=False), "node-name": f"{name}-file"},
        "backing": None,
    }


def file_node(path: Path, *, read_only: bool) -> dict[str, Any]:
    node: dict[str, Any] = {"driver": "file", "filename": str(path)}
    if read_only:
        # Many VMs share read-only layers and bases; the write lock is taken by
        # whoever writes, readers need no exclusive lock.
        node["read-only"] = True
    return node
