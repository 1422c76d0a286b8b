"""Limits both ends of the HTTP API enforce, in a module light enough for the SDK to import."""

from __future__ import annotations

import os

__all__ = ["EXEC_STDIN_BYTES", "MAX_FILE_BYTES", "max_file_bytes"]

# The default per-request maximum of a file (or directory tree) body.  Files
# stream on every hop in bounded chunks, so this bounds a transfer's disk use
# in the guest, not anyone's memory; operators set their own with
# FORKYARD_MAX_FILE_BYTES (both services read it at each request).
MAX_FILE_BYTES = 16 * 1024**3
# exec's stdin travels as base64 inside one JSON body, held whole: a real bound
EXEC_STDIN_BYTES = 64 * 1024 * 1024


def max_file_bytes() -> int:
    raw = os.environ.get("FORKYARD_MAX_FILE_BYTES", "")
    try:
        value = int(raw) if raw else MAX_FILE_BYTES
    except ValueError:
        return MAX_FILE_BYTES
    return value if value > 0 else MAX_FILE_BYTES
