"""Cost and robustness of the watermark per output size: a table (stdout) and a CSV in bench/results/.

Embedding runs on every image the service returns, so its time adds to every request's latency. Images are
synthetic (gradients, shapes, noise); nothing here passes or fails.

    python -m bench.watermark [--repeat 3]
"""

import argparse
import csv
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages import watermark
from stages.sizes import base_size, output_size

RESULTS = Path(__file__).parent / "results"


def synthetic(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured test picture: a two-colour gradient, a few discs, mild noise. [H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = a * (1 - x[..., None]) + b * y[..., None]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(width, height)
        image[(np.mgrid[0:height, 0:width][1] - cx) ** 2 + (np.mgrid[0:height, 0:width][0] - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def transformed(marked: np.ndarray) -> dict[str, np.ndarray]:
    img = Image.fromarray(marked)
    half = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)

    def jpeg(im: Image.Image) -> np.ndarray:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return np.asarray(Image.open(buf).convert("RGB"))

    return {"png": marked, "jpeg90": jpeg(img), "half": np.asarray(half), "jpeg90+half": jpeg(half)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = {f"preview {a}": base_size(a, 256) for a in ("1:1", "16:9")}
    sizes |= {f"{t} {a}": output_size(t, a, 0) for t in ("1k", "2k", "4k") for a in ("1:1", "16:9")}
    watermark.embed_rgb(synthetic(256, 256), "0" * 12)  # warm-up: first-call costs are not the mark's
    rows = []
    for name, (w, h) in sizes.items():
        image = synthetic(w, h)
        request_id = watermark.new_request_id()
        embed_s, detect_s = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            marked = watermark.embed_rgb(image, request_id)
            embed_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            watermark.detect_rgb(marked)
            detect_s.append(time.perf_counter() - t0)
        psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - image) ** 2))
        found = {k: watermark.detect_rgb(v).request_id == request_id for k, v in transformed(marked).items()}
        rows.append({"size": name, "pixels": f"{w}x{h}", "embed_ms": round(1000 * statistics.median(embed_s), 1),
                     "detect_ms": round(1000 * statistics.median(detect_s), 1), "psnr_db": round(psnr, 1),
                     **{f"found_{k}": v for k, v in found.items()}})
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "watermark.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
