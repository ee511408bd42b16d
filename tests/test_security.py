"""The ingress's refusal policy on its own: API keys, loopback-only default, limits, prompt blocklist."""

import pytest
from pydantic import ValidationError

from deployments.app import AppArgs
from deployments.schemas import GenerateRequest
from deployments.security import ApiKeys, Denied, Limits, PromptPolicy, authorize, is_loopback, key_hash


def test_keys_are_kept_as_digests_and_checked_from_config_and_environment():
    keys = ApiKeys(["config-key", key_hash("hashed-key")], environ={"FLASHTILE_API_KEYS": " env-a, env-b ,"})
    assert len(keys) == 4
    for key in ("config-key", "hashed-key", "env-a", "env-b"):
        assert keys.check(key) is not None
    assert keys.check("config-key") != keys.check("env-a")  # the id tells keys apart
    for wrong in ("", None, "config-ke", "config-key ", "CONFIG-KEY", key_hash("hashed-key")):
        assert keys.check(wrong) is None
    assert "config-key" not in repr(vars(keys))  # only digests are held


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer nope", "Basic k1", "k1", "Bearer  k2x"])
def test_inference_routes_need_a_valid_bearer_key(header):
    keys = ApiKeys(["k1", "k2"], environ={})
    denied = authorize(keys, "/v1/generate", header, "127.0.0.1")  # loopback does not bypass configured keys
    assert isinstance(denied, Denied) and denied.status == 401 and "Authorization: Bearer" in denied.message


def test_a_valid_key_passes_and_open_routes_need_none():
    keys = ApiKeys(["k1"], environ={})
    assert authorize(keys, "/v1/images/generations", "Bearer k1", "10.1.2.3") == keys.check("k1")
    assert authorize(keys, "/v1/generate", "bearer k1", "10.1.2.3") == keys.check("k1")  # scheme is case-insensitive
    for path in ("/healthz", "/openapi.json", "/docs", "/v1/outputs/images/x.png"):
        assert authorize(keys, path, None, "10.1.2.3") == "open"


def test_without_keys_only_loopback_clients_are_served():
    keys = ApiKeys([], environ={})
    assert authorize(keys, "/v1/generate", None, "127.0.0.1") == "loopback"
    assert authorize(keys, "/v1/generate", None, "::1") == "loopback"
    for host in ("10.0.0.7", "192.168.1.2", "2001:db8::1", None, "testclient"):
        denied = authorize(keys, "/v1/generate", "Bearer anything", host)
        assert isinstance(denied, Denied) and denied.status == 403 and "FLASHTILE_API_KEYS" in denied.message
    assert is_loopback("127.8.9.1") and not is_loopback("0.0.0.0")


def _req(**fields) -> GenerateRequest:
    return GenerateRequest(prompt=fields.pop("prompt", "a red star"), **fields)


@pytest.mark.parametrize(
    "fields, images, limit",
    [
        ({"prompt": "x" * 101}, 1, "max_prompt_chars"),
        ({}, 3, "max_images"),
        ({"steps": 41}, 1, "max_steps"),
        ({"size": "4k"}, 1, "max_tier"),
        ({"size": "2k", "steps": 40}, 2, "max_megapixel_steps"),  # 2 x 4.19 MP x 40 = 335.5
    ],
)
def test_each_limit_is_named_when_exceeded(fields, images, limit):
    limits = Limits(max_prompt_chars=100, max_images=2, max_steps=40, max_tier="2k", max_megapixel_steps=300)
    exceeded = limits.check(_req(**fields), images)
    assert exceeded is not None and exceeded.limit == limit and limit in exceeded.message


def test_requests_within_limits_pass_and_defaults_resolve_steps():
    limits = Limits(max_steps=30, max_megapixel_steps=100)
    assert limits.check(_req(size="2k", mode="fast")) is None  # 4 steps x 4.19 MP = 16.8
    assert limits.check(_req(size="1k")) is None  # quality: 30 steps x 1.05 MP = 31.5
    assert limits.check(_req(size="2k")).limit == "max_megapixel_steps"  # quality, 30 steps x 4.19 MP = 125.8
    assert Limits().check(_req(size="4k", steps=125)) is None and Limits().check(_req(size="4k", steps=126)) is not None


def test_limits_reject_bad_configuration():
    with pytest.raises(ValidationError, match="max_steps"):
        Limits(max_steps=1000)
    with pytest.raises(ValidationError, match="max_tier"):
        Limits(max_tier="8k")


def test_blocklist_matches_words_phrases_and_patterns_after_normalisation():
    policy = PromptPolicy(["forbidden", "red  panda", r"re:\bgor(e|y)\b"])
    for prompt in ("a FORBIDDEN castle", "ａ ｆｏｒｂｉｄｄｅｎ castle", "a red panda", "a Red\tPanda eating", "gory scenes"):
        assert policy.blocks(prompt), prompt
    for prompt in ("a forbiddenly fine day", "a red pandas", "a red apple", "allegory"):
        assert not policy.blocks(prompt), prompt
    assert not PromptPolicy([]).blocks("anything")


def test_app_args_refuse_a_broken_blocklist_pattern():
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        AppArgs(prompt_blocklist=["re:(unclosed"])
    assert AppArgs(prompt_blocklist=["fine", "re:ok+"]).prompt_blocklist == ["fine", "re:ok+"]


# --- the ingress's HTTP guard, on a real ASGI app (no cluster) -----------------------------------------------------


@pytest.fixture
def guarded(monkeypatch):
    """A FastAPI echo app behind GuardMiddleware, with one key and a 2 KiB body limit."""
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from deployments import guard

    app = FastAPI()

    @app.post("/v1/generate")
    async def echo(request: Request):
        return {"bytes": len(await request.body()), "principal": request.scope["state"]["principal"]}

    args = AppArgs(api_keys=["k-one"], limits={"max_body_bytes": 2048}).model_dump()
    app.add_middleware(guard.GuardMiddleware, guard=guard.Guard.from_args(args))
    monkeypatch.delenv("FLASHTILE_API_KEYS", raising=False)
    return TestClient(app)


def test_guard_middleware_checks_the_key_then_the_body_size(guarded):
    auth = {"Authorization": "Bearer k-one"}
    assert guarded.post("/v1/generate", content=b"x" * 100).status_code == 401
    ok = guarded.post("/v1/generate", content=b"x" * 100, headers=auth)
    assert ok.status_code == 200 and ok.json()["bytes"] == 100
    declared = guarded.post("/v1/generate", content=b"x" * 4096, headers=auth)
    assert declared.status_code == 413 and declared.json()["error"]["limit"] == 2048

    def chunks():  # no Content-Length: the middleware counts what arrives
        for _ in range(8):
            yield b"x" * 512

    streamed = guarded.post("/v1/generate", content=chunks(), headers=auth)
    assert streamed.status_code == 413 and streamed.json()["error"]["type"] == "body_too_large"
