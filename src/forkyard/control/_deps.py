"""Who is asking: the FastAPI dependencies every route scopes by.

``wire.auth.KeyAuth`` resolved the caller's key before the route runs; these
hand the result to the handlers (and refuse non-admins where a route is the
operator's).  A module of their own so that every route module can use them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from forkyard.errors import Forbidden
from forkyard.wire.auth import Principal, principal_of

__all__ = ["Admin", "Caller"]


async def _caller(request: Request) -> Principal:
    return principal_of(request.scope)


async def _admin(request: Request) -> Principal:
    caller = principal_of(request.scope)
    if not caller.admin:
        raise Forbidden("this needs an admin key")
    return caller


# who is asking (KeyAuth resolved it); every sandbox and checkpoint route scopes by it
Caller = Annotated[Principal, Depends(_caller)]
Admin = Annotated[Principal, Depends(_admin)]
