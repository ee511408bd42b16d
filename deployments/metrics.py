"""Flashtile's Prometheus metrics, recorded in every replica through Ray's metrics API.

Each node's Ray metrics agent exports them with Serve's own metrics (`flashtile serve --metrics-port 8080`:
http://127.0.0.1:8080/metrics). Ray prefixes exported names with `ray_`; the Prometheus config in k8s/
renames `ray_flashtile_*` back to `flashtile_*`. Every label has a small fixed set of values.
"""

import functools
import threading
import time
from contextlib import contextmanager

from ray.serve import metrics

# Latency targets per tier (seconds, end to end on one GPU); histogram buckets have boundaries there.
TIER_TARGETS_S = {"preview": 1.0, "1k": 3.0, "2k": 6.0, "4k": 12.0}
LATENCY_BUCKETS_S = sorted(
    {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 2.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0}
    | set(TIER_TARGETS_S.values())
)
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]
ROUTES = ("/v1/generate", "/v1/generate/stream", "/v1/images/generations", "/v1/watermark/detect", "/v1/models",
          "/v1/regions", "/healthz")


class _Metrics:
    def __init__(self):
        self.stage_latency = metrics.Histogram(
            "flashtile_stage_latency_seconds", "Seconds per unit of stage work (encode batch, base batch, tile).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("stage",),
        )
        self.request_latency = metrics.Histogram(
            "flashtile_request_latency_seconds", "Seconds per HTTP request, end to end at the ingress.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("route",),
        )
        self.requests = metrics.Counter(
            "flashtile_requests_total", "HTTP requests by route and status code.", tag_keys=("route", "status")
        )
        # Ray adds deployment, replica and application tags to every Serve metric by itself.
        self.in_flight = metrics.Gauge("flashtile_requests_in_flight", "Requests inside this ingress replica.")
        self.images = metrics.Counter("flashtile_images_total", "Images returned, by tier and mode.", tag_keys=("size", "mode"))
        self.steps = metrics.Counter(
            "flashtile_denoising_steps_total", "Denoising steps run (per image or tile).", tag_keys=("stage",)
        )
        self.tiles = metrics.Counter("flashtile_tiles_total", "Tiles upscaled or refined.", tag_keys=("stage",))
        self.batch_size = metrics.Histogram(
            "flashtile_batch_size", "Requests per dynamic batch.", boundaries=BATCH_BUCKETS, tag_keys=("stage",)
        )
        self.storage_bytes = metrics.Counter(
            "flashtile_storage_bytes_total", "Bytes moved to or from object storage (in: model syncs; out: outputs).", tag_keys=("direction",)
        )
        self.storage_errors = metrics.Counter(
            "flashtile_storage_errors_total", "Failed storage operations (model_sync, put).", tag_keys=("op",)
        )
        self.cancellations = metrics.Counter(
            "flashtile_cancellations_total", "Work stopped early: requests (timeout, disconnect), base runs stopped "
            "mid-denoising (cancelled), queued tiles dropped (dropped).", tag_keys=("stage", "reason"),
        )
        self.heartbeat = metrics.Gauge("flashtile_replica_heartbeat_seconds",
                                       "Unix time of the replica's last heartbeat (set each second).")
        self.blocked = metrics.Counter("flashtile_prompts_blocked_total", "Prompts refused by the content policy.")
        self.region_requests = metrics.Counter(
            "flashtile_region_requests_total", "Stage calls by the region of their request (origin) and the region "
            "of the replica that served them.", tag_keys=("stage", "origin", "served"),
        )
        self.region_spills = metrics.Counter(
            "flashtile_region_spills_total", "Stage calls served outside their request's region (its replicas were "
            "saturated or gone).", tag_keys=("stage", "origin", "served"),
        )
        self.fetch_timeouts = metrics.Counter(
            "flashtile_fetch_timeouts_total", "Reads of another replica's output that never arrived (the request got "
            "503 replica_lost at once instead of hanging to its deadline).",
        )
        self.cache = metrics.Counter(
            "flashtile_cache_total", "Cache lookups by cache and result.", tag_keys=("cache", "result")
        )


@functools.cache
def get() -> _Metrics:
    """This process's metric objects (created in the replica that records them), and its heartbeat."""
    m = _Metrics()
    threading.Thread(target=_tick, args=(m,), name="flashtile-heartbeat", daemon=True).start()
    return m


def _tick(m: _Metrics) -> None:
    # The replica's clock, set each second: an export shows when it was made, so a reader (a test, an alert on a
    # stuck or vanished replica: time() - heartbeat) tells a fresh export from a stale one.
    while True:
        m.heartbeat.set(time.time())
        time.sleep(1.0)


@contextmanager
def timed(stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        get().stage_latency.observe(time.perf_counter() - start, tags={"stage": stage})


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"
