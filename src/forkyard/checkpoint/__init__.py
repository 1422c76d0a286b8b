"""Checkpoints: frozen manifests naming content-addressed parts.

Checkpoints are *external*: a checkpoint freezes the sandbox's writable qcow2
layer (QMP ``blockdev-snapshot``; the sandbox continues on a new empty layer)
and saves RAM + device state as a migration stream, both while the VM is
paused for the same instant.  We chose this over ``savevm`` internal
snapshots because:

- a fork is a new empty overlay on the frozen layers plus ``-incoming`` of the
  state: no disk copy at all, many forks share the same read-only files;
- the frozen layer holds exactly what the sandbox changed, so it *is* the
  portable archive part, content-addressed and written once;
- internal snapshots keep their own L1 tables inside one mutable qcow2, which
  is what makes ``qemu-img rebase -b ""`` silently lose base data under a
  snapshot (reproduced by tests/integration/test_export_import.py::
  test_rebase_flatten_loses_base_data_under_the_snapshot);
  ``forkyard export`` produces a savevm snapshot only at the end, from a
  complete disk, so its view is whole.

Before the capture the guest syncs and drops its clean page cache (the
agent's ``sync`` with the drop flag; guests boot with ``init_on_free=1`` so
freed pages are zero and QEMU's migration skips them).  Cached file pages are
copies of disk blocks that the frozen layer or the base already hold; keeping
them would store the same data twice.  ``Sandbox.checkpoint(keep_page_cache=
True)`` opts out.

A capture is a frozen :class:`~forkyard.checkpoint.recorder.Capture` that a
:class:`~forkyard.checkpoint.recorder.Recorder` files and turns into a
manifest; the manifest's ``vm`` is the runtime's own
:class:`~forkyard.vm.shape.VMShape`, whose device profile
(``forkyard.vm.devices``) a restore renders again.
"""

from __future__ import annotations

from forkyard.checkpoint.local import Checkpoint, CheckpointFiles, LocalCheckpoints
from forkyard.checkpoint.manifest import FORMAT, BootRef, ChunkRef, Manifest, PartRef, VMInfo

__all__ = [
    "FORMAT",
    "BootRef",
    "Checkpoint",
    "CheckpointFiles",
    "ChunkRef",
    "LocalCheckpoints",
    "Manifest",
    "PartRef",
    "VMInfo",
]
