"""The control plane (``forkyard server``): the HTTP API of docs/api.md over a fleet of workers.

``create_app`` and ``serve`` live in :mod:`forkyard.control.server`; they are
imported lazily here so that importing the package (e.g. for the CLI's help)
does not pull in FastAPI, the database and the migration stack.  What the
control plane shares with workers and the SDK is :mod:`forkyard.wire`.

Modules: ``server`` (the app), ``_routes`` (HTTP, thin), ``_service``
(:class:`ControlPlane`), ``_transitions`` (the steps every sandbox operation
shares), ``_checkpoints`` (checkpoint, adopt, fork), ``_hibernation``
(hibernate, wake, resync after a restart), ``_registry`` (workers, heartbeats,
liveness), ``_placement`` (which worker), ``_publish`` (following uploads),
``_workers`` (the HTTP client executing ``wire.worker_api`` calls),
``_records`` (rows <-> API objects), ``_db`` / ``_migrate`` (the database).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forkyard.control.server import create_app, serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from forkyard.control import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
