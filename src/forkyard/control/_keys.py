"""API keys: tenants are key names; a key is random, shown once and stored as its sha256.

Why a plain sha256 and not a slow password hash: a key is 256 random bits, so
no dictionary or brute force can find it from its digest, and a slow hash
would only cost every request time.  A deterministic digest is also what lets
a request find its key by an indexed lookup instead of trying every row.

Workers do not have API keys: their credentials are derived from the cluster
secret (:func:`forkyard.wire.auth.worker_credential`).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError

from forkyard.control._db import ApiKeyRow, Database, iso, utcnow
from forkyard.errors import KeyConflict, KeyNotFound
from forkyard.wire.auth import KeyCreated, KeyOut, Principal

__all__ = ["BOOTSTRAP_KEY", "Keys", "digest_of"]

BOOTSTRAP_KEY = "admin"  # the name of the admin key `forkyard up` starts the server with
_CACHE_TTL = 2.0  # how long another control plane may still honour a revoked key
_CACHE_MAX = 4096


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _out(row: ApiKeyRow) -> KeyOut:
    return KeyOut(name=row.name, admin=row.admin, created=iso(row.created) or "",
                  revoked=iso(row.revoked))


class Keys:
    def __init__(self, db: Database) -> None:
        self.db = db
        # digest -> (principal, expiry): a request costs no database round trip
        # for a key seen in the last seconds; only valid keys are cached, so
        # strangers' tokens cannot grow it
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def bootstrap(self, key: str) -> None:
        """Make ``key`` the admin key named ``admin`` (the token ``forkyard up`` stores).

        A revoked bootstrap key stays revoked: an operator's revocation wins.
        """
        with self.db.tx() as s:
            row = s.get(ApiKeyRow, BOOTSTRAP_KEY, with_for_update=True)
            if row is None:
                s.add(ApiKeyRow(name=BOOTSTRAP_KEY, digest=digest_of(key), admin=True,
                                created=utcnow(), revoked=None))
            elif row.revoked is None:
                row.digest = digest_of(key)  # the server was restarted with a new token
        self._forget()

    def create(self, name: str, *, admin: bool) -> KeyCreated:
        key = "fyk_" + secrets.token_urlsafe(32)
        try:
            with self.db.tx() as s:
                if s.get(ApiKeyRow, name) is not None:
                    # never reused: a new key under an old name would inherit its objects
                    raise KeyConflict(f"API key name {name!r} is taken (keys are never "
                                      "reused, even revoked)")
                row = ApiKeyRow(name=name, digest=digest_of(key), admin=admin,
                                created=utcnow(), revoked=None)
                s.add(row)
        except SQLIntegrityError as exc:  # a concurrent create of the same name
            raise KeyConflict(f"API key name {name!r} is taken") from exc
        return KeyCreated(**_out(row).model_dump(), key=key)

    def all(self) -> list[KeyOut]:
        with self.db.tx() as s:
            return [_out(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created,
                                                                           ApiKeyRow.name))]

    def revoke(self, name: str) -> None:
        with self.db.tx() as s:
            row = s.get(ApiKeyRow, name, with_for_update=True)
            if row is None:
                raise KeyNotFound(name)
            if row.revoked is not None:
                return
            if row.admin:
                live_admins = s.scalar(select(func.count()).select_from(ApiKeyRow).where(
                    ApiKeyRow.admin.is_(True), ApiKeyRow.revoked.is_(None)))
                if (live_admins or 0) <= 1:
                    raise KeyConflict(f"{name!r} is the last admin key; create another "
                                      "admin key before revoking it")
            row.revoked = utcnow()
        self._forget()

    def principal(self, key: str) -> Principal | None:
        digest = digest_of(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self.db.tx() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.digest == digest)).first()
            if row is None or row.revoked is not None:
                return None
            principal = Principal(row.name, "admin" if row.admin else "tenant")
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (principal, now + _CACHE_TTL)
        return principal

    def _forget(self) -> None:
        with self._lock:
            self._cache.clear()
