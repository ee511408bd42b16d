"""The ingress's guard: who may call (API keys) and how large a body may be, checked on the raw ASGI request by
`GuardMiddleware` before FastAPI parses anything, with the settings of the app it guards."""

from dataclasses import dataclass

from fastapi.responses import JSONResponse

from deployments.errors import Overloaded, TooLarge, error
from deployments.security import ApiKeys, Denied, Limits, PromptPolicy, authorize


@dataclass
class Guard:
    """This replica's security settings (AppArgs: api_keys, limits, prompt_blocklist, ...)."""

    keys: ApiKeys
    limits: Limits
    policy: PromptPolicy
    max_in_flight: int
    request_timeout_s: float
    retry_after_s: int

    @classmethod
    def from_args(cls, args: dict) -> "Guard":
        """From AppArgs' security fields (validated there, defaults included)."""
        return cls(ApiKeys(args["api_keys"]), Limits.model_validate(args["limits"]), PromptPolicy(args["prompt_blocklist"]),
                   args["max_in_flight"], args["request_timeout_s"], args["retry_after_s"])

    def busy(self, message: str = "all replicas are busy; retry later") -> Overloaded:
        return Overloaded(message, retry_after=self.retry_after_s)


class GuardMiddleware:
    """Authorisation and body size, checked on the raw ASGI request before FastAPI parses anything."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # 1. Who is calling: a key, or loopback when no key is configured. Open routes pass.
        guard = self.guard
        who = authorize(guard.keys, scope["path"], headers.get("authorization"), (scope.get("client") or (None,))[0])
        if isinstance(who, Denied):
            extra = {"WWW-Authenticate": "Bearer"} if who.status == 401 else None
            return await error(who.status, who.kind, who.message, extra)(scope, receive, send)
        scope.setdefault("state", {})["principal"] = who
        # 2. How big the body is: the declared length first, then what really arrives (chunked bodies too).
        limit = guard.limits.body_limit(scope["path"])
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > limit:
            return await body_too_large(limit)(scope, receive, send)
        seen, too_large = 0, False

        async def counted():
            # Past the limit the app sees the client leave, and gets nothing more of the body.
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                too_large = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await body_too_large(limit)(scope, receive, send)


def body_too_large(limit: int) -> JSONResponse:
    return TooLarge(f"request body exceeds the limit max_body_bytes = {limit} bytes (max_image_bytes for "
                    "/v1/watermark/detect)", limit=limit).response()
