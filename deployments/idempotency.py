"""Stored outputs and Idempotency-Key records: a known key answers from storage, with no model work."""

import asyncio
import hashlib
import json

from deployments import metrics
from deployments.errors import Conflict
from deployments.schemas import GenerateRequest, GenerateResult
from deployments.storage import OutputStore, StorageError


def body_hash(request: GenerateRequest) -> str:
    """Identity of a request body for Idempotency-Key checks (field order and defaults do not matter)."""
    return hashlib.sha256(request.model_dump_json(exclude={"timeout_s"}).encode()).hexdigest()


class Outputs:
    """The output store with its metrics, and URLs for what it holds."""

    def __init__(self, store: OutputStore, url_ttl_s: int):
        self.store, self.url_ttl_s = store, url_ttl_s

    async def put(self, key: str, data: bytes, content_type: str) -> bool:
        try:
            created = await asyncio.to_thread(self.store.put, key, data, content_type)
        except StorageError:
            metrics.get().storage_errors.inc(tags={"op": "put"})
            raise
        if created:
            metrics.get().storage_bytes.inc(len(data), tags={"direction": "out"})
        return created

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self.store.get, key)

    def url(self, key: str, base_url: str = "") -> str:
        """A presigned URL (S3), or the ingress's own /v1/outputs/ URL under `base_url` (local storage)."""
        return self.store.url(key, self.url_ttl_s, base_url)


class Idempotency:
    def __init__(self, outputs: Outputs):
        self.outputs = outputs

    async def lookup(self, key: str, request: GenerateRequest, base_url: str = "") -> GenerateResult | None:
        """The stored result for this key, None for a new key; Conflict (409) for a key used with another body."""
        record = await self.outputs.get(self._record_key(key))
        metrics.get().cache.inc(tags={"cache": "idempotency", "result": "hit" if record else "miss"})
        if record is None:
            return None
        stored = json.loads(record)
        if stored["body_sha256"] != body_hash(request):
            raise Conflict("this Idempotency-Key was used with a different request body")
        result = GenerateResult.model_validate(stored["result"])
        if stored.get("output_key"):  # presigned URLs expire: sign the stored image afresh
            result.url = self.outputs.url(stored["output_key"], base_url)
        return result

    async def remember(self, key: str, request: GenerateRequest, result: GenerateResult, output_key: str | None,
                       base_url: str) -> GenerateResult:
        """Store the result under the key, create-only; if another request stored one first, theirs wins."""
        record = {"body_sha256": body_hash(request), "result": result.model_dump(exclude={"url"}), "output_key": output_key}
        if await self.outputs.put(self._record_key(key), json.dumps(record).encode(), "application/json"):
            return result
        return await self.lookup(key, request, base_url)

    @staticmethod
    def _record_key(key: str) -> str:
        return f"idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"
