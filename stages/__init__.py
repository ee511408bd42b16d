"""Flashtile's four stages as plain torch/diffusers code: no serving, storage or metrics here.

prompt encoder (encode.py) -> base generator (generate.py) -> upscaler (upscale.py) -> refiner (refine.py);
models.py loads model directories and builds the embedded default; pipeline.py runs all four in one process.
sizes.py (the tier table) imports nothing heavy, so request schemas can use it without torch.
"""

import os

# No code path may reach a model hub: every load is from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
