"""What the service refuses or cannot do, said in the domain's words.

Raised anywhere below the HTTP edge (the store, quotas, submission, input checks); the edge
(`infra.web.HTTP_STATUS`) is the one place that turns each kind into a status code,
and the Celery shim turns the same exceptions into `ValueError`s.
"""

from __future__ import annotations


class CrucibleError(Exception):
    """A refusal that names its problem: `message` for people, `details` for programs, and
    `headers` an HTTP answer should carry (a rate limit's `Retry-After`)."""

    def __init__(self, message: str, /, headers: dict[str, str] | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.details = details


class Refusal(CrucibleError):
    """The caller's request is refused (a 4xx): the caller can change something and try again."""


class MalformedInput(Refusal):
    """The input cannot be read at all: a body that does not parse as JSON (a 422, as the
    original FastAPI service answered; a body that parses but is the wrong shape is
    `InvalidInput`, also a 422)."""


class UnsupportedMediaType(Refusal):
    """The input declares a format the service does not read."""


class TimedOut(Refusal):
    """The caller did not send what it started to within the time allowed (a request body)."""


class Refused(Refusal):
    """The request is well-formed, but the thing's state refuses it (a cancel of a finished
    evaluation: the contract answers 400)."""


class InvalidInput(Refusal):
    """A field is missing, of the wrong type or out of range."""


class TooLarge(Refusal):
    """The input, or one field of it, is over its size limit."""


class Unauthenticated(Refusal):
    """No valid credentials came with the call."""


class Forbidden(Refusal):
    """The caller is known but may not do this."""


class NotFound(Refusal):
    """No such thing, or not the caller's to see (both answer alike)."""


class Conflict(Refusal):
    """The thing exists already, or is in a state that refuses this."""


class LimitExceeded(Refusal):
    """A quota or rate limit refuses the call for now."""


class Unavailable(CrucibleError):
    """A service this one depends on cannot be reached now (ours, not the caller's: a 503)."""


class Busy(CrucibleError):
    """Every slot is taken: the caller should try another instance or later (a 503)."""
