"""Figure 1, serving overhead: one request at a time through the cluster over HTTP, against the same stages in one
warm process, per tier and mode, and where the difference goes.

The cluster's side comes from its `Server-Timing` header: the ingress's wall and CPU time, and the time of each
stage as the ingress saw it (the replicas' own compute for upscale and refine tiles). The split:
  proxy + HTTP       = client wall - ingress wall
  ingress, other     = ingress wall - its stage timings (admission, info, base64 of nothing: PNG answers)
  <stage>            = the stage as the ingress saw it - the same stage in process
  watermark + PNG    = the ingress's encode - the in-process encode
Each part is a difference of medians taken separately, so the parts need not add up exactly to the difference of
the walls, and a part near zero can come out slightly negative.
"Pixels moved" counts the float32 image data the cluster puts into the object store for one image (see
pixels_moved_mb), from the tile geometry. (Before the pipeline rework it counted what crossed between the ingress
and the tile replicas: each tile there and back.)
"""

from bench.cluster import Cluster, app_config, generate
from bench.common import PROMPT, Figure, interleaved, med, p95, column, ratio
from bench.local import Local
from stages import tiling
from stages.sizes import REFINE_BUDGET
from stages.upscale import plan

FULL = [("preview", "fast"), ("1k", "fast"), ("1k", "quality"), ("2k", "fast"), ("2k", "quality"), ("4k", "fast"),
        ("4k", "quality")]
QUICK = [("preview", "fast"), ("1k", "fast"), ("4k", "fast")]
PARTS = ["proxy + HTTP", "ingress, other", "encode + base", "upscale", "refine", "watermark + PNG"]


def split(c: list[dict], l: list[dict]) -> dict[str, float]:
    """Median seconds the cluster spends over the in-process run, by part (see the module's docstring)."""
    stage_keys = ["encode+base", "upscale", "refine", "watermark+encode"]
    return {
        "proxy + HTTP": med(c, "wall_s") - med(c, "ingress"),
        "ingress, other": med(c, "ingress") - sum(med(c, k) for k in stage_keys if column(c, k)),
        "encode + base": med(c, "encode+base") - med(l, "encode+base"),
        "upscale": (med(c, "upscale") - med(l, "upscale")) if column(l, "upscale") else 0.0,
        "refine": (med(c, "refine") - med(l, "refine")) if column(l, "refine") else 0.0,
        "watermark + PNG": med(c, "watermark+encode") - med(l, "watermark+encode"),
    }


def pixels_moved_mb(local: Local, tier: str, aspect: str = "1:1") -> float:
    """Megabytes of float32 pixels the cluster puts into Ray's object store for one image, each a copy a single
    process does not make: the base image, every pass's upscaled tiles and merged (or resized) image, the refine
    crops and their results. Replicas read them in place (zero-copy), so reads add nothing."""
    f = local.flashtile
    params = f.params(PROMPT, size=tier, aspect_ratio=aspect, mode="fast", seed=0)
    (w, h), px = f.base_size(params), 3 * 4
    moved = w * h * px
    if tier != "preview":
        s = f.upscaler.scale
        for p in plan(s, (w, h), f.output_size(params)):
            if p.kind == "model":
                boxes = tiling.boxes(p.size[0] // s, p.size[1] // s, f.upscaler.tile_size, f.upscaler.overlap)
                moved += sum(bw * bh * s * s for _, _, bw, bh in boxes) * px
            moved += p.size[0] * p.size[1] * px
        moved += REFINE_BUDGET[tier] * f.refiner.tile_size ** 2 * px * 2
    return moved / 1e6


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("overhead", "Figure 1: serving overhead, the cluster over HTTP against one warm process",
                 "request and seed (7), embedded default, one request at a time; the cluster as cluster.yaml "
                 "(one torch thread per replica) on the same cores as the in-process run (all cores, one process); "
                 "both watermark and PNG-encode; the client fetches the PNG itself (Accept: image/png)", quick)
    runs = 2 if quick else 3
    local = Local()
    with Cluster() as cluster:
        cluster.deploy(app_config("flashtile", "/"))
        url = cluster.url("flashtile")
        for tier, mode in QUICK if quick else FULL:
            body = {"prompt": PROMPT, "size": tier, "mode": mode, "seed": 7}
            s = interleaved({"cluster": lambda: generate(url, body), "in-process": lambda: local.run(body)}, runs)
            fig.samples[f"{tier}/{mode}"] = s
            c, l = s["cluster"], s["in-process"]
            parts = split(c, l)
            fig.table.append({
                "tier": tier, "mode": mode, "runs": runs,
                "cluster s (median)": med(c, "wall_s"), "cluster p95": p95(column(c, "wall_s")),
                "in-process s (median)": med(l, "wall_s"), "in-process p95": p95(column(l, "wall_s")),
                "ratio": ratio(med(c, "wall_s"), med(l, "wall_s")),
                **{f"+{k}": v for k, v in parts.items()},
                "upscale compute (replicas, sum)": med(c, "upscale_compute") if column(c, "upscale_compute") else None,
                "refine compute (replicas, sum)": med(c, "refine_compute") if column(c, "refine_compute") else None,
                "ingress CPU s": med(c, "ingress-cpu"),
                "pixels moved MB": pixels_moved_mb(local, tier),
            })
    fig.findings += findings(fig.table)
    return [fig]


def findings(table: list[dict]) -> list[str]:
    out = []
    for row in table:
        if row["tier"] not in ("1k", "4k") or row["mode"] != "fast":
            continue
        overhead = row["cluster s (median)"] - row["in-process s (median)"]
        parts = {k: row[f"+{k}"] for k in PARTS}
        worst = max(parts, key=parts.get)
        wall = row["cluster s (median)"]
        out.append(
            f"{row['tier']} {row['mode']}: the cluster takes {row['ratio']:.2f}x the in-process time "
            f"(+{overhead:.2f} s on {wall:.2f} s). The largest extra wall time is {worst}: +{parts[worst]:.2f} s, "
            f"{parts[worst] / wall:.0%} of the cluster's time. The ingress replica burns {row['ingress CPU s']:.2f} s "
            f"of CPU per request ({row['ingress CPU s'] / wall:.0%} of the wall time); "
            f"{row['pixels moved MB']:.0f} MB of pixels go into the object store.")
    return out
