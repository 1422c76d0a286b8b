"""The ``forkyard`` command line (typer + rich); ``forkyard --help`` lists the commands.

Cluster: ``up``, ``down``, ``status`` (and the ``server``/``worker`` processes
``up`` starts).  Sandboxes: ``create``, ``ls``, ``exec``, ``files put|get``,
``checkpoint``, ``checkpoints``, ``fork``, ``hibernate``, ``wake``, ``rm``.
Machine: ``setup``, ``image build|ls``.  ``demo`` runs the cluster demo.

Importing this package is cheap: :func:`main` (see :mod:`forkyard.cli._fast`)
runs ``--version``, ``ls`` and ``exec`` without typer, and the typer ``app`` is
built only when first asked for.
"""

from __future__ import annotations

from forkyard.cli._fast import main

__all__ = ["app", "main"]


def __getattr__(name: str) -> object:
    if name == "app":
        from forkyard.cli._app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
