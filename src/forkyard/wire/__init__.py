"""The wire contract: everything that crosses HTTP between SDK, control plane and workers.

- :mod:`~forkyard.wire.models`: request and reply bodies (pydantic);
- :mod:`~forkyard.wire.errors`: the one table from errors to HTTP status and body;
- :mod:`~forkyard.wire.auth`: bearer-token middleware;
- :mod:`~forkyard.wire.serving`: listening sockets, ready files, bounded bodies;
- :mod:`~forkyard.wire.lifecycle`: the one sandbox state enum and its transition table;
- :mod:`~forkyard.wire.ids`: identifiers;
- :mod:`~forkyard.wire.limits`: limits both ends enforce (the file size);
- :mod:`~forkyard.wire.output`: how a command's output bytes travel in JSON (once, exactly).

The control plane, the worker daemon and the SDK import this package; it
imports none of them (nor the VM stack).  This ``__init__`` stays empty so
that importing one light module (``lifecycle``, ``ids``, ``limits``, ``output``) loads
nothing else: the SDK imports only those.
"""
