"""`python -m bench [figure ...] [--quick]`: run figures, print their tables, write bench/results/<figure>.json and
docs/benchmarks/<figure>.png, and regenerate docs/benchmarks.md from the latest result of every figure.

`make bench` runs them all (about 25 minutes on 2 cores). Nothing here passes or fails on time.
"""

import argparse
import importlib
import sys
import time

from bench import plots, report
from bench.common import Figure

# figure name -> module whose run(quick) returns its Figures (load and monolith share one sweep when run together)
FIGURES = {
    "overhead": "bench.overhead",
    "load": "bench.load",
    "monolith": "bench.load",
    "native": "bench.native",
    "fanout": "bench.fanout",
    "modes": "bench.modes",
    "encoding": "bench.encoding",
    "coldstart": "bench.coldstart",
    "gpu": "bench.gpu",
    "admission": "bench.admission",
    "tilecalls": "bench.tilecalls",
    "regions": "bench.regions",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", nargs="*", metavar="figure", help=f"any of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer tiers, runs and clients: a few minutes")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    args = parser.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {', '.join(map(repr, unknown))}; choose from {', '.join(FIGURES)}")
    wanted = args.figures or list(FIGURES)

    started = time.perf_counter()
    done: set[str] = set()
    for name in wanted:
        if name in done:
            continue
        module = importlib.import_module(FIGURES[name])
        t0 = time.perf_counter()
        figures: list[Figure] = module.run(args.quick, [f for f in wanted if FIGURES[f] == FIGURES[name]])
        for fig in figures:
            fig.seconds = time.perf_counter() - t0
            previous = Figure.load(fig.name)
            if fig.table or previous is None or not previous.table:
                fig.save()  # a skipped figure (no table: no GPU here) keeps an earlier real result
            try:
                plots.draw(fig)
            except Exception as err:  # a plot is not worth a lost run: the JSON is saved
                print(f"bench: could not plot {fig.name}: {err!r}", file=sys.stderr)
            print(fig.printout(), end="\n\n", flush=True)
            done.add(fig.name)
    if not args.no_docs:
        print(f"wrote {report.write()}")
    print(f"bench: {', '.join(sorted(done))} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
