"""Server-sent events of a streamed request: `progress` events, then `result` or `error` ({type, message, ...})."""

import asyncio
import json
from collections.abc import AsyncIterator

from deployments import metrics
from deployments.admission import Slot
from deployments.errors import Timeout, classify
from deployments.schemas import GenerateRequest


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def events(service, request: GenerateRequest, slot: Slot, base_url: str,
                 region: str | None = None) -> AsyncIterator[str]:
    """The request's events, within its deadline; every failure ends the stream with one `error` event (the same
    types as the JSON routes' errors). The slot is released when the stream ends, however it ends."""
    deadline = service.admission.deadline(request)
    try:
        async with asyncio.timeout(deadline):
            async for item in service.run(request, stream=True, base_url=base_url, region=region):
                kind = item.pop("event")
                if kind == "result":
                    item = item["result"].model_dump()
                yield event(kind, item)
    except TimeoutError:
        metrics.get().cancellations.inc(tags={"stage": "request", "reason": "timeout"})
        yield event("error", Timeout(f"the request ran longer than {deadline:g} s and was cancelled").body())
    except asyncio.CancelledError:
        metrics.get().cancellations.inc(tags={"stage": "request", "reason": "disconnect"})
        raise
    except Exception as err:
        yield event("error", classify(err, service.guard.retry_after_s).body())
    finally:
        slot.release()
