"""Figure 8, cold start: `flashtile serve` to first image, with the model from local files and from S3.

Each run starts `flashtile serve` as a user would (its own process group, a fresh Ray instance, cluster.yaml on
a free port) and ends it with Ctrl-C (SIGINT). Measured from the spawn: the first `GET /healthz` answered (the
proxy and ingress are up) and the first 1K fast image returned (every stage's replicas loaded; requests sent
before that are retried). Local: the embedded default from the node's cache, built already. S3: the same model
uploaded to an S3-protocol server (moto's, as in the tests, a process on 127.0.0.1) and synced into an empty
cache each run, as on a new node.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from bench.cluster import TEMPLATE, free_port, wait_http
from bench.common import PROMPT, Figure, column, med, p95
from tests.conftest import start_moto

BODY = {"prompt": PROMPT, "size": "1k", "mode": "fast", "seed": 7}
LIMIT_S = 300


def cold_start(model: str | None, env: dict) -> dict:
    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="flashtile-coldstart-"))
    config = yaml.safe_load(TEMPLATE.read_text())
    config["http_options"]["port"] = port
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "deployments.cli", "serve", str(tmp / "cluster.yaml"), "--metrics-port", str(free_port())]
    if model:
        cmd += ["--model", model]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http(url + "/healthz", LIMIT_S, proc)
        healthz = time.perf_counter() - t0
        while True:
            try:
                r = requests.post(url + "/v1/generate", json=BODY, headers={"Accept": "image/png"}, timeout=LIMIT_S)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > LIMIT_S or proc.poll() is not None:
                raise RuntimeError("no image within the limit")
            time.sleep(0.25)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        requests.post(url + "/v1/generate", json=BODY, headers={"Accept": "image/png"}, timeout=LIMIT_S).raise_for_status()
        return {"healthz_s": healthz, "first_image_s": first, "warm_image_s": time.perf_counter() - t1}
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(quick: bool, names=()) -> list[Figure]:
    from deployments.storage import upload_folder
    from stages.models import ensure_default_model

    fig = Figure("coldstart", "Figure 8: cold start, `flashtile serve` to the first image",
                 "cluster.yaml, the embedded default (local cache, or uploaded to S3 and synced into an empty cache), "
                 "a 1K fast request", quick)
    runs = 1 if quick else 2
    model_dir = ensure_default_model()
    moto, url = start_moto()  # the tests' own S3 server
    s3_env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
              "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)
    try:
        from deployments.storage import s3_client

        s3_client().create_bucket(Bucket="models")
        upload_folder(model_dir, "s3://models/flashtile-default-v1")
        samples = {"local files": [], "S3": []}
        for _ in range(runs):  # interleaved: local, S3, local, S3
            samples["local files"].append(cold_start(None, {}))
            cache = tempfile.mkdtemp(prefix="flashtile-cache-")
            samples["S3"].append(cold_start("s3://models/flashtile-default-v1", {**s3_env, "FLASHTILE_CACHE": cache}))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        moto.terminate()
        moto.wait(timeout=10)
    fig.samples = samples
    for source, s in samples.items():
        fig.table.append({"source": source, "runs": runs, "healthz s (median)": med(s, "healthz_s"),
                          "first image s (median)": med(s, "first_image_s"), "first image p95": p95(column(s, "first_image_s")),
                          "then one warm image s": med(s, "warm_image_s")})
    local, s3 = fig.table
    fig.findings.append(f"from local files the first 1K image comes {local['first image s (median)']:.0f} s after the start; "
                        f"from S3 into an empty cache {s3['first image s (median)']:.0f} s")
    return [fig]
