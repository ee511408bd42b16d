"""The cluster, for real: `flashtile serve cluster.yaml` (the README's `make run`: a local Ray instance, Serve on
cluster.yaml, HTTP on 127.0.0.1:8000, metrics on 127.0.0.1:8080), driven over HTTP, Python handles and Prometheus.

One cluster per test session (module-scoped here): start-up is the slow part on 2 cores.
"""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"
METRICS_PORT = 8080
OUTPUT = "s3://outputs/flashtile"
PROMETHEUS = "http://127.0.0.1:9091"
STARTUP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster(s3_model_url):
    # The model comes from the S3 server (each replica syncs it into the node's cache); outputs go to S3.
    # An empty S3 cache, so this session really downloads the model.
    import shutil

    shutil.rmtree(Path(os.environ["FLASHTILE_CACHE"]) / "s3", ignore_errors=True)
    flashtile = Path(sys.executable).parent / "flashtile"
    log = open(ROOT / ".pytest-cache-flashtile" / "serve.log", "w")
    proc = subprocess.Popen(
        [str(flashtile), "serve", "cluster.yaml", "--metrics-port", str(METRICS_PORT),
         "--model", s3_model_url, "--output", OUTPUT],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"flashtile serve exited with {proc.returncode}; see {log.name}"
            try:
                if requests.get(f"{URL}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"cluster not up after {STARTUP_TIMEOUT_S}s; see {log.name}"
            time.sleep(2)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Serve shuts down, and the local Ray with its driver
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        log.close()


def _png(resp) -> Image.Image:
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(resp.content))


EXPECTED = {"preview": (336, 192), "1k": (1024, 576), "2k": (2048, 1152)}


@pytest.mark.parametrize("tier", list(EXPECTED))
def test_http_each_tier_returns_a_png_of_the_documented_size(cluster, tier):
    body = {"prompt": "a lighthouse at dusk", "size": tier, "aspect_ratio": "16:9", "seed": 5, "mode": "fast", "steps": 2}
    resp = requests.post(f"{URL}/v1/generate", json=body, headers={"Accept": "image/png"}, timeout=300)
    image = _png(resp)
    assert image.size == EXPECTED[tier]
    assert image.text["seed"] == "5" and image.text["model"] == "flashtile-default-v1"
    assert resp.headers["x-flashtile-seed"] == "5"


def test_4k_tiles_fan_out_over_both_upscaler_replicas(cluster):
    body = {"prompt": "a lighthouse at dusk", "size": "4k", "aspect_ratio": "16:9", "seed": 5, "mode": "fast", "steps": 2}
    resp = requests.post(f"{URL}/v1/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text[:500]
    result = resp.json()
    assert Image.open(io.BytesIO(base64.b64decode(result["image_b64"]))).size == (4096, 2304)
    assert result["steps"]["upscale_tiles"] == 26 and result["steps"]["refine_tiles"] == 8
    assert len(result["replicas"]["upscaler"]) == 2  # cluster.yaml keeps 2 upscaler replicas; both took tiles


def _sse(resp) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_stream_reports_every_base_step_with_previews_then_the_image(cluster):
    body = {"prompt": "a small red star", "size": "1k", "seed": 2, "mode": "quality", "steps": 6}
    with requests.post(f"{URL}/v1/generate/stream", json=body, stream=True, timeout=300) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _sse(resp)
    base = [e for k, e in events if k == "progress" and e["stage"] == "base"]
    assert [e["step"] for e in base] == [1, 2, 3, 4, 5, 6] and all(e["total"] == 6 for e in base)
    previews = [e["preview_png_b64"] for e in base if "preview_png_b64" in e]
    assert previews and Image.open(io.BytesIO(base64.b64decode(previews[-1]))).size == (32, 32)  # latent size
    upscale = [e for k, e in events if k == "progress" and e["stage"] == "upscale"]
    assert upscale and upscale[-1]["step"] == upscale[-1]["total"]
    kind, result = events[-1]
    assert kind == "result" and (result["width"], result["height"]) == (1024, 1024) and result["seed"] == 2
    assert Image.open(io.BytesIO(base64.b64decode(result["image_b64"]))).size == (1024, 1024)


def test_openai_client_generates_images(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0, timeout=300)
    response = client.images.generate(
        model="flashtile-default-v1", prompt="a lighthouse at dusk", n=2, size="1024x576", response_format="b64_json",
        extra_body={"seed": 3, "mode": "fast", "steps": 2},
    )
    images = [base64.b64decode(d.b64_json) for d in response.data]
    assert len(images) == 2 and images[0] != images[1]  # seeds 3 and 4
    for png in images:
        assert Image.open(io.BytesIO(png)).size == (1024, 576)
    with pytest.raises(openai.UnprocessableEntityError, match="size must be 'auto' or one of"):
        client.images.generate(prompt="a", size="1536x1024", response_format="b64_json")
    with pytest.raises(openai.NotFoundError, match="model must be"):
        client.images.generate(model="dall-e-3", prompt="a", response_format="b64_json")


def test_json_result_and_handle_give_the_same_image(cluster):
    body = {"prompt": "two yellow circles on grey", "size": "1k", "aspect_ratio": "4:3", "seed": 9, "mode": "fast", "steps": 2}
    resp = requests.post(f"{URL}/v1/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text[:500]
    result = resp.json()
    assert (result["width"], result["height"]) == (1024, 768)
    assert result["steps"]["base"] == 2 and result["steps"]["refine_tiles"] == 2
    assert set(result["timings"]) >= {"encode+base", "upscale", "refine"}
    assert set(result["replicas"]) == {"base_generator", "upscaler", "refiner"}
    http_png = base64.b64decode(result["image_b64"])

    code = (
        "import ray, sys; from ray import serve; from deployments.schemas import GenerateRequest\n"
        "ray.init(address='auto', namespace='serve', logging_level='ERROR')\n"
        "handle = serve.get_app_handle('flashtile')\n"
        f"result = handle.generate.remote(GenerateRequest(**{body!r})).result(timeout_s=300)\n"
        "sys.stdout.buffer.write(result.png())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=400)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == http_png  # the same request through a Python handle: the same PNG, byte for byte


def test_url_response_is_a_presigned_s3_url_a_plain_client_can_fetch(cluster):
    body = {"prompt": "a lighthouse", "size": "1k", "aspect_ratio": "9:16", "seed": 4, "mode": "fast", "steps": 2,
            "response_format": "url"}
    result = requests.post(f"{URL}/v1/generate", json=body, timeout=300).json()
    assert result["image_b64"] is None and "X-Amz-Expires=900" in result["url"]
    assert result["url"].startswith(os.environ["AWS_ENDPOINT_URL"] + "/outputs/flashtile/images/")
    png = requests.get(result["url"], timeout=30)  # no AWS credentials: the signature is the permission
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (576, 1024)


def test_idempotency_key_replays_the_stored_result_and_refuses_another_body(cluster):
    body = {"prompt": "a purple ring", "size": "preview", "mode": "fast", "steps": 3}  # no seed: one is drawn
    headers = {"Idempotency-Key": "order-42"}
    first = requests.post(f"{URL}/v1/generate", json=body, headers=headers, timeout=300)
    again = requests.post(f"{URL}/v1/generate", json=body, headers=headers, timeout=300)
    assert first.status_code == again.status_code == 200
    assert first.headers["idempotent-replayed"] == "false" and again.headers["idempotent-replayed"] == "true"
    # A recomputation would have drawn another seed; the replay is the stored result itself.
    assert again.json()["seed"] == first.json()["seed"] and again.json()["image_b64"] == first.json()["image_b64"]
    other = requests.post(f"{URL}/v1/generate", json={**body, "prompt": "a red ring"}, headers=headers, timeout=30)
    assert other.status_code == 409 and other.json()["error"]["type"] == "idempotency_conflict"
    fresh = requests.post(f"{URL}/v1/generate", json=body, headers={"Idempotency-Key": "order-43"}, timeout=300)
    assert fresh.status_code == 200 and fresh.headers["idempotent-replayed"] == "false"  # another key: computed


def test_invalid_request_is_422_naming_the_field(cluster):
    resp = requests.post(f"{URL}/v1/generate", json={"prompt": "a", "size": "8k", "colour": 1}, timeout=30)
    assert resp.status_code == 422
    errors = {e["field"]: e["message"] for e in resp.json()["error"]["errors"]}
    assert "'preview', '1k', '2k' or '4k'" in errors["size"]
    assert "colour" in errors
    assert "Traceback" not in resp.text


def test_models_health_and_openapi(cluster):
    assert requests.get(f"{URL}/healthz", timeout=10).json() == {"status": "ok"}
    models = requests.get(f"{URL}/v1/models", timeout=10).json()["data"]
    assert models[0]["id"] == "flashtile-default-v1" and models[0]["base_resolution"] == 256
    paths = requests.get(f"{URL}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/generate", "/v1/models", "/healthz"} <= set(paths)


def _readme_examples() -> dict[str, tuple[str, str]]:
    """README code blocks marked `<!-- example: NAME -->`: {name: (language, code)}."""
    import re

    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)\n```", text, flags=re.S)
    return {name: (lang, code) for name, lang, code in found}


def test_readme_examples_run_against_the_cluster(cluster, tmp_path):
    examples = _readme_examples()
    assert set(examples) == {"curl-png", "curl-json", "python", "openai"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    subprocess.run(["bash", "-c", examples["curl-png"][1]], cwd=tmp_path, check=True, timeout=300, env=env)
    with Image.open(tmp_path / "lighthouse.png") as image:
        assert image.size == (2048, 1152)

    out = subprocess.run(["bash", "-c", examples["curl-json"][1]], cwd=tmp_path, check=True, timeout=300, env=env,
                         capture_output=True, text=True).stdout.split()
    assert out[1:3] == ["256", "256"] and int(out[0]) >= 0  # preview, 1:1, on the 256-px default

    (tmp_path / "lighthouse.png").unlink()
    proc = subprocess.run([sys.executable, "-c", examples["python"][1]], cwd=tmp_path, timeout=400, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["1024", "768"]
    with Image.open(tmp_path / "lighthouse.png") as image:
        assert image.size == (1024, 768)

    proc = subprocess.run([sys.executable, "-c", examples["openai"][1]], cwd=tmp_path, timeout=400, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2"]
    for i in range(2):
        with Image.open(tmp_path / f"lighthouse-{i}.png") as image:
            assert image.size == (1024, 576)


def test_concurrent_requests_share_a_generator_batch(cluster):
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "two yellow circles on grey", "size": "preview", "mode": "fast", "steps": 8}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(
            lambda i: requests.post(f"{URL}/v1/generate", json={**body, "seed": 100 + i}, timeout=300), range(4)
        ))
    assert [r.status_code for r in responses] == [200] * 4
    results = [r.json() for r in responses]
    assert max(r["base_batch_size"] for r in results) > 1  # one generator replica, 4 requests: batches form
    assert sorted(r["seed"] for r in results) == [100, 101, 102, 103]
    assert len({r["image_b64"] for r in results}) == 4  # each request kept its own seed and image


@pytest.fixture()
def prometheus(cluster, tmp_path):
    """A real Prometheus server (Debian's package) scraping the cluster with the shipped k8s/prometheus.yml."""
    import shutil

    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make test` installs Debian's prometheus package")
    config = yaml.safe_load((ROOT / "k8s" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={PROMETHEUS.removeprefix('http://')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while _promql('up{job="flashtile"} == 1') == []:
            assert proc.poll() is None and time.monotonic() < deadline, "Prometheus never scraped the cluster"
            time.sleep(1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _promql(query: str) -> list:
    try:
        body = requests.get(f"{PROMETHEUS}/api/v1/query", params={"query": query}, timeout=10).json()
    except (requests.RequestException, ValueError):
        return []
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_sees_p50_latency_for_every_stage(prometheus):
    for seed in (1, 2):  # after Prometheus's first scrape, so rates see the increase
        body = {"prompt": "a green triangle", "size": "1k", "mode": "fast", "steps": 2, "seed": seed,
                "response_format": "url"}
        assert requests.post(f"{URL}/v1/generate", json=body, timeout=300).status_code == 200
    query = "histogram_quantile(0.5, sum by (le, stage) (rate(flashtile_stage_latency_seconds_bucket[2m])))"
    deadline, p50 = time.monotonic() + 90, {}
    while time.monotonic() < deadline:  # Ray's agents export every few seconds; Prometheus scrapes every second
        p50 = {r["metric"]["stage"]: float(r["value"][1]) for r in _promql(query)}
        if set(p50) == {"encode", "base", "upscale", "refine"} and all(v == v and v > 0 for v in p50.values()):
            break
        time.sleep(2)
    assert set(p50) == {"encode", "base", "upscale", "refine"}, p50
    assert all(0 < v <= 300 for v in p50.values()), p50  # NaN fails too
    assert _promql("ray_flashtile_stage_latency_seconds_count") == []  # renamed to flashtile_* by the config
    images = _promql('sum(flashtile_images_total{size="1k",mode="fast"})')
    assert images and float(images[0]["value"][1]) >= 2
    synced = _promql('sum(flashtile_storage_bytes_total{direction="in"})')  # replicas synced the S3 model
    assert synced and float(synced[0]["value"][1]) > 1e6
    stored = _promql('sum(flashtile_storage_bytes_total{direction="out"})')  # the url responses' PNGs
    assert stored and float(stored[0]["value"][1]) > 0
    # Every panel of the shipped Grafana dashboard is a query Prometheus accepts.
    dashboard = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        status = requests.get(f"{PROMETHEUS}/api/v1/query", params={"query": expr}, timeout=10).json()["status"]
        assert status == "success", expr


# Last in this module: it leaves extra base-generator replicas behind for a minute.
STATUS_POLLER = """
import json, os, sys, time
import ray
from ray import serve
ray.init(address="auto", namespace="serve", logging_level="ERROR")
peak, deadline = {}, time.monotonic() + float(sys.argv[1])
print("ready", flush=True)
while time.monotonic() < deadline and not os.path.exists(sys.argv[2]):  # argv[2]: the burst is over
    for name, d in serve.status().applications["flashtile"].deployments.items():
        live = sum(n for state, n in d.replica_states.items() if state in ("RUNNING", "STARTING"))
        peak[name] = max(peak.get(name, 0), live)
    time.sleep(0.5)
print(json.dumps(peak), flush=True)
"""


def test_burst_scales_the_generator_but_not_the_encoder(cluster, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    done = tmp_path / "burst-done"
    poller = subprocess.Popen(
        [sys.executable, "-c", STATUS_POLLER, "120", str(done)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert poller.stdout.readline().strip() == "ready"
    # 8 generator-heavy requests at once (base only, 40 steps): the generator's target is 1 ongoing request
    # per replica, the encoder's 8, so only the generator has reason to scale.
    body = {"prompt": "a burst", "size": "preview", "mode": "fast", "steps": 40}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda i: requests.post(f"{URL}/v1/generate", json={**body, "seed": i}, timeout=300).status_code, range(8)
        ))
    done.touch()
    assert codes == [200] * 8
    out, _ = poller.communicate(timeout=120)
    peak = json.loads(out.strip().splitlines()[-1])
    assert peak["base_generator"] > 1  # min_replicas is 1
    assert peak["prompt_encoder"] == 1
