"""The ``forkyard`` command line (typer + rich); ``forkyard --help`` lists the commands.

Cluster: ``up``, ``down``, ``status`` (and the ``server``/``worker`` processes
``up`` starts).  Sandboxes: ``create``, ``ls``, ``exec``, ``files put|get``,
``checkpoint``, ``checkpoints``, ``fork``, ``hibernate``, ``wake``, ``rm``.
Machine: ``setup``, ``image build|ls``.  ``demo`` runs the cluster demo.
"""

from __future__ import annotations

from forkyard.cli._app import app, main

__all__ = ["app", "main"]
