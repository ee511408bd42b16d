"""The serving layers without Ray: the pipeline driver on the stages in process and on fakes, the HTTP routes with
FastAPI's TestClient, admission, idempotency, the OpenAI mapping, server-sent events and the error hierarchy."""

import asyncio
import base64
import io
import json
import pickle

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deployments import errors
from deployments.app import AppArgs
from deployments.executor import PixelLeak, no_pixels
from deployments.guard import Guard
from deployments.http import create_app
from deployments.idempotency import Outputs
from deployments.regions import HEADER, Regions
from deployments.service import Service
from deployments.storage import LocalOutputStore
from stages import driver
from stages.driver import FileSpec, Part

KEY = "unit-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"prompt": "a red star", "size": "1k", "mode": "fast", "steps": 1, "seed": 3}


def make_guard(**args) -> Guard:
    return Guard.from_args(AppArgs(api_keys=[KEY], **args).model_dump())


class Wrapped:
    """An executor that forwards to another, for fakes that change one step."""

    def __init__(self, inner):
        self.inner, self.cancelled = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def cancel(self):
        self.cancelled += 1
        return {}


class FailingUpscaler(Wrapped):
    async def upscale(self, image, boxes):
        raise ValueError("upscaler weights are corrupt")  # a model fault, not the client's request


class SlowGenerator(Wrapped):
    async def generate(self, embeds, base):
        await asyncio.sleep(30)


def client(executor, tmp_path, regions: Regions = Regions(), **guard) -> tuple[TestClient, Service]:
    service = Service(lambda region: executor, make_guard(**guard), Outputs(LocalOutputStore(tmp_path), 60), regions)
    return TestClient(create_app(service), raise_server_exceptions=False), service


# --- the driver ----------------------------------------------------------------------------------------------------


def test_the_driver_in_process_is_deterministic_and_streams_every_stage(flashtile):
    params = flashtile.params("a red star", size="1k", mode="fast", steps=2, seed=3)

    async def collect():
        return [e async for e in driver.run(flashtile, params, FileSpec("png"), stream=True)]

    events = asyncio.run(collect())
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    assert stages[:2] == ["base", "base"] and "upscale" in stages and stages[-1] == "refine"
    render = events[-1]["render"]
    again = flashtile.render(params)
    assert render.output == again.output and render.request_id == again.request_id == driver.render_id(params, flashtile.model_id)
    png = Image.open(io.BytesIO(render.output))
    assert png.size == (1024, 1024) and png.text["request_id"] == render.request_id
    assert render.steps == {"base": 2, "upscale_tiles": 1, "refine_tiles": 2, "refine_steps_per_tile": 1}


def test_a_failing_stage_cancels_the_rest_and_is_a_500_without_a_trace(flashtile, tmp_path):
    failing = FailingUpscaler(flashtile)
    http, _ = client(failing, tmp_path)
    resp = http.post("/v1/generate", json=FAST, headers=AUTH)
    assert resp.status_code == 500 and resp.json() == {"error": {"type": "internal", "message": "image generation failed"}}
    assert "Traceback" not in resp.text and "corrupt" not in resp.text
    assert failing.cancelled == 1  # the driver stopped the request's open calls


def test_a_deadline_is_a_408_and_stops_the_work(flashtile, tmp_path):
    slow = SlowGenerator(flashtile)
    http, service = client(slow, tmp_path)
    resp = http.post("/v1/generate", json={**FAST, "timeout_s": 0.5}, headers=AUTH)
    assert resp.status_code == 408 and resp.json()["error"]["type"] == "timeout"
    assert slow.cancelled == 1 and service.admission.active == 0  # work cancelled, capacity given back


def test_no_pixels_finds_a_tensor_anywhere_in_an_answer():
    assert no_pixels(Part("ref", {"replica": "r1"})).meta == {"replica": "r1"}
    assert no_pixels([Part("ref"), {"a": (1, b"png")}])
    with pytest.raises(PixelLeak, match=r"upscale\[1\]\.pixels holds a Tensor of shape \(1, 3, 4, 4\)"):
        no_pixels([Part("ref"), Part(torch.zeros(1, 3, 4, 4))], "upscale")


# --- routes --------------------------------------------------------------------------------------------------------


