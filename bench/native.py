"""Figure 4, 4K by upscaling against native denoising: Flashtile's path to a tier (compose at the base resolution,
AI-upscale, refine) against denoising at the output size directly with the same UNet, steps and sampler.

Each run is its own process (`python -m bench.native --child VARIANT TIER`): its peak memory is the process's
peak resident set during the generation (Linux's VmHWM, reset after the model is loaded), the model included;
the process's resident set once loaded is reported beside it.
A run that passes its time limit is stopped and reported as such; one that runs out of memory likewise.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PROMPT, Figure, ratio, summary

TIERS = ["1k", "2k", "4k"]
LIMIT_S = {"full": 120, "quick": 60}  # per native run
MODE = "fast"  # the fewest steps: native denoising at 4K is the expensive side


def child(variant: str, tier: str) -> dict:
    import torch

    from stages import sizes
    from stages.pipeline import Flashtile

    flashtile = Flashtile.from_pretrained(None)
    loaded_mb = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from here, after loading
    params = flashtile.params(PROMPT, size=tier, mode=MODE, seed=7)
    width, height = sizes.output_size(tier, "1:1", flashtile.generator.base_resolution)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if variant == "flashtile":
            flashtile(params)
        else:
            embeds = flashtile.encoder(params.prompt, params.negative_prompt)
            flashtile.generator(embeds, seed=params.seed, width=width, height=height, steps=params.steps,
                                guidance_scale=params.guidance_scale, scheduler=params.scheduler, mode=params.mode)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": _rss_mb("VmHWM"), "model_mb": loaded_mb, "width": width, "height": height}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(variant: str, tier: str, limit_s: float) -> dict:
    cmd = [sys.executable, "-m", "bench.native", "--child", variant, tier]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped after {limit_s:g} s"}
    if proc.returncode != 0:
        oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr
        return {"status": "out of memory" if oom else f"failed ({proc.returncode}): {proc.stderr.strip()[-200:]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("native", "Figure 4: 4K by upscaling against native denoising at the output size",
                 f"the embedded default's UNet, {MODE} mode (its steps and sampler), prompt and seed, 1:1, one process "
                 "per run on all cores", quick)
    limit = LIMIT_S["quick" if quick else "full"]
    for tier in TIERS:
        runs = 2 if tier == "1k" and not quick else 1  # native 2K takes the better part of a minute: once
        samples = {"flashtile": [], "native": []}
        for _ in range(runs):  # interleaved: flashtile, native, flashtile, native
            for variant in samples:
                if samples[variant] and samples[variant][-1]["status"] != "ok":
                    continue  # a native size that did not finish once is not tried again
                samples[variant].append(measure(variant, tier, limit))
        fig.samples[tier] = samples
        fig.table.append(_row(tier, samples))
        if samples["native"][-1]["status"] != "ok":
            fig.notes.append(f"native {tier}: {samples['native'][-1]['status']}; larger tiers not tried")
            break
    fig.findings += [f"{r['tier']}: native denoising takes {r['native / flashtile time']:.1f}x Flashtile's time and "
                     f"{r['native / flashtile peak memory']:.1f}x its peak memory" for r in fig.table
                     if isinstance(r["native / flashtile time"], float)]
    return [fig]


def _row(tier: str, samples: dict) -> dict:
    ok = {v: [s for s in ss if s["status"] == "ok"] for v, ss in samples.items()}
    row = {"tier": tier}
    for v in ("flashtile", "native"):
        if ok[v]:
            t = summary([s["seconds"] for s in ok[v]])
            row |= {f"{v} s (median)": t["median"], f"{v} runs": t["n"],
                    f"{v} peak MB": max(s["peak_mb"] for s in ok[v]), f"{v} model MB": ok[v][0]["model_mb"]}
        else:
            row |= {f"{v} s (median)": samples[v][-1]["status"], f"{v} runs": 0, f"{v} peak MB": None, f"{v} model MB": None}
    both = ok["flashtile"] and ok["native"]
    row["native / flashtile time"] = ratio(row["native s (median)"], row["flashtile s (median)"]) if both else None
    row["native / flashtile peak memory"] = (ratio(row["native peak MB"], row["flashtile peak MB"]) if both else None)
    return row


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(child(sys.argv[2], sys.argv[3])))
