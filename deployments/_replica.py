"""Small helpers shared by the stage deployments."""

import asyncio
import functools
import inspect

import ray
import torch
from ray import serve

from deployments import metrics
from deployments.errors import ReplicaLost
from deployments.regions import node_region
from deployments.storage import StorageError, open_model
from stages.driver import Part
from stages.models import ModelDir


def replica_id() -> str:
    """This replica's unique id (recorded in results, so tests and users see who did the work)."""
    return serve.get_replica_context().replica_id.unique_id


def load_model(location: str | None, torch_threads: int) -> ModelDir:
    """Set this replica's torch threads, then resolve its model: a local directory, an s3:// prefix (synced
    into the node's cache first) or, when None, the embedded default.

    Replicas share a node's cores: each holding torch's default (all cores) oversubscribes them.
    """
    torch.set_num_threads(torch_threads)
    m = metrics.get()
    try:
        return open_model(location, on_bytes=lambda n: m.storage_bytes.inc(n, tags={"direction": "in"}))
    except StorageError:
        m.storage_errors.inc(tags={"op": "model_sync"})
        raise


class TileQueue:
    """Runs a replica's tile work one call at a time, off the event loop.

    A call cancelled while it waits its turn (its request timed out or its client left) is dropped without
    running, and its tiles counted; one already running finishes its tiles.
    """

    def __init__(self, stage: str):
        self._stage = stage
        self._turn = asyncio.Semaphore(1)

    async def run(self, fn, *args, tiles: int = 1):
        try:
            await self._turn.acquire()
        except asyncio.CancelledError:
            metrics.get().cancellations.inc(tiles, tags={"stage": self._stage, "reason": "dropped"})
            raise
        work = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        work.add_done_callback(lambda _: self._turn.release())  # the turn ends when the thread does
        return await asyncio.shield(work)


def stored(pixels, **meta) -> Part:
    """Pixels into the object store, by reference: the next stage's replica reads them from there, and the replica
    that runs the driver (the ingress) only ever holds the reference and `meta` (with the region that made them)."""
    return Part(ray.put(pixels), {"region": region(), **meta})


@functools.cache
def region() -> str | None:
    """This replica's region (a replica never moves)."""
    return node_region()


def served(stage: str, origin: str | None) -> None:
    """Count a call served here for a request of region `origin` (None: regions off, nothing to count)."""
    if origin is None:
        return
    here, m = region() or "none", metrics.get()
    m.region_requests.inc(tags={"stage": stage, "origin": origin, "served": here})
    if here != origin:
        m.region_spills.inc(tags={"stage": stage, "origin": origin, "served": here})


def routed(stage: str):
    """A stage method that takes its request's region as the keyword `region`: Serve's router (deployments/regions.py)
    reads it to pick a replica; the replica counts where the call was served, then runs the method without it."""

    def wrap(method):
        if inspect.isgeneratorfunction(method):
            @functools.wraps(method)
            def stream(self, *args, region: str | None = None, **kwargs):
                served(stage, region)
                yield from method(self, *args, **kwargs)
            return stream

        @functools.wraps(method)
        async def call(self, *args, region: str | None = None, **kwargs):
            served(stage, region)
            return await method(self, *args, **kwargs)
        return call

    return wrap


# Reading another replica's output takes well under a second on one node and a few across nodes; one still waiting
# after this long will not arrive: its owner's node is gone (a lost region) and Ray has not said so yet, or Ray lost
# the object. The request then fails at once with the retryable 503 rather than hang until its deadline.
FETCH_TIMEOUT_S = 30.0


async def fetch(part: Part):
    """The pixels a Part refers to; ReplicaLost (503, retry) when they cannot be read within FETCH_TIMEOUT_S."""
    if not isinstance(part.pixels, ray.ObjectRef):
        return part.pixels
    try:
        return await asyncio.wait_for(asyncio.wrap_future(part.pixels.future()), FETCH_TIMEOUT_S)
    except TimeoutError:
        metrics.get().fetch_timeouts.inc()
        raise ReplicaLost(f"an intermediate image could not be read within {FETCH_TIMEOUT_S:g} s (the replica that "
                          "made it, or its node, was lost); retry with the same Idempotency-Key") from None


class OwnsOutputs:
    """A stage replica whose outputs other replicas read from the object store.

    An object lives as long as the process that put it, so a replica that left while a request still needed its
    output would fail that request (OwnerDiedError). Serve calls `__del__` when it removes a replica (scale-down,
    redeploy), after the replica's own requests finished: it then waits until nothing it put is referenced any more,
    within the deployment's graceful_shutdown_timeout_s (cluster.yaml), after which Serve stops it anyway.
    """

    async def __del__(self):
        worker = ray._private.worker.global_worker.core_worker  # what `ray memory` reads: this process's references
        while worker.get_all_reference_counts():
            await asyncio.sleep(0.1)
