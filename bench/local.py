"""The reference every cluster figure is measured against: the same four stages in one warm process.

It runs what `flashtile generate` runs (stages/pipeline.py), then the same watermark and encode the cluster's
ingress runs, on all of the machine's cores (the cluster's replicas share the same cores).
"""

import os
import time

import torch

from deployments.schemas import GenerateRequest
from stages.pipeline import Flashtile
from stages.imagefile import encode_png


class Local:
    def __init__(self, threads: int | None = None, model: str | None = None):
        self.threads = threads or os.cpu_count()
        torch.set_num_threads(self.threads)
        self.flashtile = Flashtile.from_pretrained(model)

    def run(self, body: dict) -> dict:
        """One request's body (the native API's fields) -> wall time, per-stage seconds, PNG seconds and bytes."""
        params = self.flashtile.params(**GenerateRequest(**body).stage_fields())
        t0 = time.perf_counter()
        result = self.flashtile(params)
        t1 = time.perf_counter()
        png = encode_png(result.image, {"prompt": params.prompt, "seed": params.seed}, request_id="0123456789ab")
        t2 = time.perf_counter()
        return {"wall_s": t2 - t0, "stages_s": t1 - t0, "png_s": t2 - t1, "bytes": len(png), **result.timings}
