"""Who is calling: API keys in `Authorization: Bearer …` or `X-API-Key`, as Starlette auth.

Scopes: every live key has `user`; admin keys also `admin`; `metrics` is held by admin keys
and by the separate scrape token (`CRUCIBLE_METRICS_TOKEN`). `CRUCIBLE_ADMIN_KEY`, when set,
is accepted as an admin key without being stored (for automation and bootstrapping).
Routes declare the scope they need (`app.routing.delegate`); a missing or unknown key gets
401, a key without the scope 403.
"""

from __future__ import annotations

import hmac

from redis.exceptions import RedisError
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.requests import HTTPConnection

from app.config import Settings
from app.json_codec import JSONResponse
from app.keys import ApiKey, KeyStore


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


#: Paths that answer anyone: credentials sent there are not even looked at (a bad key gets no 401).
PUBLIC_PATHS = frozenset({"/health"})

ENV_ADMIN = ApiKey("env-admin", "CRUCIBLE_ADMIN_KEY", "admin", 0)


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


class ApiKeyBackend(AuthenticationBackend):
    """Finds the key store on the app's state (it is built in the lifespan, on the loop)."""

    def __init__(self, settings: Settings) -> None:
        self.admin_key = settings.admin_key
        self.metrics_token = settings.metrics_token

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        if conn.scope["path"] in PUBLIC_PATHS:  # not conn.url: building a URL costs more than the rest
            return None  # answers anyone, whatever credentials come along
        secret = presented_key(conn)
        if secret is None:
            return None
        if self.metrics_token and same(secret, self.metrics_token):
            return AuthCredentials(["metrics"]), Caller("metrics scraper")
        if self.admin_key and same(secret, self.admin_key):
            key: ApiKey | None = ENV_ADMIN  # needs no Redis: works while Redis is down
        else:
            keys: KeyStore = conn.app.state.keys
            try:
                key = await keys.lookup(secret)
            except RedisError as exc:
                raise KeysUnavailable(
                    "cannot check the API key now (storage unavailable), try again"
                ) from exc
        if key is None:
            raise AuthenticationError("unknown or revoked API key")
        scopes = ["user", "admin", "metrics"] if key.is_admin else ["user"]
        return AuthCredentials(scopes), Caller(key.name, key)


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
        return AuthCredentials(["executor"]), Caller("worker")


def executor_headers(secret: str | None) -> dict[str, str]:
    """What a worker sends the executor to be let in."""
    return {"authorization": f"Bearer {secret}"} if secret else {}


class KeysUnavailable(AuthenticationError):
    """The key store (Redis) did not answer: a 503, not the caller's fault."""


def auth_failed(conn: HTTPConnection, exc: Exception) -> JSONResponse:
    status = 503 if isinstance(exc, KeysUnavailable) else 401
    return JSONResponse({"error": str(exc), "details": {}}, status_code=status)


def caller(conn: HTTPConnection) -> ApiKey | None:
    """The calling key (None for the scrape token or no key)."""
    user = conn.user
    return user.key if isinstance(user, Caller) else None
