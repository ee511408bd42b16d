"""One error hierarchy for every way out of Flashtile: JSON routes, server-sent events and the Python handle API.

Each error knows its HTTP status and its `type`; the body is always {"error": {"type", "message", ...}} and never a
trace. Python handle callers get the same classes raised (Ray re-raises a replica's exception as its own type).
"""

import logging

from fastapi.responses import JSONResponse

log = logging.getLogger("ray.serve")


class FlashtileError(Exception):
    """Every subclass takes its message first: pickling (a replica's error reaching a handle caller) rebuilds it from
    the message and restores the keyword fields from the instance's __dict__, as Python does for any exception."""

    status = 500
    kind = "internal"

    def __init__(self, message: str, *, kind: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.message, self.headers, self.extra = message, headers, extra
        if kind is not None:
            self.kind = kind

    def body(self) -> dict:
        return {"type": self.kind, "message": self.message, **self.extra}

    def response(self) -> JSONResponse:
        return error(self.status, self.kind, self.message, self.headers, **self.extra)


class InvalidRequest(FlashtileError):
    status, kind = 422, "invalid_request"


class LimitExceeded(FlashtileError):
    status, kind = 422, "limit_exceeded"


class TooLarge(FlashtileError):
    status, kind = 413, "body_too_large"


class PolicyViolation(FlashtileError):
    status, kind = 400, "content_policy_violation"


class NotFound(FlashtileError):
    status, kind = 404, "not_found"


class Conflict(FlashtileError):
    status, kind = 409, "idempotency_conflict"


class Timeout(FlashtileError):
    status, kind = 408, "timeout"


class Overloaded(FlashtileError):
    status, kind = 503, "overloaded"

    def __init__(self, message: str = "all replicas are busy; retry later", *, retry_after: int = 5, **kw):
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, retry_after=retry_after, **kw)


class ReplicaLost(Overloaded):
    kind = "replica_lost"

    def __init__(self, message: str = "a replica serving this request was lost; retry with the same Idempotency-Key",
                 *, retry_after: int = 1, **kw):
        super().__init__(message, retry_after=retry_after, **kw)


class Internal(FlashtileError):
    status, kind = 500, "internal"


def error(status: int, kind: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message, **extra}}, headers=headers)


def classify(err: BaseException, retry_after_s: int = 5) -> FlashtileError:
    """Any exception as the error a client sees. Ray's own overload and replica loss keep their meaning; anything
    else (a model or storage fault, a stage's bad state) is a 500 whose trace stays in the server log."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, OwnerDiedError, RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(err, FlashtileError):
        return err
    if isinstance(err, BackPressureError):
        return Overloaded(retry_after=retry_after_s)
    if isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError, OwnerDiedError)):
        # A stage replica died under this request; Serve replaces it, and the same request can be sent again.
        log.warning("a stage replica was lost during a request: %s", type(err).__name__)
        return ReplicaLost()
    log.error("request failed", exc_info=err)
    return Internal("image generation failed")
