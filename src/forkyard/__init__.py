"""forkyard: real QEMU sandboxes you can checkpoint, fork, hibernate and wake anywhere."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
