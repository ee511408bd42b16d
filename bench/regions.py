"""Figure 12, regions: offered load against goodput, latency and spill share, one region against three, and a
time series through the loss of a region.

Both clusters are real multi-node Ray clusters on this one host (bench/regional.py: one labelled node per region,
each with the CPUs its replicas reserve), Flashtile placed with one replica of every deployment per region. All
the load comes from us-east (the X-Flashtile-Region header), open loop: requests start at a fixed rate whatever
the answers, so a saturated region shows as latency and spill, not as a slower client. Every region's replicas
share this host's 2 cores: three regions add replicas (more requests in flight at once), not compute.

The loss series: the three-region cluster at a steady rate from all three regions (the documented retry client,
one Idempotency-Key per request), eu-west's node killed part-way; per second, the images each region's base
generator made, and the failed attempts the client saw before its retry succeeded.
"""

import random
from collections import Counter
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.common import PROMPT, Figure, percentile
from bench.regional import Regional
from deployments.regions import HEADER
from stages.models import ensure_default_model

BODY = {"prompt": PROMPT, "size": "1k", "mode": "fast", "steps": 2}
THREE = ["us-east", "eu-west", "ap-south"]
RETRY = {408, 429, 500, 502, 503, 504}


def open_loop(url: str, rate: float, seconds: float, origin_of) -> list[dict]:
    """Requests started every 1/rate s (Poisson arrivals, seeded) for `seconds`; each answer's status, seconds, when
    it ended (from the first start), and the regions that served it."""
    rng, out, lock, start = random.Random(0), [], threading.Lock(), time.perf_counter()

    def one(i: int, origin: str) -> None:
        t0 = time.perf_counter()
        try:
            r = requests.post(f"{url}/v1/generate", json={**BODY, "seed": i}, headers={HEADER: origin}, timeout=600)
            row = {"status": r.status_code, "regions": r.json().get("regions", {}) if r.status_code == 200 else {}}
        except requests.RequestException as err:
            row = {"status": type(err).__name__, "regions": {}}
        with lock:
            out.append({**row, "origin": origin, "wall_s": time.perf_counter() - t0, "end_s": time.perf_counter() - start})

    with ThreadPoolExecutor(256) as pool:
        t, i = 0.0, 0
        while t < seconds:
            time.sleep(max(0.0, start + t - time.perf_counter()))
            pool.submit(one, i, origin_of(i))
            i += 1
            t += rng.expovariate(rate)
    return out


def spilled(row: dict) -> bool:
    return any(where != [row["origin"]] for stage, where in row["regions"].items() if stage != "ingress")


def summary(label: str, rate: float, rows: list[dict]) -> dict:
    """A table row: goodput is images per second from the first request to the last image (a request that failed,
    or hung until its deadline, does not stretch it); latency over the images only."""
    ok = [r for r in rows if r["status"] == 200]
    walls = [r["wall_s"] for r in ok]
    return {
        "regions": label, "offered /s": rate, "sent": len(rows), "ok": len(ok),
        "failed": ", ".join(f"{n} x {s}" for s, n in sorted(Counter(str(r["status"]) for r in rows if r["status"] != 200).items())),
        "goodput /s": len(ok) / max(r["end_s"] for r in ok) if ok else 0.0,
        "p50 s": percentile(walls, 50) if walls else None, "p99 s": percentile(walls, 99) if walls else None,
        "spilled share": sum(map(spilled, ok)) / len(ok) if ok else None,
    }


def sweep(fig: Figure, cluster: Regional, label: str, rates: list[float], seconds: float) -> None:
    open_loop(cluster.url, 1.0, 4, lambda i: "us-east")  # warm every stage
    for rate in rates:
        rows = open_loop(cluster.url, rate, seconds, lambda i: "us-east")
        fig.samples[f"{label} @ {rate}/s"] = rows
        fig.table.append(summary(label, rate, rows))


