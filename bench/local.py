"""The reference every cluster figure is measured against: the same four stages in one warm process.

It runs what `flashtile generate` runs (stages/driver.py on stages/pipeline.Flashtile), watermark and encode
included, on all of the machine's cores (the cluster's replicas share the same cores).
"""

import os
import time

import torch

from deployments.schemas import GenerateRequest
from stages.pipeline import Flashtile


class Local:
    def __init__(self, threads: int | None = None, model: str | None = None):
        self.threads = threads or os.cpu_count()
        torch.set_num_threads(self.threads)
        self.flashtile = Flashtile.from_pretrained(model)

    def run(self, body: dict) -> dict:
        """One request's body (the native API's fields) -> wall time, per-stage seconds and the file's bytes."""
        params = self.flashtile.params(**GenerateRequest(**body).stage_fields())
        t0 = time.perf_counter()
        result = self.flashtile.render(params)
        return {"wall_s": time.perf_counter() - t0, "bytes": len(result.output), **result.timings}
