"""What every figure shares: the machine's description, interleaved sampling, statistics, results on disk.

Every figure is a ratio of variants measured in the same run: variants run interleaved (A B A B ...) after a
warm-up, so a slow minute on a shared machine lands on all of them alike. Absolute times are only ever shown
beside the CPU (or GPU) they came from.
"""

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
PLOTS = DOCS / "benchmarks"
PROMPT = "a red circle left of a blue square"  # one of the embedded default's own kinds of caption


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The SIMD level, which sets torch's CPU speed more than the model name does."""
    try:
        flags = set(next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split())
    except (OSError, StopIteration):
        return ""
    for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
        if name in flags:
            return name
    return "no avx2"


def environment() -> dict:
    """Where a result came from: commit, CPU, cores, versions, date."""
    import ray
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Changes to tracked files mark the commit, except the bench's own outputs (results, docs, plots).
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)bench/results", ":(exclude)docs"], cwd=ROOT, capture_output=True, text=True)
        dirty = bool(changed.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": commit + ("+changes" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_simd": cpu_flags(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of under 20 samples: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def p95(values: list[float]) -> float:
    return percentile(values, 95)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "p95": p95(values), "n": len(values)}


def interleaved(variants: dict[str, Callable[[], dict]], runs: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Run each variant `warmup` times (discarded), then `runs` rounds of A B C, A B C, ...

    A variant returns a dict of measurements (seconds and more); the wall time of the call is added as `wall_s`
    unless the variant reports its own.
    """
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(runs):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out = fn() or {}
            out.setdefault("wall_s", time.perf_counter() - t0)
            samples[name].append(out)
    return samples


def column(samples: list[dict], key: str) -> list[float]:
    return [s[key] for s in samples if s.get(key) is not None]


def med(samples: list[dict], key: str) -> float:
    values = column(samples, key)
    return statistics.median(values) if values else float("nan")


@dataclass
class Figure:
    """One figure's result: what was compared, what was held equal, every raw sample, the table's rows."""

    name: str
    title: str
    held_equal: str
    quick: bool
    env: dict = field(default_factory=environment)
    samples: dict = field(default_factory=dict)  # raw measurements, as measured
    table: list[dict] = field(default_factory=list)  # the printed table's rows (first row's keys = columns)
    findings: list[str] = field(default_factory=list)  # sentences that name what the numbers show
    notes: list[str] = field(default_factory=list)  # what was skipped or could not run, and why
    seconds: float = 0.0

    def save(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        path.write_text(json.dumps(self.__dict__, indent=1, default=_jsonable) + "\n")
        return path

    @classmethod
    def load(cls, name: str, folder: Path | None = None) -> "Figure | None":
        path = (folder or RESULTS) / f"{name}.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def markdown_table(self) -> str:
        if not self.table:
            return ""
        cols = list(self.table[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in self.table]
        return "\n".join(lines)

    def printout(self) -> str:
        head = f"== {self.title} ({'quick' if self.quick else 'full'} run, {self.seconds:.0f} s) =="
        env = f"{self.env['cpu']} ({self.env['cpu_simd']}), {self.env['cores']} cores, commit {self.env['commit']}"
        parts = [head, env, f"held equal: {self.held_equal}", self.markdown_table()]
        parts += [f"- {f}" for f in self.findings] + [f"- note: {n}" for n in self.notes]
        return "\n".join(p for p in parts if p)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
