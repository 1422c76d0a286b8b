"""The wire contract: everything that crosses HTTP between SDK, control plane and workers.

- :mod:`~forkyard.wire.models`: request and reply bodies (pydantic);
- :mod:`~forkyard.wire.errors`: the one table from errors to HTTP status and body;
- :mod:`~forkyard.wire.auth`: bearer-token middleware;
- :mod:`~forkyard.wire.serving`: listening sockets, ready files, bounded bodies;
- :mod:`~forkyard.wire.lifecycle`: the one sandbox state enum and its transition table;
- :mod:`~forkyard.wire.ids`: identifiers.

The control plane, the worker daemon and the SDK import this package; it
imports none of them (nor the VM stack).  This ``__init__`` stays empty so
that importing one light module (``lifecycle``, ``ids``) loads nothing else.
"""
