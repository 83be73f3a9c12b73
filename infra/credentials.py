"""Credentials as the two HTTP services read them: a bearer token (or `X-API-Key`) compared in
constant time, and the shared secret a worker presents to an executor (`EXECUTOR_SECRET`).
The API's key look-up builds on these (`app/api/auth.py`); the executor uses them alone."""

from __future__ import annotations

import hmac

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.requests import HTTPConnection

from evaluations.api_keys import ApiKey
from infra.web import EXECUTOR_SCOPE, JSONResponse


class Caller(BaseUser):
    """Who passed authentication: a key's holder, the metrics scraper, or (at the executor) a worker."""

    def __init__(self, name: str, key: ApiKey | None = None) -> None:
        self.name = name
        self.key = key

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return self.key.id if self.key else self.name


def presented_key(conn: HTTPConnection) -> str | None:
    """The key sent. An Authorization header, if any, is the one that counts and must be
    `Bearer <key>`: a request carrying a bad one is refused, whatever else it carries."""
    header = conn.headers.get("authorization")
    if header is not None:
        if header[:7].lower() != "bearer " or not header[7:].strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
        return header[7:].strip()
    return conn.headers.get("x-api-key") or None


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class SharedSecretBackend(AuthenticationBackend):
    """The executor's side: only callers with `EXECUTOR_SECRET` (workers, the API) get `executor`."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        presented = presented_key(conn)
        if presented is None:
            return None
        if not same(presented, self.secret):
            raise AuthenticationError("wrong executor secret")
        return AuthCredentials([EXECUTOR_SCOPE]), Caller("worker")


def executor_headers(secret: str | None) -> dict[str, str]:
    """What a worker sends the executor to be let in."""
    return {"authorization": f"Bearer {secret}"} if secret else {}


class KeysUnavailable(AuthenticationError):
    """The key store (Redis) did not answer: a 503, not the caller's fault."""


def auth_failed(conn: HTTPConnection, exc: Exception) -> JSONResponse:
    status = 503 if isinstance(exc, KeysUnavailable) else 401
    return JSONResponse({"error": str(exc), "details": {}}, status_code=status)
