"""Small helpers shared by the stage deployments."""

import torch
from ray import serve

from deployments import metrics
from deployments.storage import StorageError, open_model
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
