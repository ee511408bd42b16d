"""The cluster under test: Ray Serve in the bench's own process, deployed from cluster.yaml with overrides.

Several variants (batching off, a monolith, fewer tile replicas) run side by side as separate Serve
applications on one Ray instance, each under its own route prefix, so a figure can interleave them. Ray is given
more logical CPUs than the machine has, so that every application's CPU reservation fits at once: the
applications idle while another is measured, and all of them share the machine's real cores.
Deployed the way `serve run` deploys a config file (Ray's own code path), on a free loopback port.
"""

import copy
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import yaml

from bench.common import ROOT, percentile

TEMPLATE = ROOT / "cluster.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(name: str, route: str, args: dict | None = None, deployments: dict | None = None,
               import_path: str | None = None, deployment_list: list[dict] | None = None) -> dict:
    """cluster.yaml's application with its args and per-deployment options overridden.

    `deployments` maps a deployment name to options; `num_replicas` there replaces autoscaling (Serve takes one
    or the other). `deployment_list` replaces the deployments section (an app of other deployments).
    """
    app = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text())["applications"][0])
    app.update(name=name, route_prefix=route)
    app["args"].update(args or {})
    if import_path:
        app["import_path"] = import_path
    if deployment_list is not None:
        app["deployments"] = deployment_list
    for d in app["deployments"]:
        options = (deployments or {}).get(d["name"], {})
        if "num_replicas" in options:
            d.pop("autoscaling_config", None)
        d.update(options)
    return app


class Cluster:
    """One Ray instance in this process; `deploy` replaces the set of applications (Serve's declarative update)."""

    LOGICAL_CPUS = 16  # Ray's accounting only: side-by-side applications all fit; they share the machine's real cores

    def __init__(self):
        import ray

        self.port = free_port()
        ray.init(namespace="serve", include_dashboard=False, log_to_driver=False, num_cpus=self.LOGICAL_CPUS)
        self._apps: dict[str, str] = {}

    def deploy(self, *apps: dict, timeout_s: float = 600) -> None:
        from ray import serve
        from ray.serve.scripts import run

        config = yaml.safe_load(TEMPLATE.read_text())
        config["http_options"]["port"] = self.port
        config["applications"] = list(apps)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(config, f, sort_keys=False)
        run.main([f.name, "--non-blocking"], standalone_mode=False)
        self._apps = {a["name"]: a["route_prefix"].rstrip("/") for a in apps}
        deadline = time.monotonic() + timeout_s
        while True:
            status = serve.status().applications
            states = {name: status[name].status if name in status else "NOT_STARTED" for name in self._apps}
            if all(s == "RUNNING" for s in states.values()) and len(status) == len(self._apps):
                break
            if any(s == "DEPLOY_FAILED" for s in states.values()) or time.monotonic() > deadline:
                raise RuntimeError(f"deploy did not finish: {states}")
            time.sleep(1)
        for name in self._apps:  # the ingress answers once every stage's info() has been read
            requests.get(self.url(name) + "/v1/models", timeout=120).raise_for_status()

    def url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.port}{self._apps[app]}"

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def server_timing(header: str) -> dict[str, float]:
    """`Server-Timing: base;dur=12.5, png;dur=3` -> {"base": 0.0125, "png": 0.003} (seconds)."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:]) / 1000
    return out


def generate(url: str, body: dict, session: requests.Session | None = None) -> dict:
    """One image over HTTP (the PNG itself, as a client would fetch it): wall time, server timings, bytes."""
    t0 = time.perf_counter()
    r = (session or requests).post(url + "/v1/generate", json=body, headers={"Accept": "image/png"}, timeout=900)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    return {"wall_s": wall, "bytes": len(r.content), **server_timing(r.headers.get("Server-Timing", ""))}


def load(url: str, body: dict, clients: int, requests_total: int) -> dict:
    """`clients` closed-loop clients share `requests_total` requests (seeds 0, 1, ...): images/s and latencies, and
    each answer's measurements (its Server-Timing parts, where the server sends them)."""
    seeds = iter(range(requests_total))
    lock = threading.Lock()
    answers: list[dict] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            answers.append(generate(url, {**body, "seed": seed}, session))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    makespan = time.perf_counter() - t0
    latencies = [a["wall_s"] for a in answers]
    return {"clients": clients, "requests": requests_total, "makespan_s": makespan,
            "images_per_s": requests_total / makespan, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "latencies_s": latencies, "answers": answers}


def wait_http(url: str, timeout_s: float, proc=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")