def loss_series(fig: Figure, cluster: Regional, rate: float, seconds: float, lose_at: float) -> None:
    """Steady load from all three regions through the retry client; eu-west lost at `lose_at` s."""
    events, lock, start = [], threading.Lock(), time.perf_counter()

    def client(i: int, origin: str) -> None:
        headers = {"Idempotency-Key": f"loss-{i}", HEADER: origin}
        for attempt in range(8):
            try:
                r = requests.post(f"{cluster.url}/v1/generate", json={**BODY, "seed": 1000 + i}, headers=headers,
                                  timeout=600)
                status = r.status_code
            except requests.ConnectionError:
                r, status = None, "connection error"
            t = time.perf_counter() - start
            with lock:
                if status == 200:
                    events.append({"t": t, "kind": "image", "origin": origin, "base": r.json()["regions"]["base"]})
                else:
                    events.append({"t": t, "kind": "failed attempt", "origin": origin, "status": status})
            if status not in RETRY and status != "connection error":
                return
            time.sleep(float(r.headers.get("Retry-After", 1)) if r is not None else 1)
        with lock:
            events.append({"t": time.perf_counter() - start, "kind": "gave up", "origin": origin})

    lost = threading.Timer(lose_at, lambda: (cluster.lose("eu-west"),
                                             events.append({"t": time.perf_counter() - start, "kind": "eu-west lost"})))
    lost.start()
    with ThreadPoolExecutor(256) as pool:
        t, i = 0.0, 0
        while t < seconds:
            time.sleep(max(0.0, start + t - time.perf_counter()))
            pool.submit(client, i, THREE[i % 3])
            i += 1
            t += 1 / rate
    lost.join()
    fig.samples["loss"] = sorted(events, key=lambda e: e["t"])
    images = [e for e in events if e["kind"] == "image"]
    failed = [e for e in events if e["kind"] == "failed attempt"]
    fig.table.append({
        "regions": "3, eu-west lost at %.0f s" % lose_at, "offered /s": rate, "sent": i, "ok": len(images),
        "failed": f"{len(failed)} attempts, retried", "goodput /s": len(images) / max(e["t"] for e in events),
        "p50 s": None, "p99 s": None,
        "spilled share": None,
    })
    gave_up = sum(e["kind"] == "gave up" for e in events)
    fig.findings.append(f"through the loss of eu-west: {len(images)} of {i} requests got their image, {gave_up} "
                        f"gave up; the client saw {len(failed)} failed attempts before its retries succeeded "
                        f"(statuses {sorted({str(e['status']) for e in failed})})")


def run(quick: bool, names=()) -> list[Figure]:
    rates = [0.5, 1.0, 2.0] if quick else [0.5, 1.0, 1.5, 2.0, 3.0]
    seconds = 15 if quick else 30
    fig = Figure("regions", "Figure 12: regions, offered load against goodput and spill, and a region lost",
                 f"1K fast requests (steps 2) from us-east at fixed rates for {seconds} s each; one replica of every "
                 "deployment per region; every region's node on this host's 2 cores", quick)
    ensure_default_model()  # once, before a dozen replicas would race to build it
    with tempfile.TemporaryDirectory() as tmp:
        for regions in (THREE[:1], THREE):
            cluster = Regional(Path(tmp) / str(len(regions)), regions)
            try:
                sweep(fig, cluster, str(len(regions)), rates, seconds)
                if len(regions) == 3:
                    loss_series(fig, cluster, 1.0, 40 if quick else 60, 15 if quick else 20)
            finally:
                cluster.close()
    fig.findings[:0] = sweep_findings(fig.table)
    return [fig]


def sweep_findings(table: list[dict]) -> list[str]:
    one = {r["offered /s"]: r for r in table if r["regions"] == "1"}
    three = {r["offered /s"]: r for r in table if r["regions"] == "3"}
    top = max(one)
    knee = max(rate for rate, r in three.items() if r["ok"] == r["sent"] and r["p99 s"] < 5)
    shares = ", ".join(f"{rate:g}/s: {r['spilled share']:.0%}" for rate, r in sorted(three.items()))
    return [
        f"at {top}/s offered from us-east: goodput {one[top]['goodput /s']:.2f}/s with one region "
        f"({one[top]['failed'] or 'no failures'}), {three[top]['goodput /s']:.2f}/s with three "
        f"({three[top]['failed'] or 'no failures'}); p99 {one[top]['p99 s']:.1f} s against {three[top]['p99 s']:.1f} s. "
        "Every region's replicas share this host's 2 cores, so three regions add room for requests (three ingresses' "
        "admission, more replicas to queue on), not images per second",
        f"share of us-east's requests with a call served in another region, by offered load: {shares}; up to "
        f"{knee:g}/s every request was served with p99 under 5 s",
    ]
