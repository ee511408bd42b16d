"""Figure 11, tiles per call: one 4K image with the upscaler and refiner taking 1, 4 or 13 tiles per call.

More tiles per call means fewer calls (less per-call overhead, fewer reads of the pass's source image) but coarser
spreading over the replicas (cluster.yaml keeps two of each). Three Serve applications side by side, interleaved
request by request, cluster.yaml otherwise.
"""

from bench.cluster import Cluster, app_config, generate
from bench.common import PROMPT, Figure, column, interleaved, med, p95

PER_CALL = [1, 4, 13]


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("tilecalls", "Figure 11: tiles per call to the upscaler and refiner, one 4K image",
                 "one 4K fast request at a time (prompt, seed 7), two upscaler and two refiner replicas of one torch "
                 "thread, the same cores", quick)
    runs = 2 if quick else 3
    body = {"prompt": PROMPT, "size": "4k", "mode": "fast", "seed": 7}
    with Cluster() as cluster:
        cluster.deploy(*[app_config(f"calls{k}", f"/calls{k}", args={"upscale_tiles_per_call": k,
                                                                    "refine_tiles_per_call": min(k, 4)})
                         for k in PER_CALL])
        s = interleaved({k: (lambda k=k: generate(cluster.url(f"calls{k}"), body)) for k in PER_CALL}, runs)
    fig.samples = {str(k): v for k, v in s.items()}
    for k in PER_CALL:
        fig.table.append({"upscale tiles per call": k, "refine tiles per call": min(k, 4), "runs": runs,
                          "4K s (median)": med(s[k], "wall_s"), "p95": p95(column(s[k], "wall_s")),
                          "upscale s": med(s[k], "upscale"), "refine s": med(s[k], "refine"),
                          "vs 1 per call": med(s[k], "wall_s") / med(s[1], "wall_s")})
    best = min(fig.table, key=lambda r: r["4K s (median)"])
    fig.findings.append(f"fastest: {best['upscale tiles per call']} upscale tile(s) per call, "
                        f"{best['vs 1 per call']:.2f}x the time of one per call; "
                        + ", ".join(f"{r['upscale tiles per call']}: {r['4K s (median)']:.2f} s" for r in fig.table))
    return [fig]
