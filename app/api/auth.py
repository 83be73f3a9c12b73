"""Who is calling: API keys in `Authorization: Bearer …` or `X-API-Key`, as Starlette auth.

Scopes: every live key has `user`; admin keys also `admin`; `metrics` is held by admin keys
and by the separate scrape token (`CRUCIBLE_METRICS_TOKEN`). `CRUCIBLE_ADMIN_KEY`, when set,
is accepted as an admin key without being stored (for automation and bootstrapping).
Routes declare the scope they need (`infra.web.requires`); a missing or unknown key gets
401, a key without the scope 403.
"""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.requests import HTTPConnection

from evaluations.api_keys import ENV_ADMIN, ApiKey, KeyStore
from infra.credentials import Caller, KeysUnavailable, presented_key, same
from infra.settings import Settings
from infra.web import Handler

#: Paths that answer anyone: credentials sent there are not even looked at (a bad key gets no 401).
PUBLIC_PATHS = frozenset({"/health"})


class ApiKeyBackend(AuthenticationBackend):
    """Looks keys up in the key store, which the app's lifespan builds (it needs the loop)."""

    def __init__(self, settings: Settings, keys: Handler[KeyStore]) -> None:
        self.admin_key = settings.admin_key
        self.metrics_token = settings.metrics_token
        self.keys = keys

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
            try:
                key = await self.keys.instance.lookup(secret)
            except RedisError as exc:
                raise KeysUnavailable(
                    "cannot check the API key now (storage unavailable), try again"
                ) from exc
        if key is None:
            raise AuthenticationError("unknown or revoked API key")
        scopes = ["user", "admin", "metrics"] if key.is_admin else ["user"]
        return AuthCredentials(scopes), Caller(key.name, key)


def caller(conn: HTTPConnection) -> ApiKey | None:
    """The calling key (None for the scrape token or no key)."""
    user = conn.user
    return user.key if isinstance(user, Caller) else None
