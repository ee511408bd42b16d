"""Regions on a real multi-node Ray cluster on this one host (ray.cluster_utils.Cluster): a head that runs no
replicas and one node per region, labelled with Ray's own ray.io/availability-region, Flashtile deployed on it with
`serve deploy` from cluster.yaml placed for two regions (deployments/regions.py). Bounded: fixed request counts,
a few at a time, every wait with a deadline; everything on 127.0.0.1."""

import json
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.regional import Regional
from deployments.regions import HEADER

REGIONS = ["us-east", "eu-west"]
REQUEST = {"prompt": "a red ring on a blue field", "size": "1k", "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def regional(default_model_dir, tmp_path_factory):
    # A short deadline: a request that hangs (it should not) costs the test 2 minutes, not 5.
    cluster = Regional(tmp_path_factory.mktemp("regions"), REGIONS, {"request_timeout_s": 120})
    try:
        yield cluster
    finally:
        cluster.close()


def _generate(url: str, region: str, **fields) -> dict:
    resp = requests.post(f"{url}/v1/generate", json={**REQUEST, **fields}, headers={HEADER: region}, timeout=300)
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()


def test_regions_lists_each_region_with_its_replicas(regional):
    listed = regional.regions()
    assert [r["name"] for r in listed["data"]] == REGIONS
    for region in listed["data"]:
        assert region["replicas"] == {d: 1 for d in region["replicas"]}, region  # the floor: one of each, here
        assert region["below_floor"] == []


def test_an_unknown_region_is_refused_naming_the_configured_ones(regional):
    resp = requests.post(f"{regional.url}/v1/generate", json=REQUEST, headers={HEADER: "mars-north"}, timeout=30)
    assert resp.status_code == 422
    assert "mars-north" in resp.text and all(r in resp.text for r in REGIONS)


def test_under_light_load_every_stage_runs_in_the_requests_own_region(regional):
    import ray
    from ray import serve

    handle = serve.get_app_handle("flashtile")
    for i, region in enumerate(REGIONS * 2):
        # HTTP: the header picks the region of every stage call; the head's proxy has no region of its own, so
        # the ingress may be either (a region's own proxies pick its own ingress: docs/operations.md#regions).
        served = _generate(regional.url, region, seed=i)["regions"]
        assert set(served) >= {"ingress", "encode", "base", "upscale", "refine", "compose"}, served
        assert all(where == [region] for stage, where in served.items() if stage != "ingress"), (region, served)
        # Python handle: the keyword reaches Serve's router for the ingress hop too.
        result = handle.generate.remote({**REQUEST, "seed": i}, region=region).result(timeout_s=300)
        assert all(where == [region] for where in result.regions.values()), (region, result.regions)
    assert ray.is_initialized()


def test_saturating_one_region_spills_part_of_its_load_and_counts_it(regional):
    # One replica of each stage per region: 8 requests at once from us-east fill its replicas (the base generator
    # takes 4 at a time, an upscaler 4 calls, a refiner 2); Serve's router sends the rest to eu-west.
    home = lambda: sum(v for (_, o, s), v in regional.calls("us-east").items() if o == s == "us-east")  # noqa: E731
    home_before, spilled_before = home(), regional.spills("eu-west")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _generate(regional.url, "us-east", seed=100 + i), range(8)))
    away = [r["regions"] for r in results if any("eu-west" in where for s, where in r["regions"].items() if s != "ingress")]
    assert away, "no request spilled: us-east was never saturated"
    deadline = time.monotonic() + 60  # Ray's metrics agents export every few seconds
    # Each request that spilled made at least one call in eu-west, and some calls stayed home.
    while (spilled := regional.spills("eu-west") - spilled_before) < len(away) or home() == home_before:
        assert time.monotonic() < deadline, f"spill counter {spilled} for {len(away)} requests that spilled, " \
                                            f"home calls {home() - home_before}"
        time.sleep(2)
    print(json.dumps({"requests": len(results), "with_spilled_calls": len(away), "spilled_calls": spilled,
                      "home_calls": home() - home_before}))


