"""The control plane (``forkyard server``): the HTTP API of docs/api.md over a fleet of workers.

``create_app`` and ``serve`` live in :mod:`forkyard.control.server`; they are
imported lazily here so that the wire models (``_models``, ``_errors``), which
the worker daemon shares, do not pull in the database and migration stack.
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
