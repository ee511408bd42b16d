"""Figure 10, admission at twice capacity: a burst of 2 x max_in_flight concurrent 1K requests against one ingress
replica (cluster.yaml's max_in_flight 24), and how fast the refused ones get their 503.

A refusal is only useful at once: a client told "busy" after seconds has lost those seconds. The ingress answers it
before any model work, so its latency is the event loop's: how busy the ingress keeps it. Every request is sent at
the same moment from its own connection; each answer's status and wall time are kept.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.cluster import Cluster, app_config
from bench.common import PROMPT, Figure, percentile

CAPACITY = 24


def burst(url: str, n: int, body: dict) -> list[dict]:
    """`n` requests released together (a barrier), each on its own session: status and seconds per answer."""
    start = threading.Barrier(n)

    def one(i: int) -> dict:
        session = requests.Session()
        start.wait()
        t0 = time.perf_counter()
        r = session.post(url + "/v1/generate", json={**body, "seed": i}, headers={"Accept": "image/png"}, timeout=900)
        return {"status": r.status_code, "wall_s": time.perf_counter() - t0}

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def run(quick: bool, names=()) -> list[Figure]:
    fig = Figure("admission", "Figure 10: admission at twice capacity, how fast a refused request hears 503",
                 f"{2 * CAPACITY} concurrent 1K requests (prompt, fast mode, seeds 0..{2 * CAPACITY - 1}) against one "
                 f"ingress replica with max_in_flight {CAPACITY}, the embedded default, cluster.yaml otherwise", quick)
    rounds = 1 if quick else 3
    body = {"prompt": PROMPT, "size": "1k", "mode": "fast"}
    app = app_config("flashtile", "/", args={"max_in_flight": CAPACITY},
                     deployments={"ingress": {"num_replicas": 1}})
    with Cluster() as cluster:
        cluster.deploy(app)
        url = cluster.url("flashtile")
        burst(url, 2, body)  # warm every stage once
        for r in range(rounds):
            answers = burst(url, 2 * CAPACITY, body)
            fig.samples[f"round {r + 1}"] = answers
            refused = [a["wall_s"] for a in answers if a["status"] == 503]
            served = [a["wall_s"] for a in answers if a["status"] == 200]
            fig.table.append({
                "round": r + 1, "requests": len(answers), "served": len(served), "refused (503)": len(refused),
                "other": len(answers) - len(served) - len(refused),
                "503 p50 ms": percentile(refused, 50) * 1000 if refused else None,
                "503 p99 ms": percentile(refused, 99) * 1000 if refused else None,
                "503 max ms": max(refused) * 1000 if refused else None,
                "served p50 s": percentile(served, 50) if served else None,
            })
    p99 = [row["503 p99 ms"] for row in fig.table if row["503 p99 ms"] is not None]
    if p99:
        fig.findings.append(f"refused requests heard 503 within {max(p99):.0f} ms at p99 (worst of {len(p99)} rounds); "
                            f"{sum(r['refused (503)'] for r in fig.table)} of {sum(r['requests'] for r in fig.table)} "
                            "requests were refused, none failed otherwise" if not any(r["other"] for r in fig.table)
                            else f"refused within {max(p99):.0f} ms at p99; some answers were neither 200 nor 503")
    return [fig]
