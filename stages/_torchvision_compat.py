"""Make PyPI's torchvision importable beside the CPU build of torch.

spandrel (the upscaler loader) imports torchvision, and transformers imports it
whenever it is installed. The torchvision wheel on PyPI is built against the
CUDA build of torch: on the CPU wheel (`torch==2.13.0+cpu`) its C extension
fails to load, which torchvision tolerates, but one unguarded registration
(`register_fake("torchvision::nms")`) then raises and the whole import fails.

Declaring the schemas of the two ops it registers unguarded lets the import go
through; the ops stay without kernels, and Flashtile never calls them (only
spandrel's pure-Python transforms are used). Nothing happens when torchvision
imports cleanly (a matching build) or is absent.
"""

import importlib.util
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: a torch.library.Library drops its definitions when collected


def ensure_torchvision_importable() -> None:
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            _library.define(schema)
        import torchvision  # noqa: F401,F811


ensure_torchvision_importable()  # on import: modules that use transformers, diffusers or spandrel import this first
