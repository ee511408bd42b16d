"""Figures 2 and 3, load: images/s, p50 and p99 latency against offered concurrency, for 1K and 4K.

Closed-loop clients (1, 2, 4, 8) share a fixed number of requests (seeds 0, 1, ...). The variants are Serve
applications deployed side by side on one Ray instance, each idle while another is measured, interleaved level
by level (cluster c=1, other c=1, cluster c=2, ...):
  cluster        cluster.yaml as it ships (generator batching on: up to 4 images a denoising batch)
  no batching    the same with generator_max_batch 1                                       (figure 2)
  monolith       the four stages, watermark and PNG in one deployment per request (bench/monolith.py): two
                 replicas of one torch thread and 0.5 CPU each, one request at a time each: the cluster's CPU
                 reservation (1.0 at its minimum replicas) and thread budget                  (figure 3)
Between levels the same stages run serially in one warm process on all cores: "in-process images/s", the
headline's denominator.
"""

from bench.cluster import Cluster, app_config, load
from bench.common import PROMPT, Figure, column, med, ratio
from bench.local import Local

MONOLITH = [{"name": "monolith", "num_replicas": 2, "max_ongoing_requests": 1, "max_queued_requests": 256,
             "ray_actor_options": {"num_cpus": 0.5}}]
APPS = {
    "cluster": lambda: app_config("cluster", "/"),
    "no batching": lambda: app_config("nobatch", "/nobatch", args={"generator_max_batch": 1}),
    "monolith": lambda: app_config("monolith", "/monolith", import_path="bench.monolith:build_app",
                                   deployment_list=MONOLITH),
}
APP_NAMES = {"cluster": "cluster", "no batching": "nobatch", "monolith": "monolith"}
# tier -> (clients, requests per level). 4K stops at 4 clients and skips "no batching" to keep `make bench` within
# about 25 minutes: a 4K image takes 10-50 s here, and the base stage that batching speeds up is under 5% of it.
FULL = {"1k": ([1, 2, 4, 8], 8), "4k": ([1, 4], 4)}
QUICK = {"1k": ([1, 4], 8), "4k": ([1, 4], 4)}
SKIP = {("4k", "no batching")}
MODE = "quality"  # the API's default for every tier but preview


def run(quick: bool, names=("load", "monolith")) -> list[Figure]:
    variants = ["cluster"] + (["no batching"] if "load" in names else []) + (["monolith"] if "monolith" in names else [])
    held = (f"prompt, {MODE} mode, seeds 0..n-1 per level, the embedded default, the same cores; clients on the same "
            "machine fetch PNGs over HTTP")
    load_fig = Figure("load", "Figure 2: load, the cluster with and without generator batching", held, quick)
    mono_fig = Figure("monolith", "Figure 3: the cluster against a monolith (one deployment per request)",
                      held + "; the monolith holds the cluster's CPU reservation and one torch thread per replica", quick)
    local = Local()
    plan = QUICK if quick else FULL
    with Cluster() as cluster:
        cluster.deploy(*[APPS[v]() for v in variants])
        for tier, (levels, n) in plan.items():
            body = {"prompt": PROMPT, "size": tier, "mode": MODE}
            measured = [v for v in variants if (tier, v) not in SKIP]
            serial = [local.run({**body, "seed": 100})]  # a warm-up of each path first
            for v in measured:
                load(cluster.url(APP_NAMES[v]), body, 1, 1)
            rows = []
            for clients in levels:
                for v in measured:
                    m = load(cluster.url(APP_NAMES[v]), body, clients, n)
                    rows.append({"tier": tier, "variant": v, "clients": clients, "requests": n, **m})
                serial.append(local.run({**body, "seed": clients}))
            in_process = 1 / sorted(s["wall_s"] for s in serial[1:])[len(serial[1:]) // 2]
            for fig, keep in ((load_fig, {"cluster", "no batching"}), (mono_fig, {"cluster", "monolith"})):
                fig.samples[tier] = {"load": [r for r in rows if r["variant"] in keep], "in_process": serial[1:]}
                fig.table += [_row(r, in_process) for r in rows if r["variant"] in keep]
    out = []
    for fig, other in ((load_fig, "no batching"), (mono_fig, "monolith")):
        if other not in variants:
            continue
        fig.findings += findings(fig.table, other)
        out.append(fig)
    return out


PARTS = {"encode+base": "encode + base", "upscale": "upscale", "refine": "refine", "watermark+encode": "watermark + encode"}


def largest_part(answers: list[dict]) -> tuple[str, float, float]:
    """The part of a request's latency that is largest in the median (the cluster's Server-Timing; the proxy and
    queueing before the ingress are what the ingress did not see): (name, seconds, share of the median latency)."""
    if not answers or "ingress" not in answers[0]:
        return "", float("nan"), float("nan")
    parts = {name: med(answers, key) for key, name in PARTS.items() if column(answers, key)}
    parts["proxy and queue"] = med(answers, "wall_s") - med(answers, "ingress")
    name = max(parts, key=parts.get)
    return name, parts[name], parts[name] / med(answers, "wall_s")


def _row(r: dict, in_process: float) -> dict:
    name, seconds, share = largest_part(r["answers"])
    return {"tier": r["tier"], "variant": r["variant"], "clients": r["clients"], "requests": r["requests"],
            "images/s": r["images_per_s"], "p50 s": r["p50_s"], "p99 s": r["p99_s"],
            "in-process images/s": in_process, "cluster / in-process": ratio(r["images_per_s"], in_process),
            "largest part of latency": name or None, "its s (median)": seconds, "its share": share}


def findings(table: list[dict], other: str) -> list[str]:
    out = []
    for tier in dict.fromkeys(r["tier"] for r in table):
        rows = [r for r in table if r["tier"] == tier]
        for variant in ("cluster", other):
            vr = [r for r in rows if r["variant"] == variant]
            if not vr:
                continue
            loaded, single = vr[-1], vr[0]
            out.append(
                f"{tier} {variant}: under load ({loaded['clients']} clients) {loaded['images/s']:.3f} images/s, "
                f"{loaded['cluster / in-process']:.2f}x one process's serial rate ({loaded['in-process images/s']:.3f}), "
                f"p99 {loaded['p99 s']:.1f} s; one client {single['images/s']:.3f} images/s "
                f"({single['cluster / in-process']:.2f}x)."
                + (f" Under load the largest part of a request's latency is {loaded['largest part of latency']}: "
                   f"{loaded['its s (median)']:.1f} s, {loaded['its share']:.0%} of the median."
                   if loaded["largest part of latency"] else ""))
    return out
