"""A command's output on the wire: each stream carried once, exactly.

JSON strings cannot hold arbitrary bytes.  Output that is valid UTF-8 (nearly
all of it) travels as its text, readable in any JSON tool; anything else
travels as base64.  A ``*_encoding`` field beside the stream says which, so
the bytes a client decodes are always the bytes the guest wrote.  (Sending
both forms, as the API once did, more than doubled every reply.)

Light on purpose (no pydantic): the SDK decodes with it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

__all__ = ["ENCODINGS", "OutputEncoding", "decode_output", "encode_output"]

OutputEncoding = Literal["utf-8", "base64"]
ENCODINGS: tuple[OutputEncoding, ...] = ("utf-8", "base64")


# bytes JSON writes as a six-byte \u00XX escape, and those it writes as two bytes
_WIDE = bytes(c for c in range(0x20) if c not in b"\b\f\n\r\t")
_NARROW = b"\b\f\n\r\t\"\\"
_SMALL = 64 * 1024  # below this, readable text matters more than size


def _json_size(data: bytes) -> int:
    wide = len(data) - len(data.translate(None, _WIDE))
    narrow = len(data) - len(data.translate(None, _NARROW))
    return len(data) + 5 * wide + narrow


def encode_output(data: bytes) -> tuple[str, OutputEncoding]:
    """``data`` as one JSON-safe string and the encoding that gives the bytes back.

    Text unless its JSON escapes would make it larger than base64: 16 MiB of
    NULs are valid UTF-8 but 96 MiB of ``\u0000`` in JSON, which every hop
    would then buffer and parse.
    """
    if len(data) <= _SMALL or _json_size(data) <= (len(data) + 2) // 3 * 4:
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), "base64"


def decode_output(value: str, encoding: str) -> bytes:
    """The bytes of a stream sent by :func:`encode_output`; ``ValueError`` if malformed."""
    if encoding == "utf-8":
        # surrogates cannot come from valid UTF-8: a peer that sends them is broken
        return value.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not valid base64: {exc}") from exc
    raise ValueError(f"unknown output encoding {encoding!r}")
