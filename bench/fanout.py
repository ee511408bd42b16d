"""Figure 5, tile fan-out: one 4K image's latency with 1, 2 and 4 upscaler and refiner replicas.

Three Serve applications side by side (one idle while another is measured), interleaved request by request;
each holds k upscaler and k refiner replicas of one torch thread (a fixed count, no autoscaling), the rest as
cluster.yaml.
"""

from bench.cluster import Cluster, app_config, generate
from bench.common import PROMPT, Figure, column, interleaved, med, p95

REPLICAS = [1, 2, 4]


def _app(k: int) -> dict:
    tiles = {"num_replicas": k}
    return app_config(f"tiles{k}", f"/tiles{k}", deployments={"upscaler": tiles, "refiner": tiles})


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("fanout", "Figure 5: tile fan-out, one 4K image with 1, 2 and 4 upscaler and refiner replicas",
                 "one 4K fast request at a time (prompt, seed 7), one torch thread per replica, the same cores", quick)
    runs = 2 if quick else 3
    body = {"prompt": PROMPT, "size": "4k", "mode": "fast", "seed": 7}
    with Cluster() as cluster:
        cluster.deploy(*[_app(k) for k in REPLICAS])
        s = interleaved({k: (lambda k=k: generate(cluster.url(f"tiles{k}"), body)) for k in REPLICAS}, runs)
    fig.samples = {str(k): v for k, v in s.items()}
    one = med(s[1], "wall_s")
    for k in REPLICAS:
        wall = med(s[k], "wall_s")
        fig.table.append({"replicas": k, "runs": runs, "4K s (median)": wall, "p95": p95(column(s[k], "wall_s")),
                          "upscale s": med(s[k], "upscale"), "refine s": med(s[k], "refine"),
                          "speedup": one / wall, "efficiency": one / wall / k})
    best = max(fig.table, key=lambda r: r["speedup"])
    fig.findings.append(f"the fastest is {best['replicas']} replicas per tile stage, {best['speedup']:.2f}x one replica "
                        f"(efficiency {best['efficiency']:.0%}); "
                        + ", ".join(f"{r['replicas']}: {r['efficiency']:.0%}" for r in fig.table) + " efficiency")
    return [fig]
