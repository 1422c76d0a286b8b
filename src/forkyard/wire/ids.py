"""Identifiers that cross the wire: how they are made and what they look like."""

from __future__ import annotations

import re
import secrets

__all__ = ["SANDBOX_ID_RE", "new_sandbox_id"]

SANDBOX_ID_RE = re.compile(r"^sb-[0-9a-f]{20}$")


def new_sandbox_id() -> str:
    # 80 random bits: ids are capabilities in the HTTP API, so unguessable
    return "sb-" + secrets.token_hex(10)
