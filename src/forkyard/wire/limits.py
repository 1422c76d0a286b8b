"""Limits both ends of the HTTP API enforce, in a module light enough for the SDK to import."""

from __future__ import annotations

__all__ = ["MAX_FILE_BYTES"]

# a file written or read through the API; equal to the guest agent's own limit
# (forkyard.guest.client.MAX_FILE_SIZE, checked by a test), so a body the API
# accepts is never refused one hop later
MAX_FILE_BYTES = 64 * 1024 * 1024
