"""The worker daemon (``forkyard worker``): one :class:`~forkyard.worker.Worker` behind HTTP.

Only the control plane calls it (worker token).  It registers with the
control plane at start (retrying until it answers), then reports its capacity
and sandboxes every 2 s; the reply names sandboxes the cluster no longer knows,
which it destroys (a destroy whose call was lost, a copy left behind by a wake
on another worker).  Checkpoints are published by a background pool; the
control plane follows each publish with ``GET /checkpoints/{id}?wait=``.

On SIGTERM/SIGINT uvicorn stops accepting requests, waits for those in
flight, and the app's shutdown then destroys or hibernates (``on_shutdown``)
every sandbox and tells the control plane.  If the process dies instead, its
QEMUs die with it (``forkyard.vm._spawn``): no VM outlives its daemon.

Bodies, the error table and auth are the wire contract's (``forkyard.wire``),
shared with the control plane: one wire format, one mapping.  The daemon
imports no control-plane code.  Its parts:

- ``_app``: :func:`create_app` and :func:`serve`;
- ``_routes``: the HTTP routes, thin over ``_node``;
- ``_node``: the daemon's state and the operations that are more than one library call;
- ``_capacity``: VM slots (a boot holds one; a full worker refuses with 503);
- ``_publish``: background publishes and their status;
- ``_link``: register, heartbeat and leave.
"""

from __future__ import annotations

from forkyard.worker.daemon._app import create_app, serve

__all__ = ["create_app", "serve"]
