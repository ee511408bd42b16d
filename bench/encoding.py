"""Figure 7, output encoding: encode time and size per tier for the encoder and settings Flashtile uses, against
other settings, another PNG library, and JPEG and WebP at the qualities OpenAI's `output_compression` offers.

The images are the embedded default's own renders (fast mode, 1:1, seed 7), watermarked once; only the encode
is timed, interleaved encoder by encoder. The watermark embed, which runs before every encode whatever the
format, is timed beside them. Decoded sizes are the same for every PNG row (lossless).
"""

import io

from PIL import Image

from bench.common import PROMPT, Figure, column, interleaved, med, p95
from bench.local import Local
from stages import watermark
from stages.imagefile import PNG_OPTIONS, to_uint8


def _pil(fmt: str, **options):
    def encode(pixels) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **options)
        return buf.getvalue()
    return encode


def encoders() -> dict:
    out = {
        "png zlib 6 (Pillow's default; before)": _pil("PNG", compress_level=6),
        "png zlib 6 RLE (Flashtile now)": _pil("PNG", **PNG_OPTIONS),
        "png zlib 1": _pil("PNG", compress_level=1),
    }
    try:
        import imagecodecs

        out["png libspng (imagecodecs)"] = lambda pixels: imagecodecs.spng_encode(pixels)
    except ImportError:
        pass
    for q in (100, 90, 75, 50):
        out[f"jpeg q{q}"] = _pil("JPEG", quality=q)
    for q in (100, 90, 75, 50):
        out[f"webp q{q}"] = _pil("WEBP", quality=q)
    return out


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("encoding", "Figure 7: output encoding, time and size per encoder and setting",
                 "the same watermarked pixels per tier (the embedded default's render, fast, 1:1, seed 7), one thread, "
                 "encode only", quick)
    local = Local()
    runs = 3 if quick else 5
    before, now = "png zlib 6 (Pillow's default; before)", "png zlib 6 RLE (Flashtile now)"
    for tier in ["1k", "4k"] if quick else ["preview", "1k", "2k", "4k"]:
        params = local.flashtile.params(PROMPT, size=tier, mode="fast", seed=7)
        pixels = watermark.embed_rgb(to_uint8(local.flashtile(params).image), "0123456789ab")
        variants = {name: (lambda fn=fn: {"bytes": len(fn(pixels))}) for name, fn in encoders().items()}
        variants["watermark embed (every format)"] = lambda: watermark.embed_rgb(pixels, "0123456789ab") is None or {}
        s = interleaved(variants, runs)
        fig.samples[tier] = s
        for name, v in s.items():
            size = v[0].get("bytes")
            fig.table.append({"tier": tier, "encoder": name, "runs": runs, "encode s": med(v, "wall_s"),
                              "p95": p95(column(v, "wall_s")), "size KB": size / 1000 if size else None,
                              "time / before": med(v, "wall_s") / med(s[before], "wall_s"),
                              "size / before": size / s[before][0]["bytes"] if size else None})
        row = {r["encoder"]: r for r in fig.table if r["tier"] == tier}
        fig.findings.append(
            f"{tier}: Flashtile's PNG now encodes in {row[now]['encode s']:.3f} s against {row[before]['encode s']:.3f} s "
            f"before ({row[before]['encode s'] / row[now]['encode s']:.2f}x faster), at {row[now]['size / before']:.2f}x "
            f"the size; JPEG q90 takes {row['jpeg q90']['encode s']:.3f} s at {row['jpeg q90']['size / before']:.2f}x the size")
    return [fig]
