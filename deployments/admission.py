"""Admission: what a request must pass before and while it runs. Limits (422) and policy (400) before any model
work, capacity (503 at once, never an unbounded queue) and the deadline (408, the work cancelled)."""

import asyncio

from deployments import metrics
from deployments.errors import LimitExceeded, PolicyViolation, Timeout
from deployments.guard import Guard
from deployments.schemas import GenerateRequest


class Slot:
    """Capacity held by one request (see Admission.admit); given back once, however often released."""

    def __init__(self, admission: "Admission", images: int):
        self._admission, self._images = admission, images
        admission.active += images

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        self._admission.active -= self._images
        self._images = 0


class Admission:
    def __init__(self, guard: Guard):
        self.guard = guard
        self.active = 0  # images in progress here (one event loop: no lock needed)

    def screen(self, request: GenerateRequest, base_resolution: int, images: int = 1) -> None:
        """Refuse what this server will not run: limits (422), then policy (400)."""
        exceeded = self.guard.limits.check(request, images, base_resolution)
        if exceeded is not None:
            raise LimitExceeded(exceeded.message, limit=exceeded.limit, allowed=exceeded.allowed)
        if self.guard.policy.blocks(request.prompt):
            metrics.get().blocked.inc()
            raise PolicyViolation("the prompt was rejected by this server's content policy")

    def admit(self, images: int) -> Slot:
        """Hold `images` of the capacity, or refuse at once: 503 with Retry-After."""
        if self.active + images > self.guard.max_in_flight:
            raise self.guard.busy(f"server at capacity ({self.guard.max_in_flight} images in progress); retry later")
        return Slot(self, images)

    def deadline(self, request: GenerateRequest) -> float:
        return min(request.timeout_s or self.guard.request_timeout_s, self.guard.request_timeout_s)

    async def bounded(self, request: GenerateRequest, work):
        """Await `work` within the request's deadline: 408 when it runs out (the work is cancelled)."""
        deadline = self.deadline(request)
        try:
            async with asyncio.timeout(deadline):
                return await work
        except TimeoutError:
            metrics.get().cancellations.inc(tags={"stage": "request", "reason": "timeout"})
            raise Timeout(f"the request ran longer than its timeout of {deadline:g} s and was cancelled; nothing was "
                          "stored", timeout_s=deadline) from None
        except asyncio.CancelledError:  # the client went away (Serve cancels the request)
            metrics.get().cancellations.inc(tags={"stage": "request", "reason": "disconnect"})
            raise
