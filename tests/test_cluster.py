"""The cluster, for real: `flashtile serve cluster.yaml` (`make run`: a local Ray instance, Serve on
cluster.yaml, HTTP on 127.0.0.1:8000, metrics on 127.0.0.1:8080), driven over HTTP, Python handles and Prometheus.

One cluster per test session (module-scoped here): start-up is the slow part on 2 cores.
"""

import base64
import hashlib
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
from doc_examples import doc_examples  # tests/doc_examples.py: the marked code blocks of README.md and docs/*.md
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"
METRICS_PORT = 8080
OUTPUT = "s3://outputs/flashtile"
PROMETHEUS = "http://127.0.0.1:9091"
STARTUP_TIMEOUT_S = 240
KEYS = ("test-key-alpha", "test-key-beta")
CONFIG_KEY = "test-key-from-config"  # given to the cluster as an app arg, by its SHA-256 digest only
API = requests.Session()  # every inference route needs a key: the cluster runs with FLASHTILE_API_KEYS set
API.headers["Authorization"] = f"Bearer {KEYS[0]}"
BLOCKLIST = ["forbidden", r"re:\bgor(e|y)\b"]
MAX_IN_FLIGHT = 10


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
         "--model", s3_model_url, "--output", OUTPUT,
         "--arg", f"prompt_blocklist={json.dumps(BLOCKLIST)}", "--arg", f"max_in_flight={MAX_IN_FLIGHT}",
         "--arg", f"api_keys={json.dumps(['sha256:' + hashlib.sha256(CONFIG_KEY.encode()).hexdigest()])}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "FLASHTILE_API_KEYS": ",".join(KEYS)},
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"flashtile serve exited with {proc.returncode}; see {log.name}"
            try:
                if API.get(f"{URL}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"cluster not up after {STARTUP_TIMEOUT_S}s; see {log.name}"
            time.sleep(2)
        yield proc
    finally:
        if proc.poll() is None:  # the module's last test stops it itself
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


def _metrics() -> dict[tuple, float]:
    """The cluster's own metrics endpoint (what Prometheus scrapes), summed over replicas:
    {(name, ((label, value), ...)): value} for Flashtile's series, with Ray's per-process labels left out."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_flashtile_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("stage", "reason", "route", "status", "cache", "le")))
                key = (sample.name.removeprefix("ray_"), labels)
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _heartbeats() -> dict[str, float]:
    """Each replica's flashtile_replica_heartbeat_seconds as last exported, by replica id."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return {s.labels.get("replica", ""): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "ray_flashtile_replica_heartbeat_seconds"}


def _after_an_export_round(timeout_s: float = 60, stale_s: float = 30) -> dict[tuple, float]:
    """The metrics once every live replica has exported again (its heartbeat is newer than this call): whatever any
    replica counted before the call is in them. A replica whose last heartbeat is older than `stale_s` is gone
    (the exporter keeps a removed replica's last values)."""
    since = time.time()
    deadline = time.monotonic() + timeout_s
    while True:
        beats = _heartbeats()
        live = [t for t in beats.values() if t > since - stale_s]
        if live and all(t > since for t in live):
            return _metrics()
        assert time.monotonic() < deadline, f"no export round within {timeout_s} s: {beats}"
        time.sleep(0.5)


def _total(snapshot: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in snapshot.items() if n == name and want <= set(ls))


def _wait_for(predicate, timeout_s: float = 60, every_s: float = 1.0):
    """Poll the metrics until predicate(snapshot) holds (Ray's agents export every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = _metrics()
        if predicate(snapshot) or time.monotonic() > deadline:
            return snapshot
        time.sleep(every_s)


def _stage_work(snapshot: dict) -> dict[str, float]:
    return {stage: _total(snapshot, "flashtile_stage_latency_seconds_count", stage=stage)
            for stage in ("encode", "base", "upscale", "refine")}


BIG_BODY = json.dumps({"prompt": "x" * 70_000})


def _bad_requests() -> list[tuple[str, str, dict, object, int]]:
    """(name, path, headers, body, expected status): every one refused before any model work."""
    ok = {"prompt": "a red star", "size": "preview"}
    js = {"Content-Type": "application/json"}
    return [
        ("no key", "/v1/generate", {"Authorization": ""}, ok, 401),
        ("wrong key", "/v1/generate", {"Authorization": "Bearer not-a-key"}, ok, 401),
        ("basic auth", "/v1/generate", {"Authorization": "Basic dGVzdDp0ZXN0"}, ok, 401),
        ("no key, openai", "/v1/images/generations", {"Authorization": ""}, {"prompt": "a"}, 401),
        ("oversized tier", "/v1/generate", {}, {**ok, "size": "8k"}, 422),
        ("oversized openai size", "/v1/images/generations", {}, {"prompt": "a", "size": "8192x8192"}, 422),
        ("unknown aspect", "/v1/generate", {}, {**ok, "aspect_ratio": "2:1"}, 422),
        ("huge prompt", "/v1/generate", {}, {**ok, "prompt": "x" * 2001}, 422),
        ("blank prompt", "/v1/generate", {}, {**ok, "prompt": "   "}, 422),
        ("unknown field", "/v1/generate", {}, {**ok, "colour": "red"}, 422),
        ("NaN guidance", "/v1/generate", js, '{"prompt": "a", "guidance_scale": NaN}', 422),
        ("infinite guidance", "/v1/generate", js, '{"prompt": "a", "guidance_scale": Infinity}', 422),
        ("zero steps", "/v1/generate", {}, {**ok, "steps": 0}, 422),
        ("too many steps", "/v1/generate", {}, {**ok, "steps": 151}, 422),
        ("negative seed", "/v1/generate", {}, {**ok, "seed": -1}, 422),
        ("preview in quality mode", "/v1/generate", {}, {**ok, "mode": "quality"}, 422),
        ("zero timeout", "/v1/generate", {}, {**ok, "timeout_s": 0}, 422),
        ("bad response_format", "/v1/generate", {}, {**ok, "response_format": "gif"}, 422),
        ("not JSON", "/v1/generate", js, "prompt=a red star", 422),
        ("a form, not JSON", "/v1/generate", {"Content-Type": "application/x-www-form-urlencoded"}, "prompt=a", 422),
        ("idempotency key too long", "/v1/generate", {"Idempotency-Key": "k" * 256}, ok, 422),
        ("huge body", "/v1/generate", js, BIG_BODY, 413),
        ("huge chunked body", "/v1/generate", {**js, "chunked": "1"}, BIG_BODY, 413),
        ("pixel-step budget", "/v1/generate", {}, {**ok, "size": "4k", "steps": 140}, 422),
        ("too many images", "/v1/images/generations", {}, {"prompt": "a", "n": 5}, 422),
        ("unknown model", "/v1/images/generations", {}, {"prompt": "a", "model": "dall-e-3"}, 404),
        ("blocked word", "/v1/generate", {}, {**ok, "prompt": "a FORBIDDEN castle"}, 400),
        ("blocked pattern, openai", "/v1/images/generations", {}, {"prompt": "gory scenes"}, 400),
        ("blocked, stream", "/v1/generate/stream", {}, {**ok, "prompt": "forbidden fruit"}, 400),
        ("bad field, stream", "/v1/generate/stream", {}, {**ok, "steps": "many"}, 422),
        ("bad base64", "/v1/watermark/detect", {}, {"image_b64": "not base64!"}, 422),
        ("not an image", "/v1/watermark/detect", {}, {"image_b64": base64.b64encode(b"hello").decode()}, 422),
        ("wrong method", "/v1/generate", {"method": "GET"}, None, 405),
    ]


def _send(path: str, headers: dict, body) -> requests.Response:
    headers = dict(headers)
    method = headers.pop("method", "POST")
    chunked = headers.pop("chunked", None)
    session = API if headers.get("Authorization", "x") else requests  # "" = no Authorization header at all
    headers = {k: v for k, v in headers.items() if v}
    if isinstance(body, str):
        raw = body.encode()
        data = (raw[i:i + 8192] for i in range(0, len(raw), 8192)) if chunked else raw  # a generator: chunked
        return session.request(method, f"{URL}{path}", data=data, headers=headers, timeout=60)
    return session.request(method, f"{URL}{path}", json=body, headers=headers, timeout=60)


# First in this module: the cluster has done no work yet, so the stage counters show any work exactly.
def test_bad_requests_get_the_right_4xx_and_no_model_work(cluster):
    cases = _bad_requests()
    assert len(cases) >= 20 and len({c[0] for c in cases}) == len(cases)
    before = _metrics()
    for name, path, headers, body, expected in cases:
        resp = _send(path, headers, body)
        assert resp.status_code == expected, (name, resp.status_code, resp.text[:300])
        error = resp.json()["error"]
        assert error["type"] and error["message"] and "Traceback" not in resp.text, name
    # One real request after them: once its work shows in the metrics, so would any the bad ones caused.
    assert API.post(f"{URL}/v1/generate", json={"prompt": "a red star", "size": "preview", "steps": 1}, timeout=300).ok
    after = _wait_for(lambda m: _stage_work(m)["base"] >= _stage_work(before)["base"] + 1
                      and _total(m, "flashtile_requests_total", status="401") >= 4)
    after = _after_an_export_round()
    work = {k: after_v - _stage_work(before)[k] for k, after_v in _stage_work(after).items()}
    assert work == {"encode": 1, "base": 1, "upscale": 0, "refine": 0}, work  # the good request's, nothing more
    assert _total(after, "flashtile_prompts_blocked_total") - _total(before, "flashtile_prompts_blocked_total") == 3
    assert _total(after, "flashtile_images_total") - _total(before, "flashtile_images_total") == 1


def test_keys_open_routes_and_the_error_shape(cluster):
    assert requests.get(f"{URL}/healthz", timeout=10).status_code == 200  # open
    assert requests.get(f"{URL}/openapi.json", timeout=10).status_code == 200  # open
    denied = requests.get(f"{URL}/v1/models", timeout=10)
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in denied.json()["error"]["message"]
    other = requests.get(f"{URL}/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=10)
    assert other.status_code == 200  # the second key from FLASHTILE_API_KEYS works too
    # A key from the config (api_keys, as a digest) works beside the environment's, on the HTTP middleware too.
    configured = requests.post(f"{URL}/v1/generate", json={"prompt": "a", "bogus": 1}, timeout=10,
                               headers={"Authorization": f"Bearer {CONFIG_KEY}"})
    assert configured.status_code == 422 and "bogus" in configured.text  # past the key check, refused by the schema
    digest_as_key = requests.get(f"{URL}/v1/models", timeout=10, headers={
        "Authorization": f"Bearer sha256:{hashlib.sha256(CONFIG_KEY.encode()).hexdigest()}"})
    assert digest_as_key.status_code == 401  # the digest itself is not a key
    limit = API.post(f"{URL}/v1/generate", json={"prompt": "a", "size": "4k", "steps": 140}, timeout=30).json()["error"]
    assert limit["type"] == "limit_exceeded" and limit["limit"] == "max_megapixel_steps" and limit["allowed"] == 2100


EXPECTED = {"preview": (352, 192), "1k": (1024, 576), "2k": (2048, 1152)}


@pytest.mark.parametrize("tier", list(EXPECTED))
def test_http_each_tier_returns_a_png_of_the_documented_size(cluster, tier):
    body = {"prompt": "a lighthouse at dusk", "size": tier, "aspect_ratio": "16:9", "seed": 5, "mode": "fast", "steps": 2}
    resp = API.post(f"{URL}/v1/generate", json=body, headers={"Accept": "image/png"}, timeout=300)
    image = _png(resp)
    assert image.size == EXPECTED[tier]
    assert image.text["seed"] == "5" and image.text["model"] == "flashtile-default-v1"
    assert resp.headers["x-flashtile-seed"] == "5"
    # The same provenance fields as `flashtile generate` writes (stages.imagefile.provenance), request id included.
    assert set(image.text) == {"prompt", "negative_prompt", "seed", "size", "aspect_ratio", "mode", "steps",
                               "guidance_scale", "scheduler", "model", "software", "request_id"}
    assert image.text["request_id"] == resp.headers["x-flashtile-request-id"]


def test_4k_tiles_fan_out_over_both_upscaler_replicas(cluster):
    body = {"prompt": "a lighthouse at dusk", "size": "4k", "aspect_ratio": "16:9", "seed": 5, "mode": "fast", "steps": 2}
    resp = API.post(f"{URL}/v1/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text[:500]
    result = resp.json()
    assert Image.open(io.BytesIO(base64.b64decode(result["image_b64"]))).size == (4096, 2304)
    assert result["steps"]["upscale_tiles"] == 26 and result["steps"]["refine_tiles"] == 8
    assert len(result["replicas"]["upscaler"]) >= 2  # cluster.yaml keeps 2 upscaler replicas; both took tiles


def _sse(resp) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_stream_reports_every_base_step_with_previews_then_the_image(cluster, shipped_guidance):
    body = {"prompt": "a small red star", "size": "1k", "seed": 2, "mode": "quality", "steps": 6}
    with API.post(f"{URL}/v1/generate/stream", json=body, stream=True, timeout=300) as resp:
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
    assert result["guidance_scale"] == shipped_guidance["quality"]  # no guidance asked: the model's for the mode
    assert Image.open(io.BytesIO(base64.b64decode(result["image_b64"]))).size == (1024, 1024)


def test_openai_client_generates_images(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{URL}/v1", api_key=KEYS[1], max_retries=0, timeout=300)
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


def test_http_handle_and_cli_write_the_same_file_byte_for_byte(cluster, tmp_path):
    # One driver (stages/driver.py) runs the cluster and `flashtile generate`: the same request, seed and torch threads
    # (cluster.yaml's torch_threads: 1) give the same pixels, text chunks and watermark, so the same bytes.
    body = {"prompt": "two yellow circles on grey", "size": "1k", "aspect_ratio": "4:3", "seed": 9, "mode": "fast", "steps": 2}
    resp = API.post(f"{URL}/v1/generate", json=body, timeout=300)
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
        # A refusal reaches a handle caller as the same typed error the HTTP routes map to their status.
        "from deployments.errors import PolicyViolation\n"
        "try:\n"
        "    handle.generate.remote({'prompt': 'a forbidden star', 'size': 'preview'}).result(timeout_s=60)\n"
        "except PolicyViolation as err:\n"
        "    print('raised', err.status, err.kind, file=sys.stderr)  # Ray's subclass of PolicyViolation\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=400)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    handle_png = proc.stdout
    assert "raised 400 content_policy_violation" in proc.stderr.decode(), proc.stderr.decode()[-2000:]

    cli = subprocess.run(
        [str(Path(sys.executable).parent / "flashtile"), "generate", body["prompt"], "--size", "1k", "--aspect", "4:3",
         "--seed", "9", "--mode", "fast", "--steps", "2", "--threads", "1", "-q", "-o", str(tmp_path / "cli.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    cli_png = (tmp_path / "cli.png").read_bytes()

    texts = [Image.open(io.BytesIO(png)).text for png in (http_png, handle_png, cli_png)]
    assert texts[0] == texts[1] == texts[2] and texts[0]["request_id"] == result["request_id"]
    assert http_png == handle_png == cli_png


def _detect(image: Image.Image, fmt: str = "PNG", **save) -> dict:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    resp = API.post(f"{URL}/v1/watermark/detect", json={"image_b64": base64.b64encode(buf.getvalue()).decode()}, timeout=60)
    assert resp.status_code == 200, resp.text[:300]
    return resp.json()


def test_every_image_carries_a_watermark_that_survives_jpeg_and_downscaling(cluster):
    body = {"prompt": "a small red star in the top left corner", "size": "1k", "aspect_ratio": "16:9", "seed": 12,
            "mode": "fast", "steps": 2}
    resp = API.post(f"{URL}/v1/generate", json=body, timeout=300)
    result = resp.json()
    assert resp.headers["x-flashtile-request-id"] == result["request_id"] and len(result["request_id"]) == 12
    image = Image.open(io.BytesIO(base64.b64decode(result["image_b64"]))).convert("RGB")
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    for found in (_detect(image), _detect(image, "JPEG", quality=90), _detect(half), _detect(half, "JPEG", quality=90)):
        assert found["watermarked"] and found["request_id"] == result["request_id"], found
    # A preview is marked too, and a picture Flashtile did not make is not.
    preview = API.post(f"{URL}/v1/generate", json={**body, "size": "preview"}, headers={"Accept": "image/png"}, timeout=300)
    assert _detect(_png(preview))["request_id"] == preview.headers["x-flashtile-request-id"]
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (576, 1024, 3), dtype=np.uint8)
    unmarked = _detect(Image.fromarray(noise))
    assert not unmarked["watermarked"] and unmarked["request_id"] is None


def test_output_format_jpeg_and_webp_on_the_native_and_openai_apis(cluster):
    """Each format decodes as itself, at the asked size, with its provenance and a watermark naming the request."""
    body = {"prompt": "a blue square", "size": "1k", "aspect_ratio": "16:9", "seed": 5, "mode": "fast", "steps": 2}
    # Native, the file itself (Accept names its media type); the Server-Timing header names every stage.
    resp = API.post(f"{URL}/v1/generate", json={**body, "output_format": "jpeg", "output_compression": 90},
                    headers={"Accept": "image/jpeg"}, timeout=300)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg", resp.text[:300]
    assert {"encode+base", "upscale", "refine", "watermark+encode", "ingress", "ingress-cpu"} <= {
        part.split(";")[0].strip() for part in resp.headers["server-timing"].split(",")}
    jpeg = Image.open(io.BytesIO(resp.content))
    assert jpeg.format == "JPEG" and jpeg.size == (1024, 576)
    assert json.loads(jpeg.getexif()[0x010E])["seed"] == "5" and jpeg.getexif()[0x0131] == "Flashtile"
    assert _detect(jpeg.convert("RGB"))["request_id"] == resp.headers["x-flashtile-request-id"]
    # Native JSON: webp, stored and served with its own type.
    resp = API.post(f"{URL}/v1/generate", json={**body, "output_format": "webp"}, timeout=300)
    result = resp.json()
    assert resp.status_code == 200 and result["output_format"] == "webp", resp.text[:300]
    webp = Image.open(io.BytesIO(base64.b64decode(result["image_b64"])))
    assert webp.format == "WEBP" and webp.size == (1024, 576)
    # PNG is lossless: a compression level is refused, naming the field, before any work.
    resp = API.post(f"{URL}/v1/generate", json={**body, "output_compression": 50}, timeout=30)
    assert resp.status_code == 422 and resp.json()["error"]["errors"][0]["field"] == "output_compression"
    # OpenAI's own parameters, through the official client.
    import openai

    client = openai.OpenAI(base_url=f"{URL}/v1", api_key=KEYS[1], max_retries=0, timeout=300)
    for fmt, pil_format in (("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")):
        r = client.images.generate(prompt="a blue square", size="1024x576", output_format=fmt, response_format="b64_json",
                                   **({} if fmt == "png" else {"output_compression": 75}),
                                   extra_body={"seed": 5, "mode": "fast", "steps": 2})
        image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        assert image.format == pil_format and image.size == (1024, 576) and r.output_format == fmt


def test_url_response_is_a_presigned_s3_url_a_plain_client_can_fetch(cluster):
    body = {"prompt": "a lighthouse", "size": "1k", "aspect_ratio": "9:16", "seed": 4, "mode": "fast", "steps": 2,
            "response_format": "url"}
    result = API.post(f"{URL}/v1/generate", json=body, timeout=300).json()
    assert result["image_b64"] is None and "X-Amz-Expires=900" in result["url"]
    assert result["url"].startswith(os.environ["AWS_ENDPOINT_URL"] + "/outputs/flashtile/images/")
    png = requests.get(result["url"], timeout=30)  # no AWS credentials: the signature is the permission
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (576, 1024)


def test_idempotency_key_replays_the_stored_result_and_refuses_another_body(cluster):
    body = {"prompt": "a purple ring", "size": "preview", "mode": "fast", "steps": 3}  # no seed: one is drawn
    headers = {"Idempotency-Key": "order-42"}
    first = API.post(f"{URL}/v1/generate", json=body, headers=headers, timeout=300)
    again = API.post(f"{URL}/v1/generate", json=body, headers=headers, timeout=300)
    assert first.status_code == again.status_code == 200
    assert first.headers["idempotent-replayed"] == "false" and again.headers["idempotent-replayed"] == "true"
    # A recomputation would have drawn another seed; the replay is the stored result itself.
    assert again.json()["seed"] == first.json()["seed"] and again.json()["image_b64"] == first.json()["image_b64"]
    other = API.post(f"{URL}/v1/generate", json={**body, "prompt": "a red ring"}, headers=headers, timeout=30)
    assert other.status_code == 409 and other.json()["error"]["type"] == "idempotency_conflict"
    fresh = API.post(f"{URL}/v1/generate", json=body, headers={"Idempotency-Key": "order-43"}, timeout=300)
    assert fresh.status_code == 200 and fresh.headers["idempotent-replayed"] == "false"  # another key: computed


def test_invalid_request_is_422_naming_the_field(cluster):
    resp = API.post(f"{URL}/v1/generate", json={"prompt": "a", "size": "8k", "colour": 1}, timeout=30)
    assert resp.status_code == 422
    errors = {e["field"]: e["message"] for e in resp.json()["error"]["errors"]}
    assert "'preview', '1k', '2k' or '4k'" in errors["size"]
    assert "colour" in errors
    assert "Traceback" not in resp.text


def test_models_health_and_openapi(cluster, shipped_guidance):
    assert requests.get(f"{URL}/healthz", timeout=10).json() == {"status": "ok"}
    models = API.get(f"{URL}/v1/models", timeout=10).json()["data"]
    assert models[0]["id"] == "flashtile-default-v1" and models[0]["base_resolution"] == 256
    assert models[0]["default_guidance"] == shipped_guidance
    paths = requests.get(f"{URL}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/generate", "/v1/models", "/healthz"} <= set(paths)
    # Every status a route can answer is documented, with the error body's schema.
    generate = paths["/v1/generate"]["post"]["responses"]
    assert {"200", "400", "401", "403", "408", "409", "413", "422", "500", "503"} <= set(generate)
    assert generate["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"404"} <= set(paths["/v1/images/generations"]["post"]["responses"])


def test_doc_examples_run_against_the_cluster(cluster, tmp_path):
    # The examples of README.md and docs/*.md (`<!-- example: NAME -->`), run as they are written.
    examples = {name: (ex.lang, ex.code) for name, ex in doc_examples().items()}
    assert set(examples) == {"curl-png", "curl-json", "python", "openai", "python-retry"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "FLASHTILE_API_KEY": KEYS[1]}

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
            lambda i: API.post(f"{URL}/v1/generate", json={**body, "seed": 100 + i}, timeout=300), range(4)
        ))
    assert [r.status_code for r in responses] == [200] * 4
    results = [r.json() for r in responses]
    assert max(r["base_batch_size"] for r in results) > 1  # one generator replica, 4 requests: batches form
    assert sorted(r["seed"] for r in results) == [100, 101, 102, 103]
    assert len({r["image_b64"] for r in results}) == 4  # each request kept its own seed and image


def test_timeout_gets_408_and_stops_denoising(cluster):
    before = _metrics()
    # 150 base steps take about 3 s on a fast 2-core CPU (AVX-512): a 1.5 s deadline falls inside the base run.
    body = {"prompt": "a slow one", "size": "1k", "steps": 150, "seed": 1, "timeout_s": 1.5}
    resp = API.post(f"{URL}/v1/generate", json=body, timeout=60)
    assert resp.status_code == 408, resp.text[:300]
    assert resp.json()["error"] == {"type": "timeout", "timeout_s": 1.5, "message": resp.json()["error"]["message"]}
    _assert_base_stopped(before, "timeout")


def test_client_disconnect_stops_denoising(cluster):
    before = _metrics()
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and closes the connection
        API.post(f"{URL}/v1/generate", json={"prompt": "a slow one", "size": "1k", "steps": 150, "seed": 2}, timeout=1.5)
    _assert_base_stopped(before, "disconnect")


def _assert_base_stopped(before: dict, reason: str) -> None:
    """The request was counted as cancelled, and its base run stopped early and stays stopped."""
    def cancelled(m):
        return (_total(m, "flashtile_cancellations_total", stage="request", reason=reason)
                > _total(before, "flashtile_cancellations_total", stage="request", reason=reason)
                and _total(m, "flashtile_cancellations_total", stage="base", reason="cancelled")
                > _total(before, "flashtile_cancellations_total", stage="base", reason="cancelled"))

    assert cancelled(_wait_for(cancelled)), "no cancellation counted"
    steps = _total(_after_an_export_round(), "flashtile_denoising_steps_total", stage="base")
    # Another export round: a run still denoising would have added steps.
    later = _total(_after_an_export_round(), "flashtile_denoising_steps_total", stage="base")
    run = later - _total(before, "flashtile_denoising_steps_total", stage="base")
    assert later == steps and 0 < run < 150, (steps, later, run)


def test_stream_disconnect_drops_the_queued_tiles(cluster):
    body = {"prompt": "a lighthouse", "size": "4k", "aspect_ratio": "16:9", "seed": 3, "mode": "fast", "steps": 2}
    for attempt in range(3):  # the last ~1 s of tiles can outrun a disconnect on a busy machine: then again
        before = _metrics()
        with API.post(f"{URL}/v1/generate/stream", json=body, stream=True, timeout=300) as resp:
            for line in resp.iter_lines(decode_unicode=True):
                # The second upscale pass (24 of the 26 tiles) is under way: leave now.
                if line.startswith("data: ") and json.loads(line[6:]).get("stage") == "upscale" and json.loads(line[6:])["step"] >= 3:
                    break

        def counted(m):
            return _total(m, "flashtile_cancellations_total", stage="request", reason="disconnect") > _total(
                before, "flashtile_cancellations_total", stage="request", reason="disconnect")

        assert counted(_wait_for(counted))
        after = _after_an_export_round()  # every replica has exported what it did
        done = _total(after, "flashtile_tiles_total", stage="upscale") - _total(before, "flashtile_tiles_total", stage="upscale")
        dropped = _total(after, "flashtile_cancellations_total", stage="upscale", reason="dropped") - _total(
            before, "flashtile_cancellations_total", stage="upscale", reason="dropped")  # queued at a replica, never run
        cancelled = _total(after, "flashtile_cancellations_total", stage="upscale", reason="cancelled") - _total(
            before, "flashtile_cancellations_total", stage="upscale", reason="cancelled")  # open at the ingress
        assert _total(after, "flashtile_images_total") == _total(before, "flashtile_images_total")  # nothing delivered
        if dropped >= 1:
            break
    assert done < 26 and dropped >= 1 and done + dropped <= 26 and cancelled >= 26 - done, (done, dropped, cancelled)


def test_a_burst_past_capacity_gets_503_with_retry_after_at_once(cluster):
    from concurrent.futures import ThreadPoolExecutor

    def post(i):
        body = {"prompt": "a burst", "size": "preview", "steps": 10, "seed": 1000 + i}
        r = API.post(f"{URL}/v1/generate", json=body, timeout=300)
        return r.status_code, r.headers.get("retry-after"), r.json()["error"]["type"] if r.status_code != 200 else "", r.elapsed.total_seconds()

    n = 3 * MAX_IN_FLIGHT  # more than even two ingress replicas hold
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(post, range(n)))
    ok = [a for a in answers if a[0] == 200]
    busy = [a for a in answers if a[0] == 503]
    assert len(ok) + len(busy) == n, answers  # nothing else: no 500, no time-out
    assert len(busy) >= n - 2 * MAX_IN_FLIGHT and len(ok) >= MAX_IN_FLIGHT, answers
    assert all(a[1] == "5" and a[2] == "overloaded" for a in busy)
    assert max(a[3] for a in busy) < min(a[3] for a in ok)  # refused at once: faster than any accepted one is served
    assert API.post(f"{URL}/v1/generate", json={"prompt": "after", "size": "preview", "steps": 1}, timeout=300).ok


def test_fuzzing_the_openapi_document_finds_no_server_error(cluster, tmp_path):
    """schemathesis against /openapi.json: invalid input on every route, valid input on the routes that do no
    model work (valid generation requests are the rest of this module). No server error, and every status and
    body an answer has is one the document declares for its route. Bounded in time."""
    st = Path(sys.executable).parent / "st"
    common = [str(st), "run", f"{URL}/openapi.json", "-H", f"Authorization: Bearer {KEYS[0]}", "-c", "not_a_server_error,status_code_conformance,response_schema_conformance",
              "--seed", "1", "--no-shrink", "--request-timeout", "60", "-w", "1", "--no-color"]
    runs = [
        ["--mode", "negative", "-n", "25", "--max-time", "45", "--exclude-path", "/v1/outputs/{key}"],
        ["--mode", "positive", "-n", "30", "--max-time", "20", "--include-path-regex",
         "^/(v1/watermark/detect|v1/models|healthz|v1/outputs/.*)$"],
    ]
    for extra in runs:
        proc = subprocess.run(common + extra, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        import re

        counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
        assert counts and counts[1] == counts[2] and int(counts[1]) >= 100, proc.stdout[-2000:]


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


def _promql_until(query: str, timeout_s: float = 30) -> list:
    """A query that should have a result: a slow scrape on a busy machine briefly leaves stale markers."""
    deadline = time.monotonic() + timeout_s
    while not (result := _promql(query)) and time.monotonic() < deadline:
        time.sleep(1)
    return result


def test_prometheus_sees_p50_latency_for_every_stage(prometheus):
    def counts() -> dict:
        return {r["metric"]["stage"]: float(r["value"][1])
                for r in _promql("sum by (stage) (flashtile_stage_latency_seconds_count)")}

    before = counts()
    for seed in (1, 2):
        body = {"prompt": "a green triangle", "size": "1k", "mode": "fast", "steps": 2, "seed": seed,
                "response_format": "url"}
        assert API.post(f"{URL}/v1/generate", json=body, timeout=300).status_code == 200
    # Over all time, not rate(): a stage whose replica was started for these requests has a new series, and
    # rate() cannot see the increase of a series in its first sample (a CI run failed on exactly that).
    query = "histogram_quantile(0.5, sum by (le, stage) (flashtile_stage_latency_seconds_bucket))"
    stages = {"encode", "base", "upscale", "refine"}
    deadline, p50, after = time.monotonic() + 90, {}, {}
    while time.monotonic() < deadline:  # Ray's agents export every few seconds; Prometheus scrapes every second
        after = counts()
        if all(after.get(s, 0) > before.get(s, 0) for s in stages):
            p50 = {r["metric"]["stage"]: float(r["value"][1]) for r in _promql(query)}
            if set(p50) == stages:
                break
        time.sleep(2)
    assert all(after.get(s, 0) > before.get(s, 0) for s in stages), (before, after)  # these requests were seen
    assert set(p50) == stages, p50
    assert all(0 < v <= 300 for v in p50.values()), p50  # NaN fails too
    assert _promql("ray_flashtile_stage_latency_seconds_count") == []  # renamed to flashtile_* by the config
    images = _promql_until('sum(flashtile_images_total{size="1k",mode="fast"})')
    assert images and float(images[0]["value"][1]) >= 2
    synced = _promql_until('sum(flashtile_storage_bytes_total{direction="in"})')  # replicas synced the S3 model
    assert synced and float(synced[0]["value"][1]) > 1e6
    stored = _promql_until('sum(flashtile_storage_bytes_total{direction="out"})')  # the url responses' PNGs
    assert stored and float(stored[0]["value"][1]) > 0
    # Every panel of the shipped Grafana dashboard is a query Prometheus accepts.
    dashboard = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        status = requests.get(f"{PROMETHEUS}/api/v1/query", params={"query": expr}, timeout=10).json()["status"]
        assert status == "success", expr


REPLICAS = """
import json, os, signal, sys, time
import ray
import ray.exceptions
from ray import serve
ray.init(address="auto", namespace="serve", logging_level="ERROR")
def alive():  # [[replica actor name, pid], ...] of the base generator's live replicas
    out = []
    for name in sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#base_generator#" in a["name"]):
        try:  # Serve may be stopping a surplus replica (downscaling) while we list: it is not a victim
            out.append([name, ray.get(ray.get_actor(name, "serve").__ray_call__.remote(lambda self: os.getpid()), timeout=5)])
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # or one still starting: it holds no request yet
    return out
def busy(name):  # requests the replica holds now; answered on Serve's own thread, never blocked by user code
    try:
        return ray.get(ray.get_actor(name, "serve").get_num_ongoing_requests.remote(), timeout=5)
    except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return 0
if sys.argv[1] == "kill-on-go":  # connected first; on a line on stdin, wait until a replica holds a request, then
    print("ready", flush=True)   # SIGKILL every live replica: a crash in the middle of denoising
    sys.stdin.readline()
    deadline = time.monotonic() + float(sys.argv[2])
    victims = []
    while time.monotonic() < deadline:
        victims = alive()
        if any(busy(name) for name, _ in victims):
            break
        time.sleep(0.05)
    else:
        victims = []  # no request ever reached a generator: the test fails on the empty list
    for _, pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a surplus replica Serve stopped meanwhile
            pass
    print(json.dumps(victims), flush=True)
elif sys.argv[1] == "wait-healthy":  # until Serve runs the deployment again without the dead replica
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline:
        d = serve.status().applications["flashtile"].deployments["base_generator"]
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#base_generator#" in a["name"]]
        if d.status == "HEALTHY" and d.replica_states.get("RUNNING", 0) >= 1 and names and not set(sys.argv[4:]) & set(names):
            print(json.dumps({"status": d.status, "running": d.replica_states.get("RUNNING", 0), "alive": names}))
            break
        time.sleep(1)
"""


def _replicas(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", REPLICAS, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_killing_a_generator_replica_under_load_loses_no_request(cluster, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    # The documented client (docs/api.md): retries with one Idempotency-Key per request.
    example = doc_examples()["python-retry"]
    namespace: dict = {}
    exec(compile(example.code, f"{example.file}:python-retry", "exec"), namespace)
    monkeypatch.setenv("FLASHTILE_API_KEY", KEYS[0])
    attempts = []
    real_post = namespace["requests"].post

    def counting_post(*args, **kwargs):  # count attempts, and keep what each returned
        try:
            r = real_post(*args, **kwargs)
            attempts.append(r.status_code)
            return r
        except requests.ConnectionError:
            attempts.append("connection error")
            raise

    monkeypatch.setattr(namespace["requests"], "post", counting_post)

    bodies = [{"prompt": "a red star on blue", "size": "preview", "steps": 150, "seed": 500 + i} for i in range(6)]
    # The killer connects to Ray before any request is sent. On cue it watches the generator replicas and kills
    # every live one (earlier bursts may have left more than one) as soon as one holds a request: the kill lands
    # mid-denoising, not in a gap between batches where the router would just hold requests for the new replica.
    killer = subprocess.Popen([sys.executable, "-c", REPLICAS, "kill-on-go", "300"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert killer.stdout.readline().strip() == "ready"
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(namespace["generate"], body) for body in bodies]
            killer.stdin.write("go\n")
            killer.stdin.flush()
            victims = json.loads(killer.stdout.readline())
            assert victims, "no base generator replica held a request"
            results = [f.result(timeout=400) for f in futures]
    finally:
        killer.kill()
        killer.wait(timeout=30)
    assert any(a != 200 for a in attempts), attempts  # the kill did fail requests, and they were retried
    assert attempts.count(200) == len(bodies)

    # Every request completed with a correct image: its own seed, the exact size, and the pixels a fresh
    # run of the same request gives.
    for body, result in zip(bodies, results):
        assert result["seed"] == body["seed"] and (result["width"], result["height"]) == (256, 256)
    fresh = API.post(f"{URL}/v1/generate", json=bodies[-1], timeout=300).json()  # the last was in flight or queued
    import numpy as np

    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image_b64"]))), dtype=np.float64) for r in (results[-1], fresh))
    assert np.abs(a - b).mean() < 6.0, np.abs(a - b).mean()  # same image; only the watermark's request id differs

    # Serve replaced the dead replica.
    names = [name for name, _ in victims]
    healthy = _replicas("wait-healthy", "-", "180", *names, timeout=240)
    assert healthy and not set(names) & set(json.loads(healthy)["alive"]), healthy


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
    # 8 generator-heavy requests at once (base only, 100 steps, long enough to outlast the controller's reaction):
    # the generator's target is 1 ongoing request per replica, the encoder's 8, so only it has reason to scale.
    body = {"prompt": "a burst", "size": "preview", "mode": "fast", "steps": 100}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda i: API.post(f"{URL}/v1/generate", json={**body, "seed": i}, timeout=300).status_code, range(8)
        ))
    done.touch()
    assert codes == [200] * 8
    out, _ = poller.communicate(timeout=120)
    peak = json.loads(out.strip().splitlines()[-1])
    assert peak["base_generator"] > 1  # min_replicas is 1
    assert peak["prompt_encoder"] == 1


def _ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server|dashboard.py"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_ray_tools_work_and_sigterm_to_the_process_alone_stops_everything(cluster):
    """Last in this module: it stops the cluster. Ray's own CLI reaches it (the dashboard listens on loopback), and
    SIGTERM to `flashtile serve` itself (not to its process group) shuts Serve and Ray down within 10 s."""
    # Ray turns token authentication on for a local cluster; its CLI sends the token (~/.ray/auth_token) when told to.
    status = subprocess.run([str(Path(sys.executable).parent / "serve"), "status"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert status.returncode == 0, status.stderr[-1000:]
    assert "flashtile" in status.stdout and "RUNNING" in status.stdout
    assert _ray_processes()
    cluster.send_signal(signal.SIGTERM)
    cluster.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(), _ray_processes()
