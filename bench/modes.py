"""Figure 6, fast against quality: end-to-end time per tier and the base stage alone, in one warm process, beside
what each mode buys: adherence on the held-aside captions and the SSIM between a seed's fast and quality renders,
from `flashtile eval` (weights/flashtile-default-v1/eval.json, 200 captions; `flashtile eval --json` rewrites it).
"""

import json

from bench.common import PROMPT, ROOT, Figure, column, interleaved, med, p95
from bench.local import Local

EVAL = ROOT / "weights" / "flashtile-default-v1" / "eval.json"


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("modes", "Figure 6: fast against quality mode",
                 "prompt and seed (7), each mode's own default steps and guidance, one warm process on all cores", quick)
    local = Local()
    runs = 2 if quick else 3
    for tier in ["1k", "4k"] if quick else ["1k", "2k", "4k"]:  # preview is fast mode only
        bodies = {m: {"prompt": PROMPT, "size": tier, "mode": m, "seed": 7} for m in ("fast", "quality")}
        s = interleaved({m: (lambda b=b: local.run(b)) for m, b in bodies.items()}, runs)
        fig.samples[tier] = s
        f, q = s["fast"], s["quality"]
        fig.table.append({"tier": tier, "runs": runs, "fast s": med(f, "wall_s"), "fast p95": p95(column(f, "wall_s")),
                          "quality s": med(q, "wall_s"), "quality p95": p95(column(q, "wall_s")),
                          "quality / fast": med(q, "wall_s") / med(f, "wall_s"),
                          "base fast s": med(f, "encode+base"), "base quality s": med(q, "encode+base"),
                          "base quality / fast": med(q, "encode+base") / med(f, "encode+base")})
    ev = json.loads(EVAL.read_text())["eval"]
    modes = ev["modes"]
    fig.samples["eval"] = {"n": ev["n"], "cpu": ev.get("cpu"), "modes": {m: modes[m].get("overall") for m in modes},
                           "ssim_fast_vs_quality": ev["ssim_fast_vs_quality"]}
    adherence = ", ".join(f"{m} {modes[m]['overall']:.1%}" for m in ("quality", "fast") if m in modes)
    fig.findings.append(
        f"adherence on {ev['n']} held-aside captions (flashtile eval): {adherence}; SSIM between a seed's fast and "
        f"quality base renders {ev['ssim_fast_vs_quality']:.3f}")
    for r in fig.table:
        fig.findings.append(f"{r['tier']}: quality takes {r['quality / fast']:.2f}x fast's time end to end, "
                            f"{r['base quality / fast']:.1f}x for the base stage alone")
    return [fig]