def test_generate_json_png_and_idempotent_replay(flashtile, tmp_path):
    http, _ = client(flashtile, tmp_path)
    first = http.post("/v1/generate", json=FAST, headers={**AUTH, "Idempotency-Key": "k1"})
    assert first.status_code == 200 and first.headers["idempotent-replayed"] == "false"
    result = first.json()
    assert (result["width"], result["height"]) == (1024, 1024) and result["seed"] == 3
    assert "ingress" in first.headers["server-timing"]
    again = http.post("/v1/generate", json=FAST, headers={**AUTH, "Idempotency-Key": "k1"})
    assert again.headers["idempotent-replayed"] == "true" and again.json()["image_b64"] == result["image_b64"]
    conflict = http.post("/v1/generate", json={**FAST, "seed": 4}, headers={**AUTH, "Idempotency-Key": "k1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "idempotency_conflict"
    png = http.post("/v1/generate", json=FAST, headers={**AUTH, "Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and png.content == base64.b64decode(result["image_b64"])


def test_refusals_before_model_work(flashtile, tmp_path):
    counting = Wrapped(flashtile)
    http, service = client(counting, tmp_path, prompt_blocklist=["forbidden"], max_in_flight=1)
    cases = [
        ({**FAST, "prompt": "a forbidden star"}, 400, "content_policy_violation"),
        ({**FAST, "size": "4k", "steps": 150}, 422, "limit_exceeded"),
        ({**FAST, "guidance_scale": False}, 422, "invalid_request"),  # strict numbers: no bool as 0
        ({**FAST, "size": "8k"}, 422, "invalid_request"),
    ]
    for body, status, kind in cases:
        resp = http.post("/v1/generate", json=body, headers=AUTH)
        assert (resp.status_code, resp.json()["error"]["type"]) == (status, kind), resp.text
    assert http.post("/v1/generate", json=FAST).status_code == 401  # no key
    with service.admission.admit(1):  # capacity held by another request: refused at once, with Retry-After
        busy = http.post("/v1/generate", json=FAST, headers=AUTH)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5" and busy.json()["error"]["retry_after"] == 5
    assert counting.cancelled == 0  # none of them reached the pipeline


def test_a_region_header_is_checked_before_model_work_and_the_result_says_where(flashtile, tmp_path):
    counting = Wrapped(flashtile)
    census = lambda: {"us-east": {"ingress": 1, "base_generator": 2}}  # noqa: E731  (live replicas, as Ray reports)
    regions = Regions(("us-east", "eu-west"), home="us-east", census=census)
    http, _ = client(counting, tmp_path, regions=regions)
    for route, body in (("/v1/generate", FAST), ("/v1/generate/stream", FAST),
                        ("/v1/images/generations", {"prompt": "a red star", "size": "1024x1024"})):
        resp = http.post(route, json=body, headers={**AUTH, HEADER: "mars-north"})
        assert resp.status_code == 422, (route, resp.text)
        assert resp.json()["error"]["message"] == (f"{HEADER}: unknown region 'mars-north'; configured regions: "
                                                   "us-east, eu-west"), route
    assert counting.cancelled == 0  # refused before the pipeline
    ok = http.post("/v1/generate", json=FAST, headers={**AUTH, HEADER: "eu-west"})
    assert ok.status_code == 200 and ok.json()["regions"] == {"ingress": ["us-east"]}  # in process: no stage regions
    listed = http.get("/v1/regions", headers=AUTH).json()
    assert [(r["name"], r["replicas"]["base_generator"], r["serving"]) for r in listed["data"]] == [
        ("us-east", 2, False), ("eu-west", 0, False)]
    assert "prompt_encoder" in listed["data"][0]["below_floor"] and "ingress" not in listed["data"][0]["below_floor"]
    # No regions configured: any region header is refused, and results carry no regions.
    plain, _ = client(counting, tmp_path)
    assert plain.post("/v1/generate", json=FAST, headers={**AUTH, HEADER: "us-east"}).status_code == 422
    assert plain.post("/v1/generate", json=FAST, headers=AUTH).json()["regions"] == {}


def test_stream_events_end_with_the_result_or_one_typed_error(flashtile, tmp_path):
    http, _ = client(flashtile, tmp_path)
    with http.stream("POST", "/v1/generate/stream", json=FAST, headers=AUTH) as resp:
        text = "".join(resp.iter_text())
    kinds = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "progress" and kinds[-1] == "result" and "error" not in kinds
    failing, _ = client(FailingUpscaler(flashtile), tmp_path)
    with failing.stream("POST", "/v1/generate/stream", json=FAST, headers=AUTH) as resp:
        text = "".join(resp.iter_text())
    last = text.strip().splitlines()
    assert last[-2] == "event: error" and json.loads(last[-1][len("data: "):]) == {
        "type": "internal", "message": "image generation failed"}


def test_openai_images_and_models(flashtile, tmp_path):
    http, _ = client(flashtile, tmp_path)
    resp = http.post("/v1/images/generations", headers=AUTH,
                     json={"prompt": "a red star", "n": 2, "size": "1024x1024", "seed": 5, "mode": "fast", "steps": 1})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["seed"] for d in data] == [5, 6] and data[0]["b64_json"] != data[1]["b64_json"]
    wrong = http.post("/v1/images/generations", headers=AUTH, json={"prompt": "a", "model": "dall-e-3"})
    assert wrong.status_code == 404 and wrong.json()["error"]["type"] == "model_not_found"
    models = http.get("/v1/models", headers=AUTH).json()["data"][0]
    assert models["id"] == flashtile.model_id and models["base_resolution"] == flashtile.generator.base_resolution


def test_apps_keep_their_own_state(flashtile, tmp_path):
    # Nothing lives in module globals: two apps with different settings in one process do not share any.
    a, sa = client(flashtile, tmp_path / "a", max_in_flight=1)
    b, sb = client(flashtile, tmp_path / "b", max_in_flight=2)
    with sa.admission.admit(1):
        assert a.post("/v1/generate", json=FAST, headers=AUTH).status_code == 503
        assert b.post("/v1/generate", json=FAST, headers=AUTH).status_code == 200
    assert sb.admission.active == 0


# --- errors --------------------------------------------------------------------------------------------------------


def test_errors_keep_their_type_and_fields_across_processes():
    for err in (errors.Overloaded(retry_after=3), errors.ReplicaLost(), errors.LimitExceeded("too many", limit="max_steps"),
                errors.TooLarge("big", kind="image_too_large", limit=9), errors.Timeout("late", timeout_s=2.0)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.status == err.status and back.body() == err.body()
        assert back.headers == err.headers
    assert errors.classify(ValueError("weights file is truncated")).status == 500  # a stage's fault, not a 422
