"""One PNG plot per figure, into docs/benchmarks/ (matplotlib, no display)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench.common import PLOTS, Figure  # noqa: E402


def _save(fig: Figure, figure) -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    env = fig.env
    figure.text(0.01, 0.005, f"{env['date']} · {env['commit']} · {env['cpu']} ({env['cpu_simd']}), {env['cores']} cores"
                + (" · quick run" if fig.quick else ""), fontsize=7, color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(PLOTS / f"{fig.name}.png", dpi=110)
    plt.close(figure)


def overhead(fig: Figure) -> None:
    from bench.overhead import PARTS

    rows = fig.table
    labels = [f"{r['tier']}\n{r['mode']}" for r in rows]
    figure, ax = plt.subplots(figsize=(9, 4.5))
    base = [r["in-process s (median)"] for r in rows]
    ax.bar(labels, base, color="#999", label="in-process (stages + PNG)")
    bottom = list(base)
    for part in PARTS:
        values = [max(0.0, r[f"+{part}"]) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=f"cluster: + {part}")
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, r in enumerate(rows):
        ax.plot([x - 0.4, x + 0.4], [r["cluster s (median)"]] * 2, color="black", lw=1)
    ax.set_ylabel("seconds per image (median)")
    ax.set_title("Cluster over HTTP (black line) against one process: where the extra time goes")
    ax.legend(fontsize=7)
    _save(fig, figure)


def load(fig: Figure) -> None:
    figure, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for tier, rows in _by(fig.table, "tier").items():
        for variant, vrows in _by(rows, "variant").items():
            clients = [r["clients"] for r in vrows]
            ax1.plot(clients, [r["images/s"] for r in vrows], marker="o", label=f"{tier} {variant}")
            ax2.plot(clients, [r["p99 s"] for r in vrows], marker="o", label=f"{tier} {variant}")
        serial = rows[0].get("in-process images/s")
        if serial:
            ax1.axhline(serial, ls="--", lw=1, color="grey")
            ax1.text(1, serial, f" {tier} in-process serial", fontsize=7, va="bottom")
    ax1.set(xlabel="concurrent clients", ylabel="images / s", xscale="log", title="Throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p99 latency, s", xscale="log", yscale="log", title="p99 latency")
    clients = sorted({r["clients"] for r in fig.table})
    for ax in (ax1, ax2):  # plain numbers on the log axes
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.minorticks_off()
    lo, hi = ax2.get_ylim()
    ax2.set_yticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200) if lo <= t <= hi])
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.legend(fontsize=7)
    _save(fig, figure)


def bars(fig: Figure, label_keys: list[str], value_key: str, ylabel: str, title: str, log: bool = False) -> None:
    figure, ax = plt.subplots(figsize=(9, 4))
    rows = [r for r in fig.table if isinstance(r.get(value_key), (int, float))]
    ax.bar([" ".join(str(r[k]) for k in label_keys) for r in rows], [r[value_key] for r in rows])
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    _save(fig, figure)


def fanout(fig: Figure) -> None:
    figure, ax = plt.subplots(figsize=(6, 4))
    rows = fig.table
    ax.plot([r["replicas"] for r in rows], [r["speedup"] for r in rows], marker="o", label="measured speed-up")
    ax.plot([r["replicas"] for r in rows], [r["replicas"] for r in rows], ls="--", color="grey", label="linear")
    ax.set(xlabel="upscaler and refiner replicas (1 torch thread each)", ylabel="speed-up over 1 replica",
           title="One 4K image: tile fan-out")
    ax.legend()
    _save(fig, figure)


def encoding(fig: Figure) -> None:
    figure, ax = plt.subplots(figsize=(8, 5))
    for tier, rows in _by(fig.table, "tier").items():
        if tier != "4k":
            continue
        for r in rows:
            if r["size KB"] is None:  # the watermark's row: no file
                continue
            ax.scatter(r["encode s"], r["size KB"])
            ax.annotate(r["encoder"], (r["encode s"], r["size KB"]), fontsize=7)
    ax.set(xlabel="encode seconds (median)", ylabel="KB", yscale="log", title="4K output: encode time against size")
    _save(fig, figure)


def _by(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def modes(fig: Figure) -> None:
    bars(fig, ["tier"], "quality / fast", "quality time / fast time", "Quality mode's cost over fast mode")


def native(fig: Figure) -> None:
    bars(fig, ["tier"], "native / flashtile time", "native time / Flashtile time",
         "Native denoising at the output size against Flashtile's upscale path", log=True)


def coldstart(fig: Figure) -> None:
    bars(fig, ["source"], "first image s (median)", "seconds", "flashtile serve: start to first image")


def gpu(fig: Figure) -> None:
    bars(fig, ["architecture", "dtype", "compile", "tier", "stage"], "s (median)", "seconds", "Per-stage latency on the GPU")


def admission(fig: Figure) -> None:
    bars(fig, ["round"], "503 p99 ms", "milliseconds", "Refused at twice capacity: 503 latency, p99")


def tilecalls(fig: Figure) -> None:
    bars(fig, ["upscale tiles per call"], "4K s (median)", "seconds", "One 4K image by tiles per call")


def regions(fig: Figure) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, style in (("1", "o-"), ("3", "s-")):
        rows = [r for r in fig.table if r["regions"] == label]
        left.plot([r["offered /s"] for r in rows], [r["goodput /s"] for r in rows], style,
                  label=f"goodput, {label} region{'s' if label != '1' else ''}")
    rows = [r for r in fig.table if r["regions"] == "3"]
    share = left.twinx()
    share.plot([r["offered /s"] for r in rows], [r["spilled share"] or 0 for r in rows], "k:", label="spilled share, 3")
    share.set_ylim(0, 1)
    share.set_ylabel("share of requests with a call spilled")
    left.set_xlabel("offered, requests/s (all from us-east)")
    left.set_ylabel("images/s")
    left.set_title("Offered load against goodput")
    left.legend(loc="upper left", fontsize=8)
    share.legend(loc="lower right", fontsize=8)
    events = fig.samples.get("loss", [])
    if events:
        width = 5  # seconds per bin: one request a second is too few to read per second
        bins = int(max(e["t"] for e in events)) // width + 1
        starts = [b * width for b in range(bins)]

        def rate(keep) -> list[float]:
            counts = [0] * bins
            for e in events:
                if keep(e):
                    counts[int(e["t"]) // width] += 1
            return [c / width for c in counts]

        for region in ("us-east", "eu-west", "ap-south"):
            right.step(starts, rate(lambda e: e["kind"] == "image" and region in e["base"]), where="post",
                       label=f"images made in {region}")
        right.bar(starts, rate(lambda e: e["kind"] == "failed attempt"), width=width, align="edge", color="red",
                  alpha=0.3, label="failed attempts (retried)")
        for e in events:
            if e["kind"] == "eu-west lost":
                right.axvline(e["t"], color="k", ls="--", label="eu-west lost")
        right.set_xlabel("seconds")
        right.set_ylabel(f"per second ({width} s bins)")
        right.set_title("A region lost under load (retry client, 1 request/s)")
        right.legend(fontsize=8)
    _save(fig, figure)


DRAW = {"overhead": overhead, "load": load, "monolith": load, "native": native, "fanout": fanout, "modes": modes,
        "encoding": encoding, "coldstart": coldstart, "gpu": gpu, "admission": admission,
        "tilecalls": tilecalls, "regions": regions}


def draw(fig: Figure) -> None:
    """The figure's plot, when it has rows to plot."""
    if fig.table and fig.name in DRAW:
        DRAW[fig.name](fig)
