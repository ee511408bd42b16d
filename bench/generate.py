"""Wall time of `flashtile generate` per tier on this machine: a table (stdout) and a CSV in bench/results/.

Each run is a fresh process, as a user would run it: model load included. Not a test: nothing here passes
or fails on time.

    python -m bench.generate [--repeat 3] [--mode quality] [--aspect 16:9]
"""

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.sizes import TIERS

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", default="quality", choices=["fast", "quality"])
    parser.add_argument("--aspect", default="16:9")
    args = parser.parse_args()

    subprocess.run([sys.executable, "-m", "deployments.cli", "build-default"], check=True, capture_output=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tier in TIERS:
            mode = "fast" if tier == "preview" else args.mode
            walls, stage_line = [], ""
            for i in range(args.repeat):
                cmd = [sys.executable, "-m", "deployments.cli", "generate", "a lighthouse at dusk", "-q",
                       "--size", tier, "--aspect", args.aspect, "--mode", mode, "--seed", str(i), "-o", f"{tmp}/{tier}.png"]
                t0 = time.perf_counter()
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                walls.append(time.perf_counter() - t0)
                stage_line = " ".join(re.findall(r"(?:load|encode|base|upscale|refine)=[0-9.]+s", out))
            rows.append({"tier": tier, "mode": mode, "aspect": args.aspect, "runs": args.repeat,
                         "median_s": round(statistics.median(walls), 2), "min_s": round(min(walls), 2),
                         "max_s": round(max(walls), 2), "last_run_stages": stage_line})

    print(f"flashtile generate, embedded default, {platform.machine()} {os.cpu_count()} cores, torch threads default")
    print("| tier | mode | median wall s | min | max | stages (last run) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tier']} | {r['mode']} | {r['median_s']} | {r['min_s']} | {r['max_s']} | {r['last_run_stages']} |")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "generate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