def test_an_output_that_never_arrives_is_a_retryable_503_not_a_hang(regional, monkeypatch):
    # What a stage replica does when another replica's output cannot be read (its node went with a region, or Ray
    # lost it): fail the request at once with 503 replica_lost, which the retry client retries.
    import asyncio

    import ray

    from deployments import _replica
    from deployments.errors import ReplicaLost
    from stages.driver import Part

    @ray.remote(num_cpus=0)
    class Never:
        async def wait(self):
            await asyncio.Event().wait()  # set by nobody: its answer never comes

    waiter = Never.remote()
    never = waiter.wait.remote()
    monkeypatch.setattr(_replica, "FETCH_TIMEOUT_S", 1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(ReplicaLost, match="could not be read within 1 s") as lost:
            asyncio.run(_replica.fetch(Part(never, {})))
        assert time.monotonic() - t0 < 10 and lost.value.status == 503
        assert asyncio.run(_replica.fetch(Part(ray.put("ready"), {}))) == "ready"
    finally:
        ray.kill(waiter)


def _retry_client(region_of: dict[int, str]):
    """The documented client (docs/api.md, python-retry): one Idempotency-Key per request, retried on 503, 500 and
    connection errors. Each request goes to its region (the X-Flashtile-Region header, by its seed); every attempt's
    status is kept."""
    from doc_examples import doc_examples

    example = doc_examples()["python-retry"]
    namespace: dict = {}
    exec(compile(example.code, f"{example.file}:python-retry", "exec"), namespace)
    attempts: list = []

    def post(url, json, headers, **kwargs):
        try:
            r = requests.post(url, json=json, headers={**headers, HEADER: region_of[json["seed"]]}, **kwargs)
        except requests.ConnectionError:
            attempts.append("connection error")
            raise
        attempts.append(r.status_code if r.status_code == 200 else (r.status_code, r.text[:160]))
        return r

    # The client's own `requests`, with this post: the module everyone else uses stays as it is.
    namespace["requests"] = types.SimpleNamespace(post=post, ConnectionError=requests.ConnectionError)
    return namespace["generate"], attempts


def test_losing_a_region_under_load_loses_no_image_and_duplicates_none(regional):
    # 12 requests, 4 at a time, half from each region, url responses (stored once each in the shared store). When
    # the first 3 are done, every node of eu-west goes at once: its requests in flight fail (503 replica_lost, or
    # 500 when the ingress itself went), the client retries them with the same key, and they finish in us-east.
    seeds = list(range(200, 212))
    region_of = {s: REGIONS[i % 2] for i, s in enumerate(seeds)}
    generate, attempts = _retry_client(region_of)
    stored_before = set(regional.outputs.rglob("*.png"))
    done: list = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate, {**REQUEST, "seed": s, "response_format": "url"}, f"{regional.url}/v1/generate")
                   for s in seeds]
        for f in futures:
            done.append(f.result(timeout=600))
            if len(done) == 3:
                regional.lose("eu-west")
    assert [r["seed"] for r in done] == seeds  # every image came back, each its own request's
    stored = set(regional.outputs.rglob("*.png")) - stored_before
    assert len(stored) == len(seeds), (len(stored), attempts)  # each stored once: no request ran to the end twice
    assert len({r["url"] for r in done}) == len(seeds)
    after = [r for r in done[3:] if region_of[r["seed"]] == "eu-west"]
    print(json.dumps({"requests": len(seeds), "attempts": len(attempts),
                      "failed_attempts": [a for a in attempts if a != 200],
                      "eu_west_requests_after_the_loss_served_in": sorted({w for r in after for w in r["regions"]["base"]})}))
    assert attempts.count(200) == len(seeds)
    # With eu-west gone, listing the regions says so; its requests are served in us-east.
    listed = {r["name"]: r for r in regional.regions()["data"]}
    assert not listed["eu-west"]["serving"] and listed["us-east"]["serving"], listed
    served = _generate(regional.url, "eu-west", seed=300)["regions"]
    assert all(where == ["us-east"] for where in served.values()), served


def test_a_region_that_returns_serves_its_own_requests_again(regional):
    # Its replicas waited for it (no room for them in us-east); a new eu-west node takes them back.
    if "eu-west" not in regional.nodes:
        regional.add("eu-west")
    regional.wait_until(regional.all_placed, "eu-west holds its replicas again")
    for i in range(2):
        served = _generate(regional.url, "eu-west", seed=400 + i)["regions"]
        assert all(where == ["eu-west"] for stage, where in served.items() if stage != "ingress"), served
